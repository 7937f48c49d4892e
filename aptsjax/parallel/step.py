"""Wrappers of the jitted APTS train step (``aptsjax.parallel.apts_trainer``).

Reporting an update skipped for a non-finite loss or gradient (``on_nonfinite``), and donation
of the params and state a step is given (their buffers are reused for the results).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


NONFINITE_ACTIONS = ("warn", "raise", "ignore")


def _nonfinite_message(iteration: int) -> str:
  return (f"APTS update {iteration} (state.iteration = {iteration}): the loss or gradient at the "
          "current parameters is not finite, so the update was skipped: params and state are "
          "unchanged apart from state.iteration and state.nonfinite. Likely NaN/Inf in the "
          "batch or in the loss (e.g. a log of 0 or an overflow).")


def _warn_nonfinite(iteration: Any) -> None:
  warnings.warn(_nonfinite_message(int(iteration)), RuntimeWarning, stacklevel=2)


def report_nonfinite(state: NamedTuple) -> None:
  """Inside the jitted step: a host callback issuing the RuntimeWarning, only for a skipped update.

  Outside ``shard_map`` the callback runs once, on the host of the mesh's first device (process
  0), asynchronously: the step does not wait for the host.
  """
  jax.lax.cond(state.nonfinite, lambda i: jax.debug.callback(_warn_nonfinite, i),
               lambda i: None, state.iteration)


def raise_nonfinite(step: Callable[..., tuple[PyTree, NamedTuple]]
                     ) -> Callable[..., tuple[PyTree, NamedTuple]]:
  """``step`` followed by a host check raising FloatingPointError for a skipped update."""
  def checked(params, state, batch):
    params, state = step(params, state, batch)
    if bool(np.asarray(state.nonfinite)):  # waits for the step: the opt-in cost of "raise"
      raise FloatingPointError(_nonfinite_message(int(np.asarray(state.iteration))))
    return params, state

  checked.lower = step.lower
  return checked


def _buffer(x: Any) -> Any:
  """What identifies ``x``'s memory: its first device buffer (the object itself for tracers)."""
  try:
    return x.addressable_data(0).unsafe_buffer_pointer()
  except Exception:  # pylint: disable=broad-exception-caught  (tracers, host arrays)
    return id(x)


def distinct(tree: PyTree) -> PyTree:
  """``tree`` with every array that shares its buffer with an earlier leaf copied.

  A donated argument may not hold the same buffer twice; states built eagerly can (one array
  of zeros for several fields, which ``jax.device_put`` places once). ``init`` and ``step``
  apply it, so any state works.
  """
  seen: set[Any] = set()

  def fresh(x):
    if not isinstance(x, jax.Array):
      return x
    key = _buffer(x)
    if key in seen:
      return jnp.copy(x)
    seen.add(key)
    return x

  return jax.tree.map(fresh, tree)


def donating(step: Callable[..., tuple[PyTree, NamedTuple]]
              ) -> Callable[..., tuple[PyTree, NamedTuple]]:
  """``step`` (jitted, donating its params and state) with ``distinct`` applied to them first."""
  def run(params, state, batch):
    params, state = distinct((params, state))
    return step(params, state, batch)

  run.lower = step.lower
  return run
