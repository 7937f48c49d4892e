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
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

PyTree = Any


def _manager(directory: str | os.PathLike, max_to_keep: int | None = None,
             existing: bool = False) -> Any:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not existing)
  return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options)


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


def restore(directory: str | os.PathLike, like: PyTree, step: int | None = None) -> PyTree:
  """Reads a checkpoint into the structure, shapes, dtypes and shardings of ``like``.

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
    ValueError: the saved tree does not match ``like``.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint directory {directory}")
  manager = _manager(directory, existing=True)
  step = manager.latest_step() if step is None else int(step)
  if step is None or step not in manager.all_steps():
    manager.close()
    raise FileNotFoundError(f"no checkpoint {'' if step is None else step} in {directory}")
  target = jax.tree.map(_abstract, like)
  try:
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  except (ValueError, KeyError, TypeError) as error:
    raise ValueError(f"checkpoint {step} in {directory} does not match the given tree: "
                     f"{error}") from error
  finally:
    manager.close()
  leaves = jax.tree.leaves(restored)
  for got, want in zip(leaves, jax.tree.leaves(target)):
    if (np.shape(got), np.dtype(got.dtype)) != (np.shape(want), np.dtype(want.dtype)):
      raise ValueError(f"checkpoint {step} in {directory} does not match the given tree: a leaf "
                       f"of shape {np.shape(got)} {got.dtype}, expected {np.shape(want)} "
                       f"{want.dtype}")
  return jax.tree.unflatten(jax.tree.structure(like), leaves)
