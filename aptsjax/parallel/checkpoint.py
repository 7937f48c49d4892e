"""Checkpoint and resume of parameters and optimizer state, on one or many processes (orbax).

    aptsjax.checkpoint.save(directory, step, {"params": params, "state": state})
    tree = aptsjax.checkpoint.restore(directory, like={"params": params, "state": state})

Every process calls both, at the same point of the program. Orbax (already a dependency of Flax)
is used rather than ``flax.serialization`` because an APTS state is not replicated: its
per-subdomain leaves (the local L-SR1 memories, N x 2 x memory x n floats) are sharded over the
devices, so a process holds only its own subdomains. Orbax writes each array shard from the
process that owns it and reads it back straight into the target sharding, with no gather to
process 0 and no copy of the full state on any host; replicated leaves (parameters, radius, ...)
are written once. The directory must be visible to every process (a shared file system on a
cluster). Restoring gives bit-identical arrays, so a resumed run continues the same trajectory.
``restore`` first compares the saved tree's metadata (structure, shapes, dtypes) with the tree
it is asked to fill, and a mismatch raises one ``ValueError`` naming every differing leaf and
what to change (the number of subdomains, ``memory``, the model) before anything is read.
"""

from __future__ import annotations

import collections
import os
from typing import Any, NamedTuple

import jax
import numpy as np

from aptsjax.numerics.lsr1 import LSR1State
from aptsjax.optim.protocol import per_subdomain_fields

PyTree = Any

# At most this many leaves are listed in a mismatch error (the rest are counted).
MAX_LISTED = 20


def _manager(directory: str | os.PathLike, max_to_keep: int | None = None,
             existing: bool = False) -> Any:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not existing)
  return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def _abstract(leaf: Any) -> Any:
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf
  return np.asarray(leaf)


def save(directory: str | os.PathLike, step: int, tree: PyTree, *,
         max_to_keep: int | None = None) -> None:
  """Writes ``tree`` as checkpoint ``step`` under ``directory`` and waits until it is complete.

  Args:
    directory: the checkpoint directory (created if missing; shared by all processes).
    step: a non-negative integer naming the checkpoint (e.g. the iteration or epoch).
    tree: a pytree of arrays (jax arrays of any sharding, numpy arrays, scalars).
    max_to_keep: keep only the newest this many checkpoints (default: all).

  Raises:
    ValueError: a negative step, a step that already exists or one below the newest.
  """
  if int(step) < 0:
    raise ValueError(f"step must be non-negative, got {step}")
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  manager = _manager(directory, max_to_keep)
  latest = manager.latest_step()
  problem = (f"checkpoint step {step} already exists in {directory}"
             if int(step) in manager.all_steps() else
             f"checkpoint steps must increase: step {step} after step {latest} in {directory}"
             if latest is not None and int(step) < latest else None)
  if problem is None:
    saved = manager.save(int(step), args=ocp.args.StandardSave(tree))
    manager.wait_until_finished()
    problem = None if saved else f"orbax declined to save step {step} in {directory}"
  manager.close()
  if problem:
    raise ValueError(problem)


def latest_step(directory: str | os.PathLike) -> int | None:
  """The newest complete checkpoint step under ``directory``, or None if there is none."""
  if not os.path.isdir(directory):
    return None
  manager = _manager(directory, existing=True)
  step = manager.latest_step()
  manager.close()
  return step


class _Leaf(NamedTuple):
  """One leaf of a saved or requested tree, as the mismatch check sees it."""
  keys: tuple               # its jax key path
  shape: tuple[int, ...]
  dtype: np.dtype | None    # None: not known (a Python scalar of ``like``): not compared
  per_subdomain: bool       # under a field with a leading subdomain axis (``PER_SUBDOMAIN``)
  stack: str | None         # the field of an L-SR1 memory (``LSR1State``) it belongs to


def _key_name(key: Any) -> str:
  """A path key as orbax names it on disk (namedtuples are stored as dicts of their fields)."""
  for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey / FlattenedIndexKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _written(keys: tuple) -> str:
  """A key path as Python reaches the leaf, the first dictionary key bare: for ``like``,
  ``state.local_state[0].mu['w1']``; for the checkpoint (dicts), ``state['aux']``."""
  text = "".join(str(k) for k in keys)
  if keys and isinstance(keys[0], jax.tree_util.DictKey) and isinstance(keys[0].key, str):
    text = keys[0].key + text[len(str(keys[0])):]
  return text.lstrip(".")


def _is_special(x: Any) -> bool:
  return isinstance(x, LSR1State) or bool(per_subdomain_fields(x))


def _roles(tree: PyTree, per: bool = False) -> list[tuple[bool, str | None]]:
  """``(per_subdomain, L-SR1 field)`` of each leaf of ``tree``, in jax's leaf order."""
  if isinstance(tree, LSR1State):
    return [(per, name) for name, value in tree._asdict().items() for _ in jax.tree.leaves(value)]
  fields = per_subdomain_fields(tree)
  if fields:
    return [role for name, value in tree._asdict().items()
            for role in _roles(value, per or name in fields)]
  nodes = jax.tree.leaves(tree, is_leaf=lambda x: x is not tree and _is_special(x))
  return [role for node in nodes
          for role in (_roles(node, per) if _is_special(node) else [(per, None)])]


def _leaves(tree: PyTree, roles: list[tuple[bool, str | None]] | None = None
            ) -> dict[tuple[str, ...], _Leaf]:
  """The leaves of ``like`` (with their roles) or of a checkpoint's metadata tree, by their
  on-disk path."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  roles = roles if roles is not None else [(False, None)] * len(flat)
  return {tuple(_key_name(k) for k in keys):
          _Leaf(keys, tuple(np.shape(leaf)),
                None if getattr(leaf, "dtype", None) is None else np.dtype(leaf.dtype), per,
                stack)
          for (keys, leaf), (per, stack) in zip(flat, roles)}


def _unmatched(mine: dict[tuple[str, ...], _Leaf], other: dict) -> dict[str, int]:
  """The leaves only ``mine`` has, counted under their shortest path that ``other`` lacks."""
  present = {path[:i] for path in other for i in range(1, len(path) + 1)}
  groups: dict[str, int] = collections.Counter()
  for path, leaf in mine.items():
    if path not in other:
      depth = next(i for i in range(1, len(path) + 1) if path[:i] not in present)
      groups[_written(leaf.keys[:depth])] += 1
  return groups


def _cause(saved: _Leaf, wanted: _Leaf) -> str:
  """What differs between a saved leaf and the requested one: "N", "memory" or "model"."""
  if saved.shape == wanted.shape or len(saved.shape) != len(wanted.shape):
    return "model"
  if wanted.per_subdomain and saved.shape[0] != wanted.shape[0]:
    return "N"
  axis = int(wanted.per_subdomain)
  if wanted.stack is not None and saved.shape[axis] != wanted.shape[axis]:
    return "memory"
  return "model"


def _fix(cause: str, saved: _Leaf, wanted: _Leaf) -> str:
  """What to change, for a leaf that differs by ``cause``."""
  axis = int(wanted.per_subdomain)
  if cause == "N":
    return (f"N: the leaves with a leading subdomain axis were saved for {saved.shape[0]} "
            f"subdomains and `like` has {wanted.shape[0]} (N, or N x J with param_blocks); "
            "build `like` with the num_subdomains (and param_blocks) of the saved run")
  if cause == "memory":
    return (f"memory: the L-SR1 stacks were saved with memory={saved.shape[axis]} and `like` "
            f"has memory={wanted.shape[axis]}; build `like` with memory={saved.shape[axis]}"
            if wanted.stack == "stamp" else
            "memory: the L-SR1 stacks of `like` have another length than the saved ones; "
            "build `like` with the memory of the saved run")
  return ("model: the parameters' shapes or dtypes differ from the saved ones; build `like` "
          "from the model (and dtype) of the saved run")


def _mismatches(stored: dict[tuple[str, ...], _Leaf], requested: dict[tuple[str, ...], _Leaf]
                ) -> list[str]:
  """The lines of a mismatch error (empty when the trees match): one per differing leaf (or
  subtree only one side has), at most ``MAX_LISTED``, then what to change."""
  lines, fixes = [], {}
  for path, wanted in requested.items():
    saved = stored.get(path)
    if saved is None or (saved.shape == wanted.shape and
                         (None in (wanted.dtype, saved.dtype) or wanted.dtype == saved.dtype)):
      continue
    cause = _cause(saved, wanted)
    lines.append(f"  {_written(wanted.keys)}: stored {saved.shape} {saved.dtype}, requested "
                 f"{wanted.shape} {wanted.dtype or 'scalar'} ({cause})")
    if cause not in fixes or wanted.stack == "stamp":
      fixes[cause] = _fix(cause, saved, wanted)
  sides = {"in `like` but not in the checkpoint": (requested, stored),
           "in the checkpoint but not in `like`": (stored, requested)}
  for where, (mine, other) in sides.items():
    for name, count in _unmatched(mine, other).items():
      lines.append(f"  {name} ({count} {'leaves' if count > 1 else 'leaf'}): {where}")
      fixes["structure"] = ("structure: `like` was built with other options than the saved "
                            "tree (second_order, norm, local_solver, has_aux, param_blocks) or "
                            "for another model; build it as the saved run did")
  if not lines:
    return []
  more = [f"  ... and {len(lines) - MAX_LISTED} more"] if len(lines) > MAX_LISTED else []
  return lines[:MAX_LISTED] + more + ["What to change:"] + [f"  * {f}" for f in fixes.values()]


def restore(directory: str | os.PathLike, like: PyTree, step: int | None = None) -> PyTree:
  """Reads a checkpoint into the structure, shapes, dtypes and shardings of ``like``.

  The saved tree's metadata (structure, shapes, dtypes; no array is read) is compared with
  ``like`` first, and a mismatch raises before anything is restored.

  Args:
    directory: the checkpoint directory.
    like: a pytree like the saved one (e.g. a fresh ``trainer.init(params)`` state and
      ``trainer.replicate(params)``); jax arrays give their sharding, so per-subdomain leaves
      come back sharded over the same devices. ``jax.ShapeDtypeStruct`` leaves work too.
    step: the checkpoint to read (default: the newest).

  Returns:
    The restored pytree, with the structure of ``like``.

  Raises:
    FileNotFoundError: no checkpoint (or not that step) under ``directory``.
    ValueError: the saved tree does not match ``like``: the message names every differing
      leaf path with its stored and requested shape and dtype, or the subtrees only one side
      has, and what to change (the number of subdomains N, ``memory``, the model, options).
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint directory {directory}")
  manager = _manager(directory, existing=True)
  step = manager.latest_step() if step is None else int(step)
  if step is None or step not in manager.all_steps():
    manager.close()
    raise FileNotFoundError(f"no checkpoint {'' if step is None else step} in {directory}")
  try:
    metadata = manager.metadata(step).item_metadata  # shapes and dtypes; no array is read
    problems = [] if metadata is None else _mismatches(_leaves(metadata.tree),
                                                       _leaves(like, _roles(like)))
    if not problems:
      restored = manager.restore(
          step, args=ocp.args.StandardRestore(jax.tree.map(_abstract, like)))
  except (ValueError, KeyError, TypeError) as error:
    raise ValueError(f"checkpoint {step} in {directory} does not match `like`: {error}"
                     ) from error
  finally:
    manager.close()
  if problems:
    raise ValueError(f"checkpoint {step} in {directory} does not match `like` (nothing was "
                     "restored):\n" + "\n".join(problems))
  return jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(restored))
