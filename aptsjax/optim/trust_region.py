"""The trust-region (TR) method as small pure pieces and as an optax transformation.

One TR iteration at theta with gradient g and radius Delta (the paper's (2) and (7)):

  s     = argmin g.s + 0.5 s.B s over |s| <= Delta   (B = 0: first order; L-SR1 + OBS: second)
  rho   = (f(theta) - f(theta + s)) / (-m(s))
  theta <- theta + s            if rho > eta_accept
  Delta <- min(beta Delta, Delta_max)   if rho > eta2                                    (7)
           max(alpha Delta, Delta_min)  if rho < eta1
  (s, grad f(theta + s) - g) goes to the L-SR1 memory whether or not s is accepted.

The ratio is evaluated as comparisons (no division): accept iff pred > 0 and
actual > eta_accept * pred; shrink unless pred > 0 and actual >= eta1 * pred; grow iff pred > 0
and actual > eta2 * pred (and, with ``radius_growth="boundary"``, the step reached the boundary).
A non-positive or non-finite predicted reduction, or a non-finite trial loss or gradient,
therefore means rejection and a smaller radius. With ``norm="rms"`` the region is |D s| <= Delta,
solved in the variables u = D theta (``aptsjax.scaling``). The constants and options are
``aptsjax.hyperparams``.

The same ``iterate`` function is, with a step cap, the local step of APTS; its second half,
``commit``, decides both the APTS step and the global steps of APTS.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from aptsjax.numerics import checks as _checks
from aptsjax.numerics import tree as _stack
from aptsjax.numerics import lsr1
from aptsjax.numerics import obs
from aptsjax.numerics import scaling
from aptsjax.numerics.scaling import ScaleState
from aptsjax.optim import guard
from aptsjax.optim import objective
from aptsjax.optim.objective import scalar_loss  # re-exported  # pylint: disable=unused-import
from aptsjax.optim.config import TrustRegionConfig
from aptsjax.optim.config import configure_trust_region
from aptsjax.optim.radius import ratio_test
from aptsjax.optim.radius import update_radius

PyTree = Any
LossFn = Callable[[PyTree, Any], jax.Array]


def model_step(grad: PyTree, memory: lsr1.LSR1State | None, radius: jax.Array) -> obs.OBSResult:
  """The model minimiser in the region: OBS for an L-SR1 memory, the first-order step for None."""
  if memory is None:
    return obs.first_order_step(grad, radius)
  return obs.solve(grad, memory, radius)


class Iterate(NamedTuple):
  """The outcome of one trust-region iteration (see ``iterate``)."""
  params: PyTree
  loss: jax.Array
  grad: PyTree
  radius: jax.Array
  memory: lsr1.LSR1State | None
  accepted: jax.Array
  stalled: jax.Array
  step: PyTree
  predicted: jax.Array
  actual: jax.Array
  aux: PyTree = None


class Trial(NamedTuple):
  """A trial step and the objective evaluated at ``params + step`` (the input of ``commit``).

  ``on_boundary`` says whether the step reached the boundary of its region (read by
  ``radius_growth="boundary"`` only); ``aux`` is the loss's auxiliary output there (None
  without ``has_aux``).
  """
  step: PyTree
  predicted: jax.Array
  loss: jax.Array
  grad: PyTree
  on_boundary: jax.Array | bool = True
  aux: PyTree = None


def commit(params: PyTree, loss: jax.Array, grad: PyTree, radius: jax.Array,
           memory: lsr1.LSR1State | None, trial: Trial, cfg: TrustRegionConfig,
           store_pair: jax.Array | bool = True, aux: PyTree = None) -> Iterate:
  """The end of one TR iteration: ratio test, radius update (7), memory update, choice.

  Whatever proposed ``trial.step`` (the model minimiser of ``iterate``, or APTS's summed local
  step), this decides it the same way: accept on the ratio of ``loss - trial.loss`` to
  ``trial.predicted``, update the radius, store the pair (step, trial.grad - grad) and move to the
  trial point if accepted.

  Args:
    params: the current point.
    loss: the objective at ``params``.
    grad: its gradient at ``params``.
    radius: the trust-region radius the step was judged against.
    memory: the L-SR1 memory (second order) or None (first order).
    trial: the step, its predicted reduction and the loss and gradient at ``params + step``.
    cfg: the constants and options.
    store_pair: False keeps the L-SR1 memory as it is (the caller will discard the iteration).
    aux: the auxiliary output at ``params`` (with ``trial.aux``; None without ``has_aux``).

  Returns:
    An ``Iterate`` (see ``iterate``); its ``aux`` is the trial's when accepted.
  """
  actual = loss - trial.loss
  finite_grad = _stack.all_finite(trial.grad)
  accept, shrink, grow = ratio_test(jnp.where(finite_grad, actual, -jnp.inf), trial.predicted, cfg,
                                    trial.on_boundary)
  if memory is not None:  # the pair of every trial step, unless its loss or gradient is not finite
    y = jax.tree.map(lambda a, b: a - b, trial.grad, grad)
    memory = lsr1.update(memory, trial.step, y,
                         valid=jnp.isfinite(trial.loss) & finite_grad & store_pair)
  return Iterate(
      params=optax.tree.where(accept, optax.apply_updates(params, trial.step), params),
      loss=jnp.where(accept, trial.loss, loss), grad=optax.tree.where(accept, trial.grad, grad),
      radius=update_radius(radius, shrink, grow, cfg), memory=memory, accepted=accept,
      stalled=~accept & (radius <= cfg.min_radius), step=trial.step, predicted=trial.predicted,
      actual=actual, aux=None if trial.aux is None else optax.tree.where(accept, trial.aux, aux))


def iterate(value_and_grad: Callable[[PyTree], tuple[jax.Array, PyTree]], params: PyTree,
            loss: jax.Array, grad: PyTree, radius: jax.Array, memory: lsr1.LSR1State | None,
            cfg: TrustRegionConfig, step_cap: jax.Array | None = None,
            store_pair: jax.Array | bool = True, has_aux: bool = False,
            aux: PyTree = None) -> Iterate:
  """One TR iteration from ``params`` with known ``loss`` and ``grad`` (one value-and-grad call).

  ``model_step``, one evaluation at the trial point, then ``commit``.

  Args:
    value_and_grad: params -> (loss, grad) of the objective (on fixed data).
    params: the current point.
    loss: the objective at ``params``.
    grad: its gradient at ``params``.
    radius: the trust-region radius.
    memory: the L-SR1 memory (second order) or None (first order).
    cfg: the constants and options.
    step_cap: optional extra bound on the step length (APTS: the room left in the local region);
      the step is solved with radius min(radius, step_cap); the radius update uses ``radius``.
    store_pair: False keeps the L-SR1 memory as it is (the caller will discard the iteration).
    has_aux: ``value_and_grad`` returns ``((loss, aux), grad)`` (``objective.value_and_grad``).
    aux: the auxiliary output at ``params`` (read with ``has_aux``).

  Returns:
    An ``Iterate``: the new point with its loss and gradient (the trial's when accepted), the
    new radius and memory, whether the step was accepted, whether a rejection happened at the
    radius floor (``stalled``), the trial step and the predicted and actual reductions.
  """
  solve_radius = radius if step_cap is None else jnp.minimum(radius, step_cap)
  result = model_step(grad, memory, solve_radius)
  value, trial_grad = value_and_grad(optax.apply_updates(params, result.step))
  trial_loss, trial_aux = objective.split(value, has_aux)
  trial = Trial(step=result.step, predicted=result.predicted_reduction, loss=trial_loss,
                grad=trial_grad, on_boundary=result.on_boundary, aux=trial_aux)
  return commit(params, loss, grad, radius, memory, trial, cfg, store_pair, aux)


class TrustRegionState(NamedTuple):
  """State of ``aptsjax.trust_region`` (a pytree; save and restore it like any optax state).

  Attributes:
    radius: the current radius.
    value: the loss at the current parameters (after the last update) on the last batch.
    grad: the gradient there, on the last batch: with full-batch data, pass it (and ``loss``
      as ``value``) to the next ``update`` instead of recomputing (see
      ``value_and_grad_from_state``).
    accepted: whether the last step was taken.
    stalled: whether the last step was rejected at the radius floor.
    nonfinite: whether the last update saw a non-finite loss or gradient at the current point
      (then it was a no-op: zero updates, unchanged state apart from the counters and flags).
    iteration: number of updates so far.
    num_accepted: number of accepted steps so far.
    predicted_reduction: -m(s) of the last trial step.
    actual_reduction: f(theta) - f(theta + s) of the last trial step.
    memory: the L-SR1 memory (None for the first-order method); with ``norm="rms"`` its pairs
      are in the scaled variables u = D theta of ``scaling.d``.
    scaling: the diagonal scaling D of ``norm="rms"`` (``aptsjax.scaling``); None otherwise.
    aux: with ``has_aux``, the loss's auxiliary output at the current parameters (the accepted
      trial point's, else the one at the parameters); None after ``init`` and without it.
  """
  radius: jax.Array
  value: jax.Array
  grad: PyTree
  accepted: jax.Array
  stalled: jax.Array
  nonfinite: jax.Array
  iteration: jax.Array
  num_accepted: jax.Array
  predicted_reduction: jax.Array
  actual_reduction: jax.Array
  memory: lsr1.LSR1State | None
  scaling: ScaleState | None = None
  aux: PyTree = None


def trust_region(loss_fn: LossFn, memory: int = 10, second_order: bool = True,
                 base: TrustRegionConfig | None = None, has_aux: bool = False,
                 **options: float | str) -> optax.GradientTransformationExtraArgs:
  """The trust-region method as an optax transformation: one TR iteration per ``update``.

  ``update(grads, state, params, batch=None, value=None)`` takes ``grads`` = grad loss_fn at
  ``params`` on ``batch`` and returns the updates (zero when the step is rejected). Cost of one
  update: one loss evaluation at ``params`` (skipped when ``value`` is given) and one loss and
  gradient evaluation at the trial point; with full-batch data the gradient for the next update
  is ``state.grad`` and the value ``state.value``, so a full-batch iteration costs one forward and
  one backward pass in total.

  It must be the last transformation: nothing may rescale or otherwise change its updates
  afterwards. The ratio test has judged that exact step, and the state describes the point it
  leads to, so ``optax.chain(tx, optax.scale(c))`` breaks it: the parameters move by ``c`` times
  a step that was tested only at full length (with no guarantee of decrease), the radius adapts
  to the full step, and ``state.value`` / ``state.grad`` are the loss and gradient at
  ``params + updates / c``, not at the new parameters (``value_and_grad_from_state`` would then
  hand the next update wrong values). This is not detected. Transformations that leave its
  output alone may share the chain.

  Dtypes: the loss and the gradients are cast to the parameters' dtype (float32 parameters with
  float64 data under ``jax_enable_x64`` work). The first-order method runs with bfloat16 or
  float16 parameters (norms accumulate in float32); the second-order one needs float32 or
  float64 (``init`` raises ValueError otherwise, as it does for non-floating parameters).

  Non-finite loss or gradient at ``params``: a no-op (zero updates, ``state.nonfinite`` set,
  radius, memory, loss and gradient unchanged). Non-finite trial loss or gradient: the step is
  rejected and the radius shrinks; the pair is not stored.

  ``batch=None`` (the default) calls ``loss_fn(params, None)``, for a loss without data; when
  that fails, ``update`` raises ValueError saying how to pass the batch. A batch whose leaves
  all have 0 rows raises ValueError.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    memory: number of L-SR1 pairs (second order), an integer >= 1 (checked for either order);
      10 by default (the paper's code uses 5).
    second_order: L-SR1 model solved by OBS (True) or the first-order model (False).
    base: the ``TrustRegionConfig`` the options apply to, used as it is:
      ``TrustRegionConfig()`` when None (radius floor 1e-10, growth after boundary steps),
      ``TrustRegionConfig.paper()`` for the paper's TR.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; the aux at the parameters an update ends at
      is kept in ``state.aux`` (None after ``init``: the first update adds it, so a jitted
      loop traces twice). When ``update`` gets ``value=`` the aux at the current parameters
      is ``state.aux`` (right for full-batch loops; the first update evaluates it).
    **options: overrides of ``TrustRegionConfig`` fields (``init_radius``, ``min_radius``,
      ``max_radius``, ``eta_accept``, ``eta1``, ``eta2``, ``alpha``, ``beta``,
      ``radius_growth``, ``norm``, ``rms_decay``, ``rms_eps``); an APTS option or an unknown
      name raises ValueError.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  cfg = configure_trust_region(base, **options)
  memory = _checks.as_int("memory", memory, 1)

  def init_fn(params: PyTree) -> TrustRegionState:
    _checks.check_params(params, second_order)
    dtype = _stack.tree_dtype(params)
    return TrustRegionState(
        radius=jnp.asarray(cfg.init_radius, dtype), value=jnp.asarray(jnp.inf, dtype),
        grad=optax.tree.zeros_like(params), accepted=jnp.array(False), stalled=jnp.array(False),
        nonfinite=jnp.array(False), iteration=jnp.zeros((), jnp.int32),
        num_accepted=jnp.zeros((), jnp.int32), predicted_reduction=jnp.zeros((), dtype),
        actual_reduction=jnp.zeros((), dtype),
        memory=lsr1.init(params, memory) if second_order else None,
        scaling=scaling.init(params) if cfg.norm == "rms" else None)

  def update_fn(grads: PyTree, state: TrustRegionState, params: PyTree | None = None,
                *, batch: Any = None, value: jax.Array | None = None, **extra_args: Any
                ) -> tuple[PyTree, TrustRegionState]:
    del extra_args
    if params is None:
      raise ValueError("trust_region needs params: call update(grads, state, params, batch=...).")
    _stack.check_like(params, state.grad, "params")
    _stack.check_like(grads, params, "grads")
    loss, aux = _current(loss_fn, params, batch, value, state, has_aux)
    begin = guard.start(loss, grads, params, state.scaling, cfg)
    coords = begin.coords
    value_and_grad = objective.value_and_grad(loss_fn, batch, has_aux)
    out = iterate(coords.value_and_grad(value_and_grad), coords.to_u(params), loss,
                  coords.grad_to_u(begin.grad), state.radius,
                  guard.rescale_memory(state.memory, begin.ratio), cfg, store_pair=begin.ok,
                  has_aux=has_aux, aux=aux)
    accepted = begin.ok & out.accepted
    shared = guard.finish(begin.ok, guard.Outcome(
        radius=out.radius, value=out.loss, grad=coords.grad_to_theta(out.grad),
        accepted=out.accepted, stalled=out.stalled, predicted_reduction=out.predicted,
        actual_reduction=out.actual), state)
    new_state = TrustRegionState(
        **shared, num_accepted=state.num_accepted + accepted.astype(jnp.int32),
        memory=out.memory, scaling=begin.scaling,
        aux=None if aux is None else guard.keep(begin.ok, out.aux, guard.previous_aux(state, aux)))
    return guard.updates_if(accepted, coords.to_theta(out.step)), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _current(loss_fn: LossFn, params: PyTree, batch: Any, value: jax.Array | None,
             state: TrustRegionState, has_aux: bool) -> tuple[jax.Array, PyTree]:
  """The loss (in the state's dtype) and aux at ``params``: evaluated, or ``value`` and
  ``state.aux`` when the caller passed ``value`` (evaluated anyway before the first aux)."""
  if value is None or (has_aux and state.aux is None):
    loss, aux = objective.evaluate(loss_fn, params, batch, has_aux)
    loss = loss if value is None else jnp.asarray(value)
  else:
    loss, aux = jnp.asarray(value), state.aux
  if jnp.shape(loss) != ():
    raise ValueError(f"value must be a scalar, got shape {jnp.shape(loss)}.")
  return loss.astype(state.radius.dtype), aux


def value_and_grad_from_state(loss_fn: LossFn, has_aux: bool = False
                              ) -> Callable[..., tuple[Any, PyTree]]:
  """``optax.value_and_grad_from_state`` with the value and gradient in the state's dtypes.

  For full-batch training: after an update, the state's ``value`` and ``grad`` are the loss and
  gradient at the current parameters on the same data, so recomputing them is wasted work.
  ``fn(params, batch, *, state)`` returns them when ``value`` is finite and evaluates
  ``jax.value_and_grad(loss_fn)`` otherwise (the first update: ``init`` stores inf), inside
  ``lax.cond``. The fields are found with ``optax.tree.get``, so ``state`` may be an
  ``optax.chain`` state holding one aptsjax state. Only valid when every update uses the same
  batch. Unlike optax's, the computed branch is cast to the state's dtypes (float32 parameters
  with float64 data under ``jax_enable_x64``), and ``has_aux=True`` returns
  ``((value, aux), grad)`` like ``jax.value_and_grad`` (the aux from ``state.aux``).
  """
  vg = jax.value_and_grad(loss_fn, has_aux=has_aux)

  def fn(params: PyTree, batch: Any = None, *, state: Any) -> tuple[Any, PyTree]:
    value, grad = optax.tree.get(state, "value"), optax.tree.get(state, "grad")
    if value is None or grad is None:
      raise ValueError("the state holds no 'value' and 'grad' fields: pass the state of "
                       "aptsjax.trust_region or aptsjax.apts (or a chain holding one).")
    aux = optax.tree.get(state, "aux") if has_aux else None

    def compute():
      out, g = vg(params, batch)
      loss, new_aux = objective.split(out, has_aux)
      g = jax.tree.map(lambda a, r: a.astype(r.dtype), g, grad)
      return (loss.astype(value.dtype), new_aux), g

    if has_aux and aux is None:   # before the first update there is no aux to reuse
      return compute()
    (loss, aux), g = jax.lax.cond(jnp.isfinite(value), lambda: ((value, aux), grad), compute)
    return ((loss, aux) if has_aux else loss), g

  return fn
