"""Outer momentum for APTS (``APTSConfig.outer_momentum``; docs/method.md, "Outer momentum").

Local SGD and DiLoCo move the global parameters by a momentum of the averaged local progress.
APTS can do the same without an outer learning rate: with mu = ``outer_momentum`` > 0 the step
judged by the global test is

  p = s~ + c mu m,   c = min(1, (Delta^k - |s~|) / |mu m|),

where m is the last accepted APTS step (zero after a rejection, and at the start), so that
|p| <= Delta^k, the region still bounds every step. Its predicted reduction is the one of (6)
with each subdomain moved by the same extrapolation: sum_i w (f_i(theta^k) - f_i(theta_i +
c mu m)), one more evaluation of every local objective on the exchange's data (a forward pass,
no communication). Accepted, p becomes the next m; rejected, m restarts at zero and the radius
shrinks as for any rejected step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from aptsjax.numerics import tree as tree_lib
from aptsjax.optim.apts_stages import Combined
from aptsjax.optim.apts_stages import LocalPhase
from aptsjax.optim.apts_stages import Subdomains
from aptsjax.optim.radius import reaches_boundary

PyTree = Any


def extrapolate(sub: Subdomains, phase: LocalPhase, combined: Combined, momentum: PyTree,
                radius: jax.Array, mu: float, weight: float) -> Combined:
  """The combined step with the outer momentum and its predicted reduction.

  Args:
    sub: the subdomains.
    phase: the local phase (its ``end_values`` evaluates the local objectives).
    combined: s~ and its predicted reduction (``apts_stages.combine``).
    momentum: m, the last accepted APTS step (in the local phase's variables).
    radius: Delta^k.
    mu: the momentum factor, in (0, 1).
    weight: 1 (``combine="sum"``) or 1 / N (``"mean"``).

  Returns:
    The ``Combined`` of p = s~ + c mu m.
  """
  m = optax.tree.scale(mu, momentum)
  room = jnp.maximum(radius - tree_lib.norm(combined.step), 0.0)
  m_norm = tree_lib.norm(m)
  c = jnp.where(m_norm > room, room / jnp.where(m_norm > 0, m_norm, 1.0), 1.0)
  shift = jax.tree.map(lambda x, s: (c * x).astype(s.dtype), m, combined.step)
  moved = jax.tree.map(lambda p, d: p + d[None], phase.outcome.params, shift)
  ends = phase.end_values(moved)
  good = jnp.isfinite(ends) & jnp.isfinite(phase.start_losses)
  decrease = jnp.where(good, weight * (phase.start_losses - ends), 0.0)
  step = optax.tree.add(combined.step, shift)
  return Combined(step=step, predicted=sub.total(decrease).astype(sub.dtype),
                  on_boundary=reaches_boundary(tree_lib.norm(step).astype(sub.dtype), radius))
