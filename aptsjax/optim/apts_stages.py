"""The stages of one APTS update (Algorithm 1 of the paper, lines 4-10), in the order they run.

``aptsjax.apts`` calls them one after the other (docs/method.md, "APTS (Algorithm 1)"):

1. ``evaluate``: every subdomain's loss and gradient at theta^k (one pass over the batch), the
   global loss f(theta^k) and, unless the caller gave it, the global gradient g^k.
2. ``local_phase``: the local iterations on f_i(theta) = f(theta; D_i) + <g^k - g_i, theta -
   theta^k> (3)-(4), each within its local bound, nothing communicated (``aptsjax.optim.local``).
3. ``combine``: s~ from the local steps (their sum or mean, cut to Delta^k) and the predicted
   reduction, the denominator of (6).
4. ``global_phase``: trip 0 judges s~ by the global ratio test (6) and the radius rule (7),
   trips 1..``global_steps`` are TR iterations on the global objective; one trial evaluation
   and one ``trust_region.commit`` per trip.

The commit of the state (keep or restore on a non-finite start) is ``aptsjax.optim.guard``,
shared with ``aptsjax.trust_region``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from aptsjax.data import streams as stream_lib
from aptsjax.numerics import lsr1
from aptsjax.numerics import scaling
from aptsjax.numerics import tree as tree_lib
from aptsjax.optim import local
from aptsjax.optim import local_stream
from aptsjax.optim import objective
from aptsjax.optim import trust_region as tr
from aptsjax.optim.config import TrustRegionConfig
from aptsjax.optim.radius import reaches_boundary

PyTree = Any
LossFn = Callable[[PyTree, Any], jax.Array]


def to_varying(tree: PyTree, axis_name: str | None) -> PyTree:
  """Marks a device-invariant pytree as varying over ``axis_name`` (no-op when None or varying).

  Inside ``jax.shard_map`` with check_vma=True, differentiating a shard's loss with respect to
  invariant parameters would return the psum of the shard gradients; casting first keeps each
  device's gradient its own (and keeps all-reduces out of the local iterations).
  """
  if axis_name is None:
    return tree
  cast = lambda x: (x if axis_name in tree_lib.varying_axes(x)
                    else jax.lax.pcast(x, axis_name, to="varying"))
  return jax.tree.map(cast, tree)


def local_objective(loss_fn: LossFn, block: Any, theta_k: PyTree, r: PyTree,
                    has_aux: bool = False) -> Callable[[PyTree], jax.Array]:
  """The local objective (3)-(4): f_i(theta) = f(theta; D_i) + <r_i, theta - theta^k>.

  With r_i = g^k - grad f(theta^k; D_i), grad f_i(theta^k) = g^k (first-order consistency): the
  term is part of the function that is differentiated, not added after the backward pass as in
  the authors' reference code (docs/method.md, "Departures from the reference code"). r_i is
  constant, so it cancels in L-SR1 pairs. ``r=None`` (``consistency=False``) leaves the term
  out: f_i is the subdomain's loss. With ``has_aux`` the loss's aux is dropped here.
  """
  def f_i(theta):
    loss = objective.scalar_loss(loss_fn, theta, block, has_aux)
    if r is None:
      return loss
    return (loss + tree_lib.vdot(r, optax.tree.sub(theta, theta_k))).astype(loss.dtype)
  return f_i


class Subdomains(NamedTuple):
  """This device's subdomains and the global objective built from them.

  Attributes:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    blocks: this device's subdomain batches, leaves with a leading axis (its subdomains).
    num_subdomains: N, over all devices.
    axis_name: the device axis (None on one device).
    dtype: the parameters' dtype (losses are cast to it).
    has_aux: ``loss_fn`` returns ``(loss, aux)``; the aux is kept per subdomain.
    stream: with a ``aptsjax.data.Stream``, this device's subdomain blocks of all its
      minibatches (leaves ``(subdomains, rows, H, ...)``), read by the local iterations;
      ``blocks`` is then minibatch 0. None for a plain batch.
  """
  loss_fn: LossFn
  blocks: Any
  num_subdomains: int
  axis_name: str | None
  dtype: Any
  has_aux: bool = False
  stream: Any = None

  def total(self, x: jax.Array) -> jax.Array:
    """The sum over this device's subdomains (leading axis), then over the devices."""
    x = tree_lib.sum_leading(x)
    return x if self.axis_name is None else jax.lax.psum(x, self.axis_name)

  def mean_loss(self, losses: jax.Array) -> jax.Array:
    """f, the mean over all N subdomains of their losses (a scalar all-reduce)."""
    return (self.total(losses) / self.num_subdomains).astype(self.dtype)

  def mean(self, tree: PyTree) -> PyTree:
    """The mean over all N subdomains of per-subdomain leaves."""
    return jax.tree.map(lambda g: self.total(g) / self.num_subdomains, tree)

  def block_value_and_grad(self, params: PyTree) -> tuple[jax.Array, PyTree, PyTree]:
    """Every subdomain's loss, aux (None without ``has_aux``) and gradient at ``params``
    (vmapped; no communication)."""
    def one(blk):
      value, grad = objective.value_and_grad(self.loss_fn, blk, self.has_aux)(
          to_varying(params, self.axis_name))
      return objective.split(value, self.has_aux), grad
    (losses, aux), grads = jax.vmap(one)(self.blocks)
    return losses, aux, grads

  def global_value(self, params: PyTree) -> Any:
    """f at ``params`` without its gradient (a scalar all-reduce); ``(f, aux per subdomain)``
    with ``has_aux``."""
    def one(blk):
      value = self.loss_fn(to_varying(params, self.axis_name), blk)
      return objective.split(value, self.has_aux)
    losses, aux = jax.vmap(one)(self.blocks)
    value = self.mean_loss(losses)
    return (value, aux) if self.has_aux else value

  def global_value_and_grad(self, params: PyTree) -> tuple[Any, PyTree]:
    """f and its gradient at ``params``: the means of the subdomain ones (one all-reduce);
    with ``has_aux`` the value is ``(f, aux per subdomain)``."""
    losses, aux, grads = self.block_value_and_grad(params)
    value = self.mean_loss(losses)
    return ((value, aux) if self.has_aux else value), self.mean(grads)


class Evaluation(NamedTuple):
  """Stage 1: the objective at theta^k (``losses``, ``aux`` and ``block_grads`` per subdomain).

  ``finite`` is None when g^k was formed (its finiteness is then checked by the guard), else
  whether every subdomain's gradient is finite (a scalar all-reduce) and ``grad`` is zeros.
  """
  losses: jax.Array
  block_grads: PyTree
  value: jax.Array
  grad: PyTree
  aux: PyTree = None
  finite: jax.Array | None = None


def evaluate(sub: Subdomains, params: PyTree, grads: PyTree | None,
             form_grad: bool = True) -> Evaluation:
  """Stage 1: f_i and g_i of every subdomain at theta^k, f(theta^k), and g^k (unless given).

  ``grads=None`` forms g^k as the mean of the g_i (one all-reduce, no extra pass), unless
  ``form_grad`` is False (nothing reads it: no consistency term, no global gradient step), when
  it is left at zeros and only the finiteness of the g_i is all-reduced.
  """
  losses, aux, block_grads = sub.block_value_and_grad(params)
  value = sub.mean_loss(losses)
  if grads is not None or form_grad:
    grad = sub.mean(block_grads) if grads is None else grads
    return Evaluation(losses=losses, block_grads=block_grads, value=value, grad=grad, aux=aux)
  finite = jax.vmap(tree_lib.all_finite)(block_grads).astype(sub.dtype)
  return Evaluation(losses=losses, block_grads=block_grads, value=value,
                    grad=optax.tree.zeros_like(params), aux=aux,
                    finite=sub.total(finite) == sub.num_subdomains)


class LocalPlan(NamedTuple):
  """Stage 2's settings: the solver, its bound per local problem, parameter blocks.

  Attributes:
    solver: the ``LocalSolver``.
    bound: the local bound per problem (a scalar, or one per problem with parameter blocks);
      0 means no local iterations (a skipped update).
    local_steps: nu.
    problems: ``aptsjax.optim.blocks.problems``'s ``(inputs, pick, project)`` builder, applied
      to the per-subdomain data and consistency terms.
    repeat: local problems per subdomain (J, 1 without parameter blocks).
    consistency: whether the local objectives carry the first-order consistency term.
  """
  solver: local.LocalSolver
  bound: jax.Array
  local_steps: int
  problems: Callable[[PyTree], tuple[PyTree, Callable, Callable | None]]
  repeat: int
  consistency: bool = True


class LocalPhase(NamedTuple):
  """Stage 2's result: the local outcome, each problem's start loss and the anchor u^k.

  ``end_values(points)`` evaluates every problem's local objective on the data of the exchange
  (minibatch 0 of a stream) at its point of ``points`` (leaves with a leading problem axis):
  what (6) compares, read again by the outer momentum (``aptsjax.optim.outer``).
  """
  outcome: local.LocalOutcome
  start_losses: jax.Array
  anchor: PyTree
  end_values: Callable[[PyTree], jax.Array] | None = None


def local_phase(sub: Subdomains, ev: Evaluation, params: PyTree, coords: scaling.Coordinates,
                states: PyTree, plan: LocalPlan) -> LocalPhase:
  """Stage 2: the local iterations of this device's problems, from theta^k, with no
  communication (in u = D theta for ``norm="rms"``).

  Args:
    sub: the subdomains.
    ev: stage 1, with ``ev.grad`` g^k cast to the parameters' dtypes.
    params: theta^k.
    coords: the change of variables (``aptsjax.optim.guard.Start.coords``).
    states: the local solvers' persistent states (moved to the current variables).
    plan: the solver and its bounds.
  """
  theta_k = to_varying(params, sub.axis_name)
  u_k = coords.to_u(theta_k)
  g_k = to_varying(ev.grad, sub.axis_name)
  r = (jax.tree.map(lambda g, gi: g[None] - gi, g_k, ev.block_grads) if plan.consistency
       else None)
  inputs, pick, project = plan.problems((sub.blocks if sub.stream is None else sub.stream, r))

  def on_block(blk, r_i, u):
    f_i = jax.value_and_grad(local_objective(sub.loss_fn, blk, theta_k, r_i, sub.has_aux))
    return coords.value_and_grad(f_i)(u)

  def local_value_and_grad(inp, u):
    return on_block(*pick(inp), u)

  def minibatch_value_and_grad(inp, h, u):   # local iteration h reads minibatch h
    blk, r_i = pick(inp)
    return on_block(stream_lib.minibatch(blk, h, axis=1), r_i, u)

  repeat = lambda x: x if plan.repeat == 1 else jnp.repeat(x, plan.repeat, axis=0)
  losses = repeat(ev.losses)
  solver, value_and_grad = plan.solver, local_value_and_grad
  if sub.stream is not None:   # plan.local_steps is then the stream's length H
    solver, value_and_grad = local_stream.streamed(solver), minibatch_value_and_grad
  start_grad = (coords.grad_to_u(g_k) if plan.consistency
                else jax.vmap(coords.grad_to_u)(jax.tree.map(repeat, ev.block_grads)))
  outcome = local.run(solver, value_and_grad, inputs, u_k, losses.astype(sub.dtype), start_grad,
                      states, plan.bound, plan.local_steps, project=project,
                      shared_grad=plan.consistency)
  def end_value(inp, u):   # the local objective on the exchange's data: f_i, or f_{i,0}
    blk, r_i = pick(inp)
    blk = blk if sub.stream is None else stream_lib.minibatch(blk, 0, axis=1)
    f_i = local_objective(sub.loss_fn, blk, theta_k, r_i, sub.has_aux)
    return f_i(coords.to_theta(u)).astype(sub.dtype)

  end_values = lambda points: jax.vmap(end_value)(inputs, points)
  if sub.stream is not None:   # (6) on the exchange's data: f_{i,0} at theta_i
    outcome = outcome._replace(loss=end_values(outcome.params))
  return LocalPhase(outcome=outcome, start_losses=losses, anchor=u_k, end_values=end_values)


class Combined(NamedTuple):
  """Stage 3's result: s~ (within Delta^k), its predicted reduction and whether it is on the
  boundary of the global region."""
  step: PyTree
  predicted: jax.Array
  on_boundary: jax.Array


def combine(sub: Subdomains, phase: LocalPhase, radius: jax.Array, weight: float) -> Combined:
  """Stage 3: s~ = weight * sum_i s_i (5), cut to |s~| <= Delta^k, and the denominator of (6).

  A subdomain whose end loss, step or start loss is not finite contributes nothing.

  Args:
    sub: the subdomains.
    phase: stage 2.
    radius: Delta^k.
    weight: 1 (``combine="sum"``) or 1 / N (``"mean"``).
  """
  def contribution(theta_i, loss_end, loss_i):
    step = optax.tree.sub(theta_i, phase.anchor)
    good = jnp.isfinite(loss_end) & tree_lib.all_finite(step) & jnp.isfinite(loss_i)
    return (optax.tree.where(good, optax.tree.scale(weight, step), optax.tree.zeros_like(step)),
            jnp.where(good, weight * (loss_i - loss_end), 0.0))

  res = phase.outcome
  steps, decrease = jax.vmap(contribution)(res.params, res.loss, phase.start_losses)
  s = jax.tree.map(sub.total, steps)
  s_norm = tree_lib.norm(s).astype(sub.dtype)
  cut = jnp.where(s_norm > radius, radius / jnp.where(s_norm > 0, s_norm, 1.0), 1.0)
  return Combined(step=optax.tree.scale(cut, s),
                  predicted=sub.total(decrease).astype(sub.dtype),
                  on_boundary=reaches_boundary(jnp.minimum(s_norm, radius), radius))


class GlobalCarry(NamedTuple):
  """Stage 4's loop carry (in u = D theta for ``norm="rms"``).

  Attributes:
    params: the current point.
    value: the global loss there.
    grad: its gradient.
    radius: the global radius.
    memory: the global L-SR1 memory (None for first order).
    stalled: whether the last global TR step was rejected at the radius floor.
    changed: whether any trip moved the point.
    apts_accepted: whether trip 0 accepted s~.
    apts_actual: f(theta^k) - f(theta^k + s~).
    aux: with ``has_aux``, the aux per subdomain at ``params``; None otherwise.
  """
  params: PyTree
  value: jax.Array
  grad: PyTree
  radius: jax.Array
  memory: lsr1.LSR1State | None
  stalled: jax.Array
  changed: jax.Array
  apts_accepted: jax.Array
  apts_actual: jax.Array
  aux: PyTree = None


def global_phase(value_and_grad: Callable[[PyTree], tuple[Any, PyTree]], start: GlobalCarry,
                 combined: Combined, dtypes: PyTree, cfg: TrustRegionConfig, global_steps: int,
                 store_pair: jax.Array, value: Callable[[PyTree], Any] | None = None
                 ) -> GlobalCarry:
  """Stage 4: 1 + ``global_steps`` trips; trip 0 proposes s~, the others the model minimiser.

  Args:
    value_and_grad: u -> (f, grad f) of the global objective (one all-reduce each); ``(f, aux)``
      in place of f when ``start.aux`` is not None.
    value: u -> f alone (a scalar all-reduce), for a first-order phase of no global steps whose
      gradient at the trial point nothing reads (a ``Stream``: the next update has other
      data); the carry's gradient then stays as it is. None: ``value_and_grad``.
    start: the carry at theta^k.
    combined: stage 3.
    dtypes: a pytree like the parameters whose leaves give the step dtypes.
    cfg: the global region.
    global_steps: TR iterations after the APTS step.
    store_pair: False keeps the L-SR1 memory as it is (a skipped update).
  """
  cast = lambda step: jax.tree.map(lambda x, p: x.astype(p.dtype), step, dtypes)
  evaluate_value = value
  if value is not None and global_steps:
    raise ValueError("a value-only global phase has no gradient for its global steps.")

  def trip(i, c: GlobalCarry) -> GlobalCarry:
    first = i == 0

    def model():
      result = tr.model_step(c.grad, c.memory, c.radius)
      return cast(result.step), result.predicted_reduction.astype(c.value.dtype), result.on_boundary

    step, pred, edge = jax.lax.cond(
        first, lambda: (cast(combined.step), combined.predicted, combined.on_boundary), model)
    trial = optax.apply_updates(c.params, step)
    value, trial_grad = (value_and_grad(trial) if evaluate_value is None
                         else (evaluate_value(trial), c.grad))
    trial_loss, trial_aux = value if c.aux is not None else (value, None)
    out = tr.commit(c.params, c.value, c.grad, c.radius, c.memory,
                    tr.Trial(step, pred, trial_loss, trial_grad, edge, trial_aux), cfg,
                    store_pair=store_pair, aux=c.aux)
    return GlobalCarry(
        params=out.params, value=out.loss, grad=out.grad, radius=out.radius, memory=out.memory,
        stalled=~first & out.stalled, changed=c.changed | out.accepted,
        apts_accepted=jnp.where(first, out.accepted, c.apts_accepted),
        apts_actual=jnp.where(first, out.actual, c.apts_actual), aux=out.aux)

  return jax.lax.fori_loop(0, 1 + global_steps, trip, start)
