"""Parameter blocks for APTS: block labels of the parameters, their checks and the masks.

``aptsjax.apts(param_blocks=...)`` decomposes the parameters as well as (or instead of) the
data (docs/method.md, "Parameter-block subdomains"). The blocks are given by *labels*: a pytree
with the parameters' structure whose leaves are integers, or integer arrays broadcastable to
the leaf's shape (shape (1, H) labels the H columns of a (D, H) kernel), so that entry e of the
parameters belongs to block label(e). With J blocks every label 0..J-1 occurs.

The helpers build common labellings: ``leaf_blocks`` (one block per leaf), ``layer_blocks`` (one
per top-level child of the parameters) and ``shard_blocks`` (one per position along a mesh axis
that shards the parameters). ``resolve`` checks a labelling and returns it with J; ``mask``
restricts a gradient to one block.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

PyTree = Any
NAMED = ("leaves", "layers")
REPLICATED = ("own", "first")
BOUNDS = ("equal", "size")


class BlockLabels(NamedTuple):
  """A checked labelling of the parameters.

  Attributes:
    labels: the parameters' structure, leaves int32 numpy arrays broadcastable to the leaves.
    count: J, the number of blocks (the largest label + 1).
    sizes: n_j, the number of parameter entries in each block (they sum to n).
  """
  labels: PyTree
  count: int
  sizes: tuple[int, ...] = ()


def _label_array(value: int) -> np.ndarray:
  return np.asarray(value, np.int32)


def leaf_blocks(params: PyTree) -> PyTree:
  """One block per leaf, in the order of ``jax.tree.leaves(params)``.

  Args:
    params: the parameter pytree (arrays or shape-dtype structs).

  Returns:
    Labels with the structure of ``params``: leaf k is the scalar array k.
  """
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [_label_array(k) for k in range(len(leaves))])


def layer_blocks(params: PyTree) -> PyTree:
  """One block per top-level child of the parameters (a layer of a Flax model).

  Levels with a single child, such as Flax's ``{"params": {...}}``, are descended first: the
  children are those of the first level where the leaves' paths part. Blocks are numbered in
  the order of ``jax.tree.leaves(params)``. Parameters with one leaf form one block.

  Args:
    params: the parameter pytree.

  Returns:
    Labels with the structure of ``params``: every leaf of a child holds that child's number.
  """
  paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = [tuple(path) for path, _ in paths]
  depth = 0
  while keys and all(len(k) > depth for k in keys) and len({k[depth] for k in keys}) == 1:
    depth += 1
  order: dict[Any, int] = {}
  for k in keys:
    order.setdefault(k[depth] if len(k) > depth else None, len(order))
  labels = [_label_array(order[k[depth] if len(k) > depth else None]) for k in keys]
  return jax.tree.unflatten(treedef, labels)


def _sharded_dim(spec: PartitionSpec | None, axis_name: str) -> int | None:
  """The dimension a PartitionSpec shards over ``axis_name`` (None: not sharded over it)."""
  for dim, entry in enumerate(spec or ()):
    names = entry if isinstance(entry, tuple) else (entry,)
    if axis_name in names:
      if len(names) > 1:
        raise ValueError(f"a PartitionSpec shards dimension {dim} over {names}; shard_blocks "
                         f"supports a dimension sharded over {axis_name!r} alone.")
      return dim
  return None


def shard_blocks(params: PyTree, specs: PyTree, axis_name: str, axis_size: int,
                 replicated: str = "own") -> PyTree:
  """One block per position along a mesh axis: the entries one device of that axis holds.

  Block m (0 <= m < axis_size) holds, of every leaf whose PartitionSpec shards a dimension over
  ``axis_name``, the slice a device at position m of that axis holds. Leaves not sharded over it
  (replicated along the axis) form one further block, ``axis_size``, when ``replicated="own"``
  (the default: every block then holds parameters of one kind) or join block 0 with
  ``replicated="first"``.

  Args:
    params: the parameter pytree.
    specs: a PartitionSpec (or None, replicated) per leaf of ``params``, same structure.
    axis_name: the mesh axis whose positions are the blocks.
    axis_size: the number of devices along that axis; divides every sharded dimension.
    replicated: ``"own"`` or ``"first"``, where the unsharded leaves go.

  Returns:
    Labels with the structure of ``params``: a sharded leaf's labels have the leaf's rank, size 1
    except along the sharded dimension; an unsharded leaf's label is a scalar.

  Raises:
    ValueError: mismatched structures, a dimension not divisible by ``axis_size``, a dimension
      sharded over several axes, or an unknown ``replicated``.
  """
  if replicated not in REPLICATED:
    raise ValueError(f"replicated must be one of {REPLICATED}, got {replicated!r}.")
  if isinstance(axis_size, bool) or not isinstance(axis_size, int) or axis_size < 1:
    raise ValueError(f"axis_size must be an integer >= 1, got {axis_size!r}.")
  leaves, treedef = jax.tree.flatten(params)
  is_spec = lambda x: x is None or isinstance(x, PartitionSpec)
  spec_leaves, spec_def = jax.tree.flatten(specs, is_leaf=is_spec)
  if len(spec_leaves) != len(leaves) or not all(is_spec(s) for s in spec_leaves):
    raise ValueError(f"specs must hold one PartitionSpec (or None) per parameter leaf: got "
                     f"{spec_def} for parameters {treedef}.")
  rest = axis_size if replicated == "own" else 0
  labels = []
  for leaf, spec in zip(leaves, spec_leaves):
    shape = tuple(np.shape(leaf))
    dim = _sharded_dim(spec, axis_name)
    if dim is None:
      labels.append(_label_array(rest))
      continue
    if dim >= len(shape) or shape[dim] % axis_size:
      raise ValueError(f"a leaf of shape {shape} cannot be split into {axis_size} blocks along "
                       f"dimension {dim} (spec {spec}).")
    ids = np.arange(shape[dim]) // (shape[dim] // axis_size)
    labels.append(ids.astype(np.int32).reshape([-1 if d == dim else 1 for d in range(len(shape))]))
  return jax.tree.unflatten(treedef, labels)


def _check_leaf(label: Any, leaf: Any, where: str) -> np.ndarray:
  """One label leaf as an int32 numpy array, or ValueError naming ``where``."""
  if isinstance(label, jax.core.Tracer):
    raise ValueError(f"param_blocks{where}: labels must be concrete integers (Python ints or "
                     "numpy arrays), not traced values: build them outside jax.jit.")
  array = np.asarray(label)
  if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
    raise ValueError(f"param_blocks{where}: labels must be integers, got dtype {array.dtype}.")
  shape = tuple(np.shape(leaf))
  try:
    broadcast = np.broadcast_shapes(array.shape, shape)
  except ValueError:
    broadcast = None
  if broadcast != shape:
    raise ValueError(f"param_blocks{where}: labels of shape {array.shape} do not broadcast to "
                     f"the parameter's shape {shape}.")
  if array.size and array.min() < 0:
    raise ValueError(f"param_blocks{where}: labels must be >= 0, got {int(array.min())}.")
  return array.astype(np.int32)


def check_name(param_blocks: Any) -> None:
  """Raises ValueError for a string that is not one of the named labellings (``NAMED``)."""
  if isinstance(param_blocks, str) and param_blocks not in NAMED:
    raise ValueError(f"param_blocks must be None, one of {NAMED} or a labels pytree, got "
                     f"{param_blocks!r}.")


def resolve(param_blocks: Any, params: PyTree) -> BlockLabels | None:
  """Checks a labelling against the parameters and counts its blocks (no work on arrays).

  Args:
    param_blocks: None (no parameter blocks), ``"leaves"``, ``"layers"`` or a labels pytree.
    params: the parameter pytree (arrays, tracers or shape-dtype structs: only shapes are read).

  Returns:
    None for None, else the ``BlockLabels``.

  Raises:
    ValueError: an unknown name, labels whose structure differs from the parameters', labels
      that are not integers, negative or not broadcastable, or a block number 0..J-1 with no
      entry.
  """
  if param_blocks is None:
    return None
  if isinstance(param_blocks, str):
    check_name(param_blocks)
    param_blocks = leaf_blocks(params) if param_blocks == "leaves" else layer_blocks(params)
  leaves, treedef = jax.tree.flatten(params)
  label_leaves, label_def = jax.tree.flatten(param_blocks)
  if label_def != treedef:
    raise ValueError(f"param_blocks must have the parameters' structure {treedef}, got "
                     f"{label_def}: one integer label (or integer array) per parameter leaf.")
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  arrays = [_check_leaf(lab, leaf, path) for lab, leaf, path in zip(label_leaves, leaves, paths)]
  used = np.unique(np.concatenate([np.unique(a) for a in arrays]))
  count = int(used[-1]) + 1
  if len(used) != count:
    missing = sorted(set(range(count)) - set(used.tolist()))
    raise ValueError(f"param_blocks: the labels must cover 0..{count - 1} (J = largest label + "
                     f"1 = {count}), but no entry has label(s) {missing[:10]}.")
  sizes = sum(np.bincount(np.broadcast_to(a, np.shape(leaf)).ravel(), minlength=count)
              for a, leaf in zip(arrays, leaves))
  return BlockLabels(jax.tree.unflatten(treedef, arrays), count,
                     tuple(int(s) for s in np.atleast_1d(sizes)))


def mask(tree: PyTree, labels: PyTree, block: jax.Array | int) -> PyTree:
  """``tree`` restricted to one block: its entries there, zeros elsewhere.

  Args:
    tree: a vector like the parameters (a gradient).
    labels: the labels of ``BlockLabels``.
    block: the block number j (an int or an int scalar, possibly traced).

  Returns:
    mask_j * tree, leaf by leaf (exact zeros outside block j).
  """
  return jax.tree.map(lambda x, lab: jnp.where(lab == block, x, jnp.zeros((), x.dtype)),
                      tree, labels)


def count(spec: BlockLabels | None) -> int:
  """J, the number of parameter blocks of a resolved labelling (1 for None)."""
  return 1 if spec is None else spec.count


def share(data_share: int, spec: BlockLabels | None) -> float:
  """What APTS divides the radius by for the local bound: the data share times sqrt(J).

  Steps s_1..s_J with disjoint supports and |s_j| <= B / sqrt(J) concatenate into
  s = sum_j s_j with |s|^2 = sum_j |s_j|^2 <= B^2 (in the D-norm too: D is diagonal), so the
  block steps of one data subdomain together keep its bound B = Delta / ``data_share``.

  Args:
    data_share: N (``combine="sum"``) or 1 (``"mean"``).
    spec: the parameter blocks, or None.

  Returns:
    ``data_share`` itself for None, else ``data_share * sqrt(J)``.
  """
  return data_share if spec is None else data_share * math.sqrt(spec.count)


def divisors(data_share: int, spec: BlockLabels, rule: str = "equal") -> np.ndarray:
  """What APTS divides the radius by for the local bound of each block: ``(J,)``.

  Any bounds B_j with sum_j B_j^2 = B^2 keep the concatenated block steps within
  B = Delta / ``data_share`` (see ``share``). ``"equal"``: B_j = B / sqrt(J), the same length
  for every block. ``"size"``: B_j = B sqrt(n_j / n), the same length per entry (a block of
  1% of the parameters gets 10% of the bound), as a step of length B spread evenly over all
  entries would have.

  Args:
    data_share: N (``combine="sum"``) or 1 (``"mean"``).
    spec: the parameter blocks.
    rule: ``"equal"`` or ``"size"``.

  Returns:
    ``data_share / (B_j / B)`` per block, float64.
  """
  if rule not in BOUNDS:
    raise ValueError(f"block_bound must be one of {BOUNDS}, got {rule!r}.")
  if rule == "equal":
    return np.full(spec.count, data_share * math.sqrt(spec.count))
  sizes = np.asarray(spec.sizes, np.float64)
  return data_share / np.sqrt(sizes / sizes.sum())


def problems(per_subdomain: PyTree, n_local: int, spec: BlockLabels | None
             ) -> tuple[PyTree, Callable[[Any], PyTree], Callable[[Any, PyTree], PyTree] | None]:
  """The local problems of a device's ``n_local`` subdomains, for ``aptsjax.local.run``.

  Args:
    per_subdomain: what the local objective of subdomain i reads, leaves with a leading axis
      ``n_local`` (APTS: the data block and the consistency term r_i).
    n_local: the subdomains of this device.
    spec: the parameter blocks, or None.

  Returns:
    ``(inputs, pick, project)``. None: ``per_subdomain`` itself, the identity and None (one
    problem per subdomain, gradients as they are). With J blocks: ``inputs`` = the pair of
    int32 index arrays (i, j) of the ``n_local * J`` problems, i-major (problem i * J + j),
    ``pick(input)`` = subdomain i's slice of ``per_subdomain``, ``project(input, g)`` = g masked
    to block j.
  """
  if spec is None:
    return per_subdomain, lambda inp: inp, None
  ids = jnp.arange(n_local * spec.count, dtype=jnp.int32)
  inputs = (ids // spec.count, ids % spec.count)
  pick = lambda inp: jax.tree.map(lambda x: x[inp[0]], per_subdomain)
  project = lambda inp, g: mask(g, spec.labels, inp[1])
  return inputs, pick, project
