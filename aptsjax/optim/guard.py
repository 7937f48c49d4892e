"""The start and the end of an update, shared by ``trust_region`` and ``apts``.

Both methods begin the same way: cast the gradient to the parameters' dtypes, decide whether the
update may run (the loss and gradient at the current point are finite), and with
``norm="rms"`` move to the scaled variables u = D theta (``aptsjax.numerics.scaling``). Both end
the same way: when the update could not run, every field of the state keeps its old value (the
update is a no-op: zero updates, ``nonfinite`` set), otherwise the new values are taken. This
module is that one path, so that the two methods cannot drift apart.

A skipped update is reported from here too: ``report_nonfinite`` issues a ``RuntimeWarning``
from a host callback inside a jitted update, used by ``warn_on_skip`` (a user's own loop) and by
the trainer's ``on_nonfinite="warn"`` (``aptsjax.parallel.step``).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from aptsjax.numerics import lsr1
from aptsjax.numerics import scaling
from aptsjax.numerics import tree as tree_lib
from aptsjax.optim.config import TrustRegionConfig

PyTree = Any


class Start(NamedTuple):
  """What an update knows before it takes a step.

  Attributes:
    ok: whether the loss and gradient at the current point are finite (else: a no-op).
    grad: the gradient, cast to the parameters' dtypes.
    scaling: the new diagonal scaling (``norm="rms"``), or None.
    coords: the change of variables to u = D theta (the identity for ``norm="l2"``).
    ratio: D_old / D_new, to move memories to the new variables; None for ``norm="l2"``.
  """
  ok: jax.Array
  grad: PyTree
  scaling: scaling.ScaleState | None
  coords: scaling.Coordinates
  ratio: PyTree | None


def start(value: jax.Array, grads: PyTree, params: PyTree, scale: scaling.ScaleState | None,
          cfg: TrustRegionConfig) -> Start:
  """The guard and the coordinates of one update.

  Args:
    value: the loss at ``params`` (already in the parameters' dtype).
    grads: its gradient.
    params: the current parameters.
    scale: the state's scaling (``norm="rms"``) or None.
    cfg: the trust region (reads ``norm``, ``rms_decay``, ``rms_eps``).

  Returns:
    A ``Start``; the scaling is updated only when ``ok`` (``scaling.update(valid=ok)``).
  """
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  ok = jnp.isfinite(value) & tree_lib.all_finite(grads)
  ratio = None
  if cfg.norm == "rms":
    new = scaling.update(scale, grads, cfg.rms_decay, cfg.rms_eps, valid=ok)
    ratio, scale = scaling.ratio(scale, new), new
  return Start(ok=ok, grad=grads, scaling=scale, coords=scaling.coordinates(scale), ratio=ratio)


def rescale_memory(memory: lsr1.LSR1State | None, ratio: PyTree | None
                   ) -> lsr1.LSR1State | None:
  """An L-SR1 memory moved to the new scaled variables (unchanged without a memory or ratio)."""
  if memory is None or ratio is None:
    return memory
  return lsr1.rescale(memory, ratio)


def keep(ok: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """``new`` where the update ran, else ``old`` (tree-wide, one ``jnp.where`` per leaf)."""
  return optax.tree.where(ok, new, old)


def updates_if(flag: jax.Array, updates: PyTree) -> PyTree:
  """``updates`` where ``flag``, zeros otherwise (a rejected or skipped step moves nothing)."""
  return optax.tree.where(flag, updates, optax.tree.zeros_like(updates))


def previous_aux(state: NamedTuple, aux: PyTree) -> PyTree:
  """What a skipped update keeps as the aux: the state's (like ``value``), or ``aux`` (at the
  current parameters) before the first update has set one."""
  return aux if state.aux is None else state.aux


class Outcome(NamedTuple):
  """The fields every optimizer state shares, as an update produced them (before the guard)."""
  radius: jax.Array
  value: jax.Array
  grad: PyTree
  accepted: jax.Array
  stalled: jax.Array
  predicted_reduction: jax.Array
  actual_reduction: jax.Array


def finish(ok: jax.Array, new: Outcome, state: NamedTuple) -> dict[str, Any]:
  """The shared fields of the next state: ``new`` if the update ran, else the old values.

  A skipped update keeps the radius, loss and gradient, clears the flags and the reductions,
  sets ``nonfinite`` and counts the iteration.

  Args:
    ok: whether the update ran (``Start.ok``).
    new: what the update produced.
    state: the state before the update (a NamedTuple with the ``Outcome`` fields and
      ``iteration``).

  Returns:
    The keyword arguments of the shared fields, to complete with the method's own.
  """
  dtype = state.radius.dtype
  return dict(
      radius=keep(ok, new.radius, state.radius), value=jnp.where(ok, new.value, state.value),
      grad=keep(ok, new.grad, state.grad), accepted=ok & new.accepted,
      stalled=ok & new.stalled, nonfinite=~ok, iteration=state.iteration + 1,
      predicted_reduction=jnp.where(ok, new.predicted_reduction, 0.0).astype(dtype),
      actual_reduction=jnp.where(ok, new.actual_reduction, 0.0).astype(dtype))


def _has_flags(x: Any) -> bool:
  return hasattr(x, "_fields") and "nonfinite" in x._fields and "iteration" in x._fields


def flagged_state(state: Any) -> NamedTuple:
  """The aptsjax state inside ``state``: itself, or the one inside an ``optax.chain`` state.

  Raises:
    ValueError: ``state`` holds no state with ``nonfinite`` and ``iteration`` fields, or
      several.
  """
  found = [x for x in jax.tree.leaves(state, is_leaf=_has_flags) if _has_flags(x)]
  if len(found) != 1:
    raise ValueError(f"expected one aptsjax state (with fields 'nonfinite' and 'iteration', "
                     f"as aptsjax.trust_region and aptsjax.apts keep) in the optimizer state, "
                     f"found {len(found)}.")
  return found[0]


def nonfinite_message(iteration: int, method: str = "APTS") -> str:
  """The text of the warning (or error) for a skipped update."""
  return (f"{method} update {iteration} (state.iteration = {iteration}): the loss or gradient "
          "at the current parameters is not finite, so the update was skipped: params and state "
          "are unchanged apart from state.iteration and state.nonfinite. Likely NaN/Inf in the "
          "batch or in the loss (e.g. a log of 0 or an overflow).")


def _warn_nonfinite(iteration: Any, method: str) -> None:
  warnings.warn(nonfinite_message(int(iteration), method), RuntimeWarning, stacklevel=2)


def report_nonfinite(state: Any) -> None:
  """Inside a jitted update: a host callback issuing the ``RuntimeWarning`` of
  ``nonfinite_message``, only when the update was skipped (``state.nonfinite``).

  Asynchronous: nothing waits for the host (``jax.effects_barrier()`` does). Outside
  ``shard_map`` the callback runs once, on the host of the first device (process 0).

  Args:
    state: the state after the update: an aptsjax state or an ``optax.chain`` state holding
      one (see ``flagged_state``); the warning names it ("APTS", "TrustRegion").
  """
  found = flagged_state(state)
  warn = functools.partial(_warn_nonfinite, method=type(found).__name__.removesuffix("State"))
  jax.lax.cond(found.nonfinite, lambda i: jax.debug.callback(warn, i), lambda i: None,
               found.iteration)


def warn_on_skip(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``tx`` whose ``update`` also warns when it skipped an update, for a user's own jitted loop.

  ``aptsjax.trust_region`` and ``aptsjax.apts`` skip an update whose loss or gradient at the
  current parameters is not finite and only set ``state.nonfinite``. Wrapped, the update also
  issues a ``RuntimeWarning`` naming the iteration (``report_nonfinite``: a host callback run
  only for a skipped update, under ``jax.jit`` too, with no host sync)::

      tx = aptsjax.warn_on_skip(aptsjax.trust_region(loss_fn))

  The state is ``tx``'s own, unchanged; ``tx`` may be an ``optax.chain`` holding one aptsjax
  transformation. Call ``jax.effects_barrier()`` to wait for pending warnings.

  Args:
    tx: an aptsjax transformation, or a chain holding one.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``tx``'s ``init`` and state.
  """
  tx = optax.with_extra_args_support(tx)

  def update_fn(updates, state, params=None, **extra_args):
    updates, state = tx.update(updates, state, params, **extra_args)
    report_nonfinite(state)
    return updates, state

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)
