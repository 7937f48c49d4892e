"""The start and the end of an update, shared by ``trust_region`` and ``apts``.

Both methods begin the same way: cast the gradient to the parameters' dtypes, decide whether the
update may run (the loss and gradient at the current point are finite), and with
``norm="rms"`` move to the scaled variables u = D theta (``aptsjax.numerics.scaling``). Both end
the same way: when the update could not run, every field of the state keeps its old value (the
update is a no-op: zero updates, ``nonfinite`` set), otherwise the new values are taken. This
module is that one path, so that the two methods cannot drift apart.
"""

from __future__ import annotations

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
