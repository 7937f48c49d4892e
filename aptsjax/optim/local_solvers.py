"""The local solvers of APTS: the paper's local trust region, Adam's direction with the local
trust region's length (no learning rate), any optax optimizer projected into the local region,
and the choice among them (``solver_for``).

Each is a ``aptsjax.optim.local.LocalSolver``: one masked iteration of one subdomain at a time,
run by ``aptsjax.optim.local.run``. The trust-region solvers carry (gradient, local radius) as
their per-update ``extra``; where the local radius starts each update is ``local_radius``
(``radius_start``, and ``carried`` for ``"carry"``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from aptsjax.numerics import tree as _stack
from aptsjax.numerics import lsr1
from aptsjax.optim import trust_region as tr
from aptsjax.optim.config import APTSConfig
from aptsjax.optim.config import TrustRegionConfig
from aptsjax.optim.local import LOCAL_STOP
from aptsjax.optim.local import LocalCarry
from aptsjax.optim.local import LocalSolver
from aptsjax.optim.local import distance
from aptsjax.optim.local import keep_inactive

PyTree = Any


def trust_region_local_solver(cfg: TrustRegionConfig, second_order: bool, memory: int,
                              local_steps: int = 1, local_radius: str = "bound") -> LocalSolver:
  """The library's TR as the local solver (docs/method.md, "Local iterations").

  Each step is ``aptsjax.trust_region.iterate`` with the radius min(local radius,
  bound - |theta_i - theta^k|); it reports ``done`` once |theta_i - theta^k| >=
  (1 - 1e-3) bound. Every update the local radius starts at ``bound`` (``local_radius =
  "bound"``, the paper) or at ``bound / local_steps`` (``"split"``), then follows the TR rules
  of ``cfg`` (growth capped by ``cfg.max_radius``).

  Args:
    cfg: the local constants (radii already divided by N).
    second_order: L-SR1 + OBS (True) or the first-order model.
    memory: L-SR1 pairs per subdomain.
    local_steps: nu, the most local iterations (read by ``local_radius="split"``).
    local_radius: ``"bound"`` or ``"split"`` (``APTSConfig.local_radius``).

  Returns:
    A ``LocalSolver`` whose state is the subdomain's L-SR1 memory (None for first order) and
    whose ``extra`` is (gradient, local radius).
  """
  def init(params):
    return lsr1.init(params, memory) if second_order else None

  def step(value_and_grad, carry, anchor, bound, active):
    grad, radius = carry.extra
    out = tr.iterate(value_and_grad, carry.params, carry.loss, grad, radius, carry.state, cfg,
                     step_cap=bound - distance(carry.params, anchor), store_pair=active)
    params, loss, grad, radius = keep_inactive(
        active, (out.params, out.loss, out.grad, out.radius), (carry.params, carry.loss, grad, radius))
    done = distance(params, anchor) >= (1.0 - LOCAL_STOP) * bound
    return LocalCarry(params=params, loss=loss, state=out.memory, extra=(grad, radius)), done

  def rescale(state, ratio):
    return lsr1.rescale(state, ratio) if second_order else state

  return LocalSolver(init=init, start=radius_start(cfg, local_steps, local_radius), step=step,
                     rescale=rescale, refresh=refresh_gradient)


def refresh_gradient(carry: LocalCarry, loss: jax.Array, grad: PyTree) -> LocalCarry:
  """``LocalSolver.refresh`` of the solvers whose ``extra`` is (gradient, local radius)."""
  return carry._replace(loss=loss, extra=(grad, carry.extra[1]))


def radius_start(cfg: TrustRegionConfig, local_steps: int, local_radius: str
                 ) -> Callable[..., LocalCarry]:
  """A ``LocalSolver.start`` whose ``extra`` is (gradient, local radius): the radius starts at
  the bound (``"bound"``), or (``"split"``) at bound / nu but never below the local floor (a
  rejection must not grow it)."""
  def start(params, loss, grad, state, bound):
    radius = bound
    if local_radius in ("split", "carry"):   # "carry": its first update, see ``carried``
      radius = jnp.minimum(bound, jnp.maximum(bound / local_steps, cfg.min_radius))
    return LocalCarry(params=params, loss=loss, state=state, extra=(grad, radius))
  return start


def adam_trust_region_local_solver(cfg: TrustRegionConfig, local_steps: int = 1,
                                   local_radius: str = "bound", b1: float = 0.9,
                                   b2: float = 0.999, eps: float = 1e-8) -> LocalSolver:
  """Adam's direction with the local trust region's length: a local solver with no learning rate.

  Each local iteration takes Adam's direction d = m_hat / (sqrt(v_hat) + eps) (the moments of
  ``optax.scale_by_adam``, advanced by the gradient at the current point, persistent across
  updates) and the step s = -r d / |d| of length r = min(local radius, room left in the local
  bound). The step is judged by the local ratio test against the linear model, predicted
  reduction -g.s (``trust_region.commit``), and the local radius follows the rules (7) of
  ``cfg``; a rejected step keeps the point and shrinks the radius. ``done`` once
  |theta_i - theta^k| >= (1 - 1e-3) bound or the loss stops being finite.

  Args:
    cfg: the local constants (radii already divided by the share of the bound).
    local_steps: nu (read by ``local_radius="split"``).
    local_radius: ``"bound"`` or ``"split"``, as for ``trust_region_local_solver``.
    b1: Adam's first-moment decay (optax's default).
    b2: Adam's second-moment decay (optax's default).
    eps: Adam's epsilon (optax's default).

  Returns:
    A ``LocalSolver`` whose state is Adam's (mu, nu, count) and whose ``extra`` is (gradient,
    local radius).
  """
  adam = optax.scale_by_adam(b1, b2, eps)

  def step(value_and_grad, carry, anchor, bound, active):
    grad, radius = carry.extra
    direction, moments = adam.update(grad, carry.state)
    length = jnp.minimum(radius, bound - distance(carry.params, anchor))
    norm = _stack.norm(direction)
    scale = -length / jnp.where(norm > 0, norm, 1.0)
    trial_step = jax.tree.map(lambda d, p: (scale * d).astype(p.dtype), direction, carry.params)
    predicted = -_stack.vdot(grad, trial_step).astype(carry.loss.dtype)
    loss_t, grad_t = value_and_grad(optax.apply_updates(carry.params, trial_step))
    trial = tr.Trial(trial_step, predicted, loss_t, grad_t,
                     on_boundary=length >= (1.0 - LOCAL_STOP) * radius)
    out = tr.commit(carry.params, carry.loss, grad, radius, None, trial, cfg)
    new = LocalCarry(params=out.params, loss=out.loss, state=moments,
                     extra=(out.grad, out.radius))
    carry = keep_inactive(active, new, carry)
    done = ((distance(carry.params, anchor) >= (1.0 - LOCAL_STOP) * bound)
            | ~jnp.isfinite(carry.loss))
    return carry, done

  return LocalSolver(init=adam.init, start=radius_start(cfg, local_steps, local_radius),
                     step=step, refresh=refresh_gradient)


def optax_local_solver(tx: optax.GradientTransformation) -> LocalSolver:
  """Any optax optimizer as the APTS local solver: its steps, projected into the local region.

  Each local iteration is one ``tx.update`` with the local gradient, then the projection of
  the new point onto the local region |theta_i - theta^k| <= bound (the step from theta^k
  rescaled when it is longer), then one evaluation of the local objective there. The
  optimizer's state (Adam's moments, a momentum, ...) is the subdomain's persistent state,
  carried from one APTS update to the next. APTS then judges the sum or the mean of the
  subdomains' steps (``combine``) by its global trust-region test: this makes APTS a
  trust-region-globalised local SGD or Adam, with
  the optimizer's learning rate bounded by the region. A subdomain stops early when it reaches
  the boundary or its loss stops being finite (its contribution is then dropped by APTS).

  With ``norm="rms"`` the optimizer sees the scaled variables u = D theta and their gradient
  D^{-1} g, and its state is not rescaled when D changes (``rescale`` is None).

  Args:
    tx: an optax ``GradientTransformation`` (its ``update`` is called with params).

  Returns:
    A ``LocalSolver`` whose state is ``tx``'s state and whose ``extra`` is the local gradient.
  """
  def start(params, loss, grad, state, bound):
    del bound
    return LocalCarry(params=params, loss=loss, state=state, extra=grad)

  def step(value_and_grad, carry, anchor, bound, active):
    updates, opt_state = tx.update(carry.extra, carry.state, carry.params)
    delta = optax.tree.sub(optax.apply_updates(carry.params, updates), anchor)
    length = _stack.norm(delta).astype(carry.loss.dtype)
    shrink = jnp.where(length > bound, bound / jnp.where(length > 0, length, 1.0), 1.0)
    params = jax.tree.map(lambda a, x: a + (shrink * x).astype(a.dtype), anchor, delta)
    loss, grad = value_and_grad(params)
    new = LocalCarry(params=params, loss=loss, state=opt_state, extra=grad)
    carry = keep_inactive(active, new, carry)
    done = (jnp.minimum(length, bound) >= (1.0 - LOCAL_STOP) * bound) | ~jnp.isfinite(loss)
    return carry, done

  def refresh(carry, loss, grad):
    return carry._replace(loss=loss, extra=grad)

  return LocalSolver(init=tx.init, start=start, step=step, refresh=refresh)


def solver_for(cfg: APTSConfig, share: float, second_order: bool, memory: int) -> LocalSolver:
  """The local solver that ``cfg.local_solver`` names (the one way to choose it).

  Args:
    cfg: the APTS options.
    share: the divisor of the local radii (N for ``combine="sum"``, 1 for ``"mean"``; times
      sqrt(J) with J parameter blocks).
    second_order: L-SR1 models for the trust-region local solver.
    memory: its L-SR1 pairs per subdomain.

  Returns:
    ``"trust_region"``: ``trust_region_local_solver`` with the radii of ``cfg.trust_region``
    divided by ``share``; ``"adam_tr"``: ``adam_trust_region_local_solver`` with those radii;
    ``"adam"``: ``optax_local_solver(optax.adam(cfg.local_lr))``; an optax
    transformation: ``optax_local_solver`` of it; a ``LocalSolver``: itself.
  """
  choice = cfg.local_solver
  if isinstance(choice, str):
    if choice == "adam":
      return optax_local_solver(optax.adam(cfg.local_lr))
    local_cfg = cfg.trust_region.scaled(share)
    if choice == "adam_tr":
      solver = adam_trust_region_local_solver(local_cfg, cfg.local_steps, cfg.local_radius)
    else:
      solver = trust_region_local_solver(local_cfg, second_order, memory, cfg.local_steps,
                                         cfg.local_radius)
    return carried(solver) if cfg.local_radius == "carry" else solver
  if isinstance(choice, optax.GradientTransformation):
    return optax_local_solver(choice)
  return choice


def carried(solver: LocalSolver) -> LocalSolver:
  """``local_radius="carry"``: each update's local radius starts where the subdomain's last
  update left it (at most the bound; the first update as ``"split"``).

  The local radius is then learned over all the local iterations of all updates, as Adam's
  moments are, instead of restarting every exchange. The state is (the solver's state, the last
  local radius; 0 before the first update).

  Args:
    solver: a solver whose ``extra`` is (gradient, local radius) (the trust-region solvers).

  Returns:
    The ``LocalSolver`` with the radius kept in its state.
  """
  def init(params):
    return solver.init(params), jnp.zeros((), _stack.tree_dtype(params))

  def start(params, loss, grad, state, bound):
    inner_state, last = state
    carry = solver.start(params, loss, grad, inner_state, bound)
    radius = jnp.where(last > 0, jnp.minimum(last, bound), carry.extra[1])
    return carry._replace(state=(carry.state, radius), extra=(carry.extra[0], radius))

  def step(value_and_grad, carry, anchor, bound, active):
    inner, done = solver.step(value_and_grad, carry._replace(state=carry.state[0]), anchor,
                              bound, active)
    return inner._replace(state=(inner.state, inner.extra[1])), done

  def rescale(state, ratio):
    return (state[0] if solver.rescale is None else solver.rescale(state[0], ratio), state[1])

  return LocalSolver(init=init, start=start, step=step, rescale=rescale, refresh=solver.refresh)
