"""Shardings of optimizer states on a (data x model) mesh.

Every aptsjax state is built from the parameters: a gradient or a step has the parameters'
pytree structure, an L-SR1 stack adds a leading memory axis, and the per-subdomain states of
``aptsjax.apts`` add a leading subdomain axis in front. So once the parameters' own
PartitionSpecs are known (from their NamedShardings, or from Flax NNX partitioning metadata),
the spec of every state leaf follows:

* a leaf inside a sub-pytree shaped like the parameters gets ``(lead..., *param_spec)``, where
  ``lead`` is one entry per extra leading axis: the data axis for the subdomain axis of a
  per-subdomain field (``aptsjax.optim.protocol.per_subdomain_fields``), None for a memory axis;
* any other leaf (a radius, a k-by-k Gram matrix, a counter) is replicated, or sharded over the
  data axis on its leading axis when it is per-subdomain.

With these shardings an optimizer state costs each device the share of the parameters it holds:
about 1/M of the replicated state on a model axis of size M (docs/guides/meshes.md).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from aptsjax.optim.protocol import per_subdomain_fields

PyTree = Any


def _is_spec(x: Any) -> bool:
  return isinstance(x, P)


def full_spec(spec: P | None, ndim: int) -> tuple:
  """The entries of ``spec`` padded with None to ``ndim`` (one per dimension).

  Raises:
    ValueError: ``spec`` has more entries than the array has dimensions.
  """
  entries = tuple(spec) if spec is not None else ()
  if len(entries) > ndim:
    raise ValueError(f"PartitionSpec {spec} has {len(entries)} entries for an array of rank {ndim}.")
  return entries + (None,) * (ndim - len(entries))


def _variable_spec(x: Any) -> P | None:
  """The PartitionSpec of a Flax NNX Variable's partitioning metadata (None if it has none)."""
  get = getattr(x, "get_metadata", None)
  if get is None:
    return None
  names = get().get("out_sharding")
  return P(*names) if names else None


def _is_variable(x: Any) -> bool:
  return hasattr(x, "get_metadata") and hasattr(x, "get_value")


def pure(params: PyTree) -> PyTree:
  """``params`` with every Flax NNX Variable replaced by its value (other leaves unchanged)."""
  return jax.tree.map(lambda x: x.get_value() if _is_variable(x) else x, params,
                      is_leaf=_is_variable)


def param_specs(params: PyTree) -> PyTree:
  """The PartitionSpec of every parameter leaf, one entry per dimension.

  Read, per leaf, from (in this order) a Flax NNX Variable's ``out_sharding`` metadata (what
  ``nnx.with_partitioning`` sets), a ``jax.Array`` or ``jax.ShapeDtypeStruct`` with a
  ``NamedSharding``, or else replicated (``P()``).

  Args:
    params: the parameters: arrays, shape structs or an ``nnx.State`` of Variables.

  Returns:
    A pytree of ``PartitionSpec`` with the structure of the pure parameters (Variables
    unwrapped), each as long as its leaf's rank.
  """
  def spec(x):
    value = x.get_value() if _is_variable(x) else x
    ndim = len(np.shape(value))
    found = _variable_spec(x) if _is_variable(x) else None
    sharding = getattr(value, "sharding", None)
    if found is None and isinstance(sharding, NamedSharding):
      found = sharding.spec
    return P(*full_spec(found, ndim))

  return jax.tree.map(spec, params, is_leaf=_is_variable)


def check_specs(specs: PyTree, params: PyTree, mesh: jax.sharding.Mesh,
                allowed: tuple[str, ...]) -> None:
  """Raises ValueError unless every spec fits its parameter on ``mesh``.

  Args:
    specs: one PartitionSpec per parameter leaf.
    params: the parameters (arrays or shape structs).
    mesh: the mesh the specs refer to.
    allowed: the mesh axes parameters may be sharded over (the model axis; never the data axis,
      over which APTS replicates the parameters).
  """
  flat_specs = jax.tree.leaves(specs, is_leaf=_is_spec)
  flat_params = jax.tree.leaves(params)
  if len(flat_specs) != len(flat_params):
    raise ValueError(f"{len(flat_specs)} PartitionSpecs for {len(flat_params)} parameter leaves.")
  for spec, leaf in zip(flat_specs, flat_params):
    shape = np.shape(leaf)
    for dim, entry in zip(shape, full_spec(spec, len(shape))):
      axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
      bad = [a for a in axes if a not in allowed]
      if bad:
        raise ValueError(f"a parameter of shape {shape} is sharded over {bad} ({spec}); "
                         f"parameters may only be sharded over {list(allowed)}.")
      size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
      if dim % size:
        raise ValueError(f"a parameter of shape {shape} cannot be sharded as {spec}: dimension "
                         f"{dim} is not divisible by the {size} devices of {list(axes)}.")


def _matches(node: Any, treedef: Any, shapes: list) -> bool:
  if jax.tree.structure(node) != treedef:
    return False
  leaves = jax.tree.leaves(node)
  return all(len(np.shape(x)) >= len(s) and tuple(np.shape(x))[len(np.shape(x)) - len(s):] == s
             for x, s in zip(leaves, shapes))


def state_specs(state: NamedTuple, axis_name: str = "data", params: PyTree | None = None,
                specs: PyTree | None = None) -> NamedTuple:
  """PartitionSpecs for an aptsjax state over the data axis and, given the params, the model axis.

  Without ``params``: P(axis_name) on per-subdomain leaves, P() on the rest (a 1-D data mesh).
  With ``params``: every leaf inside a sub-pytree shaped like the parameters also carries the
  parameter's own spec on its trailing dimensions (see the module docstring). This is what
  ``jax.shard_map`` takes as the state's in_specs/out_specs (the data-axis part; on a mesh whose
  model axis is automatic, pass ``state_specs(state, axis_name)`` there and place the state with
  ``state_shardings``), and what a ``NamedSharding`` for checkpointing uses.

  Args:
    state: an aptsjax state (``APTSState``, ``TrustRegionState``, ...) or its shape structs
      (``jax.eval_shape(tx.init, params)``).
    axis_name: the data axis.
    params: the parameters (arrays or shape structs), to recognise parameter-shaped leaves.
    specs: their PartitionSpecs; default ``param_specs(params)``.

  Returns:
    A state of PartitionSpecs.
  """
  per = per_subdomain_fields(state)
  if params is None:
    return type(state)(**{
        name: jax.tree.map(lambda _, s=P(axis_name) if name in per else P(): s, value)
        for name, value in state._asdict().items()})
  specs = param_specs(params) if specs is None else specs
  treedef = jax.tree.structure(params)
  shapes = [tuple(np.shape(x)) for x in jax.tree.leaves(params)]
  flat_specs = [full_spec(s, len(shape))
                for s, shape in zip(jax.tree.leaves(specs, is_leaf=_is_spec), shapes)]

  def field(name: str, value: PyTree) -> PyTree:
    first = (axis_name,) if name in per else ()

    def lead(n):  # one entry per leading axis: the data axis first for per-subdomain leaves
      return (first + (None,) * n)[:n]

    def leaf(x):
      return P(axis_name) if first and np.ndim(x) else P()

    def node(x):
      if not _matches(x, treedef, shapes):
        return leaf(x)
      leaves = jax.tree.leaves(x)
      out = [P(*lead(len(np.shape(v)) - len(s)), *s) for v, s in zip(leaves, flat_specs)]
      return jax.tree.unflatten(treedef, out)

    return jax.tree.map(node, value, is_leaf=lambda x: _matches(x, treedef, shapes))

  return type(state)(**{name: field(name, value) for name, value in state._asdict().items()})


def output_specs(state: NamedTuple, specs: NamedTuple, axis_name: str,
                 leaf: Any = None) -> NamedTuple:
  """``specs`` of a state for what an update returns: a per-subdomain field that holds nothing
  yet (None, e.g. the aux of ``has_aux`` before the first update) gets ``P(axis_name)`` (or
  ``leaf``) as a prefix of whatever the update puts there.

  Args:
    state: the state going in.
    specs: its specs (or shardings), from ``state_specs``.
    axis_name: the data axis.
    leaf: what to put for such a field (default ``P(axis_name)``; a NamedSharding for
      ``jax.jit``'s ``out_shardings``).
  """
  empty = {n: P(axis_name) if leaf is None else leaf
           for n in per_subdomain_fields(state) if getattr(state, n) is None}
  return specs._replace(**empty)


def shardings(specs: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
  """``NamedSharding(mesh, spec)`` for every PartitionSpec of ``specs``."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)
