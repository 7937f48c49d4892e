"""Data-parallel APTS and SAPTS (Algorithm 1 of the paper, lines 4-10) as an optax transformation.

One ``update`` at theta^k with global gradient g^k = ``grads`` and global radius Delta^k
(docs/method.md, "APTS (Algorithm 1)"):

1. Split the batch into N equal contiguous blocks D_i (the subdomains; a device holds N / D of
   them) and compute every block's loss and gradient g_i at theta^k (vmapped, one forward and
   backward pass over the batch).
2. Local TR on f_i(theta) = f(theta; D_i) + <g^k - g_i, theta - theta^k>   (3)-(4), so that
   grad f_i(theta^k) = g^k, on every subdomain (``aptsjax.local.run``: on CPU one subdomain
   after the other, elsewhere one loop of vmapped masked iterations), starting from radius
   Delta^k / N (bounds Delta_min / N, Delta_max / N), each trial step limited to the room left in
   |theta_i - theta^k| <= Delta^k / N, for at most ``local_steps`` iterations, stopping early once
   |theta_i - theta^k| >= (1 - 1e-3) Delta^k / N. Nothing is communicated inside this loop.
3. s~ = sum_i (theta_i - theta^k), so |s~| <= Delta^k                                        (5)
   rho = (f(theta^k) - f(theta^k + s~)) / sum_i (f_i(theta^k) - f_i(theta_i))              (6)
   accept when rho > eta_accept; radius update (7).
4. ``global_steps`` TR iterations on the global objective from there (the paper: 1). Steps 3
   and 4 are one loop of 1 + ``global_steps`` trips sharing one trial evaluation and one
   ``trust_region.commit``.

Each step is a function of ``aptsjax.optim.apts_stages`` (evaluate, local phase, combine,
global phase); ``update`` below calls them in order and commits the state through
``aptsjax.optim.guard``, the path ``aptsjax.trust_region`` shares.

Communication per update with ``axis_name`` set (docs/method.md, "Communication"): the
all-reduce of g^k (n floats; the caller's or, with ``grads=None``, apts's own), one of s~ (n),
one of the gradient at theta^k + s~ (n), one per global step (n), plus a few scalars: 4 n + O(1)
floats for the paper's global_steps = 1, independent of local_steps. What nothing reads is not
all-reduced (``exchanged_vectors``): on a ``Stream`` with the defaults only s~ is.
Forward and backward passes over the batch per update: 1 (theta^k) + up to ``local_steps`` (the
local trials) + 1 (theta^k + s~) + ``global_steps``.

Each subdomain keeps its own local solver state across updates (its L-SR1 memory, or Adam's
moments and, with ``local_radius="carry"``, its local radius).

The steps above are the paper's method, ``APTSConfig.paper()``. The defaults and options of
``aptsjax.APTSConfig`` (docs/method.md, "Options beyond the paper"; docs/defaults.md) change
them: ``combine="mean"`` takes s~ as the mean of the local steps, each bounded by Delta^k, and
the denominator of (6) as the mean of the local decreases; ``local_solver="adam_tr"`` (the
default) takes Adam's direction with the local trust region's length; ``radius_units=
"per_parameter"`` (the default) measures the radii per parameter; ``local_radius="carry"`` (the
default) starts each update's local radius where the last one ended; a ``Stream`` batch gives
each local step its own minibatch (``aptsjax.optim.local_stream``); ``outer_momentum`` adds a
momentum of the accepted steps (``aptsjax.optim.outer``); ``norm="rms"`` runs every phase in
u = D theta; ``radius_growth="boundary"`` grows the radius only after steps on the boundary.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aptsjax import data
from aptsjax.numerics import checks
from aptsjax.numerics import lsr1
from aptsjax.numerics import scaling
from aptsjax.numerics import tree as tree_lib
from aptsjax.numerics.scaling import ScaleState
from aptsjax.optim import apts_stages as stages
from aptsjax.optim import blocks as pblocks
from aptsjax.optim import guard
from aptsjax.optim import local
from aptsjax.optim import local_solvers
from aptsjax.optim import outer
from aptsjax.optim.apts_stages import local_objective  # re-exported  # pylint: disable=unused-import
from aptsjax.optim.apts_stages import to_varying  # re-exported  # pylint: disable=unused-import
from aptsjax.optim.config import APTSConfig
from aptsjax.optim.config import configure_apts

PyTree = Any
LossFn = Callable[[PyTree, Any], jax.Array]


class APTSState(NamedTuple):
  """State of ``aptsjax.apts`` (a pytree; same global shapes on one device or many).

  Attributes:
    radius: the global radius Delta.
    value: the global loss at the parameters after the update (on the last batch).
    grad: the global gradient there (reusable for the next update on the same data).
    accepted: whether the parameters changed in the last update (APTS or global step taken).
    apts_accepted: whether the summed local step s~ was accepted.
    stalled: whether the last global trust-region step was rejected at the radius floor.
    nonfinite: whether the last update saw a non-finite loss or gradient at the current point
      (then it was a no-op).
    iteration: number of updates.
    predicted_reduction: sum_i (f_i(theta^k) - f_i(theta_i)), the denominator of (6).
    actual_reduction: f(theta^k) - f(theta^k + s~).
    local_steps: ``(N J,)`` local iterations each local problem took in the last update (J
      parameter blocks, 1 without ``param_blocks``; problem i * J + j).
    local_state: per-problem local solver states, leaves with a leading axis N J.
    global_memory: the L-SR1 memory of the global steps (None for first order).
    scaling: the diagonal scaling D of ``norm="rms"`` (``aptsjax.numerics.scaling``), None
      otherwise; with it, every L-SR1 memory holds its pairs in the variables u = D theta.
    momentum: with ``outer_momentum``, the last accepted APTS step (zeros after a rejection;
      ``aptsjax.optim.outer``), None otherwise.
    aux: with ``has_aux``, each subdomain's auxiliary output at the parameters after the
      update (leaves with a leading axis N); None after ``init`` and without it.
  """
  radius: jax.Array
  value: jax.Array
  grad: PyTree
  accepted: jax.Array
  apts_accepted: jax.Array
  stalled: jax.Array
  nonfinite: jax.Array
  iteration: jax.Array
  predicted_reduction: jax.Array
  actual_reduction: jax.Array
  local_steps: jax.Array
  local_state: PyTree
  global_memory: lsr1.LSR1State | None
  scaling: ScaleState | None = None
  momentum: PyTree = None
  aux: PyTree = None

  PER_SUBDOMAIN = ("local_steps", "local_state", "aux")


def _device_count(axis_name: str | None) -> int:
  if axis_name is None:
    return 1
  try:
    return jax.lax.axis_size(axis_name)
  except NameError as e:
    raise ValueError(f"axis_name {axis_name!r} is not bound: call update inside jax.shard_map or "
                     "jax.pmap over that axis, or use axis_name=None on one device.") from e


def _check_rows(rows: int, num_subdomains: int, num_devices: int) -> None:
  """Raises ValueError (at trace time) when a batch has fewer rows than its subdomains."""
  n_local = num_subdomains // num_devices
  if rows >= n_local:
    return
  where = ("the batch" if num_devices == 1 else
           f"this device's shard of the batch ({n_local} of the {num_subdomains} subdomains)")
  raise ValueError(f"{where} has {rows} rows, fewer than its {n_local} subdomains: every "
                   "subdomain needs at least one row (an empty batch has no loss); skip empty "
                   "batches and use at least num_subdomains rows.")


def _local_count(axis_name: str | None, num_subdomains: int, batch: Any) -> int:
  """This device's subdomains, N / D, after the trace-time checks of the axis and the batch."""
  num_devices = _device_count(axis_name)
  if num_subdomains % num_devices:
    raise ValueError(f"num_subdomains={num_subdomains} is not divisible by the {num_devices} "
                     f"devices of axis {axis_name!r}.")
  _check_rows(data.row_count(batch), num_subdomains, num_devices)
  return num_subdomains // num_devices


def _check_state(state: "APTSState", n_local: int, count: int) -> None:
  if state.local_steps.shape != (n_local * count,):
    raise ValueError(f"the state holds {state.local_steps.shape[0]} local problems here, "
                     f"expected {n_local} subdomains x {count} parameter blocks: init it with "
                     "the same param_blocks and shard it with aptsjax.state_specs (shard_map) "
                     "or aptsjax.parallel.pmap_state (pmap).")


def _reads(cfg: APTSConfig, second_order: bool, streaming: bool) -> tuple[bool, bool]:
  """(the trial point's gradient, g^k): which gradients an update must all-reduce besides s~.

  The trial gradient is read by the global steps, the global L-SR1 pair and, on a plain batch,
  the next update on the same batch (``state.grad``); g^k by those, the consistency term and the
  RMS scaling. With a ``Stream`` the next update has other data. ``cfg`` is resolved
  (``APTSConfig.resolve``).
  """
  trial = not streaming or second_order or cfg.global_steps > 0
  return trial, trial or cfg.consistency or cfg.trust_region.norm == "rms"


class _Method(NamedTuple):
  """What ``apts`` fixed at construction: the options and the per-problem shares."""
  cfg: APTSConfig
  second_order: bool
  memory: int
  param_blocks: Any
  local_share: int
  weight: float

  def blocks(self, params: PyTree) -> tuple[Any, int, float]:
    """The parameter blocks of ``params``: (labels or None, J, the local radii's divisor)."""
    spec = pblocks.resolve(self.param_blocks, params)
    return spec, pblocks.count(spec), pblocks.share(self.local_share, spec)

  def sized(self, params: PyTree) -> "_Method":
    """The method for ``params``: with ``radius_units="per_parameter"`` every radius of the
    table multiplied by sqrt(n) (Euclidean lengths from then on); else itself."""
    if self.cfg.radius_units == "absolute":
      return self
    region = self.cfg.trust_region.scaled(1.0 / float(np.sqrt(optax.tree.size(params))))
    return self._replace(cfg=self.cfg._replace(trust_region=region))

  def solver(self, share: float) -> local.LocalSolver:
    return local_solvers.solver_for(self.cfg, share, self.second_order, self.memory)

  def plan(self, params: PyTree, radius: jax.Array, ok: jax.Array, n_local: int
           ) -> stages.LocalPlan:
    """Stage 2's plan: the local bound Delta^k / share per problem (0 when not ``ok``)."""
    spec, count, share = self.blocks(params)
    per_problem = share
    if spec is not None:   # problem i * J + j: the bound of block j
      divisors = pblocks.divisors(self.local_share, spec, self.cfg.block_bound)
      per_problem = jnp.asarray(np.tile(divisors, n_local), radius.dtype)
    return stages.LocalPlan(
        solver=self.solver(share), bound=jnp.where(ok, radius / per_problem, 0.0),
        local_steps=self.cfg.local_steps,
        problems=lambda per_subdomain: pblocks.problems(per_subdomain, n_local, spec),
        repeat=count, consistency=self.cfg.consistency)


def _init(method: _Method, num_subdomains: int, params: PyTree) -> APTSState:
  checks.check_params(params, method.second_order)
  dtype = tree_lib.tree_dtype(params)
  _, count, share = method.blocks(params)
  solver_state = method.solver(share).init(params)
  local_state = jax.tree.map(lambda x: jnp.repeat(x[None], num_subdomains * count, axis=0),
                             solver_state)
  zero = jnp.zeros((), dtype)
  return APTSState(
      radius=jnp.asarray(method.cfg.trust_region.init_radius, dtype),
      value=jnp.asarray(jnp.inf, dtype), grad=optax.tree.zeros_like(params),
      accepted=jnp.array(False), apts_accepted=jnp.array(False), stalled=jnp.array(False),
      nonfinite=jnp.array(False), iteration=jnp.zeros((), jnp.int32), predicted_reduction=zero,
      actual_reduction=zero, local_steps=jnp.zeros((num_subdomains * count,), jnp.int32),
      local_state=local_state,
      global_memory=lsr1.init(params, method.memory) if method.second_order else None,
      scaling=scaling.init(params) if method.cfg.trust_region.norm == "rms" else None,
      momentum=optax.tree.zeros_like(params) if method.cfg.outer_momentum else None)


def _update(method: _Method, sub: stages.Subdomains, grads: PyTree | None, state: APTSState,
            params: PyTree, n_local: int) -> tuple[PyTree, APTSState]:
  """One APTS iteration: the stages in order, then the guarded commit."""
  cfg = method.cfg
  trial_grad, global_grad = _reads(cfg, method.second_order, sub.stream is not None)
  ev = stages.evaluate(sub, params, grads, form_grad=global_grad)
  begin = guard.start(ev.value, ev.grad, params, state.scaling, cfg.trust_region)
  if ev.finite is not None:
    begin = begin._replace(ok=begin.ok & ev.finite)
  ev, coords = ev._replace(grad=begin.grad), begin.coords
  plan = method.plan(params, state.radius, begin.ok, n_local)
  local_state = state.local_state
  if begin.ratio is not None and plan.solver.rescale is not None and jax.tree.leaves(local_state):
    local_state = jax.vmap(plan.solver.rescale, in_axes=(0, None))(local_state, begin.ratio)
  phase = stages.local_phase(sub, ev, params, coords, local_state, plan)
  combined = stages.combine(sub, phase, state.radius, method.weight)
  if cfg.outer_momentum:
    combined = outer.extrapolate(sub, phase, combined, coords.to_u(state.momentum), state.radius,
                                 cfg.outer_momentum, method.weight)
  u_start = coords.to_u(params)
  false = jnp.array(False)
  start = stages.GlobalCarry(
      params=u_start, value=ev.value, grad=coords.grad_to_u(begin.grad), radius=state.radius,
      memory=guard.rescale_memory(state.global_memory, begin.ratio), stalled=false,
      changed=false, apts_accepted=false, apts_actual=jnp.zeros((), sub.dtype), aux=ev.aux)
  value_only = None if trial_grad else lambda u: sub.global_value(coords.to_theta(u))
  end = stages.global_phase(coords.value_and_grad(sub.global_value_and_grad), start, combined,
                            params, cfg.trust_region, cfg.global_steps, begin.ok, value_only)
  ok = begin.ok
  shared = guard.finish(ok, guard.Outcome(
      radius=end.radius, value=end.value, grad=coords.grad_to_theta(end.grad),
      accepted=end.changed, stalled=end.stalled, predicted_reduction=combined.predicted,
      actual_reduction=end.apts_actual), state)
  new_state = APTSState(
      **shared, apts_accepted=ok & end.apts_accepted,
      local_steps=jnp.where(ok, phase.outcome.num_steps, 0).astype(jnp.int32),
      local_state=phase.outcome.state, global_memory=end.memory, scaling=begin.scaling,
      momentum=None if state.momentum is None else guard.keep(
          ok, guard.updates_if(end.apts_accepted, coords.to_theta(combined.step)), state.momentum),
      aux=None if ev.aux is None else guard.keep(ok, end.aux, guard.previous_aux(state, ev.aux)))
  return guard.updates_if(ok, coords.to_theta(optax.tree.sub(end.params, u_start))), new_state


def exchanged_vectors(second_order: bool = False, streaming: bool = False,
                      base: APTSConfig | None = None, **options: Any) -> int:
  """The parameter-sized all-reduces of one ``apts`` update across devices (``grads=None``).

  g^k (unless nothing reads it), s~, the gradient at the trial point (unless nothing reads it)
  and one per global step; a few scalars come on top (docs/method.md, "Communication").

  Args:
    second_order: as for ``apts``.
    streaming: whether the batch is a ``aptsjax.data.Stream``.
    base: as for ``apts``.
    **options: as for ``apts``.

  Returns:
    The number of all-reduces of n floats (n parameters) per update.
  """
  cfg = configure_apts(base, **options).resolve(streaming)
  trial, global_grad = _reads(cfg, second_order, streaming)
  return int(global_grad) + 1 + int(trial) + cfg.global_steps


def apts(loss_fn: LossFn, num_subdomains: int = 2, *, second_order: bool = False,
         axis_name: str | None = None, memory: int = 10, param_blocks: Any = None,
         base: APTSConfig | None = None, has_aux: bool = False, **options: Any
         ) -> optax.GradientTransformationExtraArgs:
  """APTS: additively preconditioned trust-region training, one iteration per ``update``.

  ``update(grads, state, params, batch=...)``: ``grads`` is the gradient of the global
  objective (loss_fn on the whole batch, the mean of the N subdomain losses) at ``params``; inside
  ``jax.shard_map`` with check_vma=True get it as
  ``jax.grad(lambda p: jax.lax.pmean(loss_fn(p, shard), axis_name))(params)``. ``grads=None``
  (an aptsjax extension) lets apts form g^k from the block gradients it evaluates anyway, which
  saves the caller one forward and backward pass over the batch (the train-step helper of
  ``aptsjax.parallel`` does this). ``batch`` is required (it is split into the subdomains) and
  needs at least one row per subdomain; otherwise ``update`` raises ValueError at trace time.

  Like ``aptsjax.trust_region``, it must be the last transformation: ``optax.chain(tx,
  optax.scale(c))`` breaks the ratio test (the parameters move by a step that was judged at
  full length, the radius adapts to the full step, and ``state.value`` / ``state.grad`` describe
  ``params + updates / c`` rather than the new parameters). This is not detected.

  Parameter blocks (``param_blocks``, ``aptsjax.blocks``;
  docs/method.md, "Parameter-block subdomains"): with J blocks there are N x J local problems,
  i-major (i * J + j; the state's per-subdomain axis is N x J and still shards by i). Problem (i, j) minimises f_i over block j,
  the rest frozen at theta^k (its gradients masked), within the data-only bound / sqrt(J); the
  J disjoint block steps of subdomain i concatenate within that bound, so |s~| <= Delta^k still.
  Each problem evaluates the whole loss on its rows (J times the local cost; second order: N x J
  parameter-sized memories).

  Dtypes: the losses and gradients are cast to the parameters' dtype (float32 parameters with
  float64 data under ``jax_enable_x64`` work). ``second_order=False`` runs with bfloat16 or
  float16 parameters; ``second_order=True`` needs float32 or float64 (``init`` raises
  ValueError otherwise, as it does for non-floating parameters).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, a mean over the rows of batch.
    num_subdomains: N, the total number of subdomains (in every mode), an integer >= 1.
    second_order: L-SR1 models (local and global; with an optax or Adam-direction local
      solver, the global steps) or first-order models. False by default (first order was
      better on the validation split in every setting of the options study, docs/method.md,
      "Defaults"); True with ``base=APTSConfig.paper()`` is the paper's second-order APTS.
    axis_name: None on one device; the mesh/pmap axis name across devices (its size D must
      divide N; each device's shard of the batch holds its N / D subdomains).
    memory: L-SR1 pairs per memory (each subdomain's and the global one), an integer >= 1.
    param_blocks: None (subdomains of the data only), ``"leaves"``, ``"layers"`` or a labels
      pytree (``aptsjax.optim.blocks``): J parameter blocks, N x J local problems (see above).
    base: the ``APTSConfig`` the options apply to, used as it is: ``APTSConfig()`` (the
      library's defaults) when None, ``APTSConfig.paper()`` for the paper's method exactly.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; each subdomain's aux at the parameters after
      the update is kept in ``state.aux`` (leading axis N, sharded like the other
      per-subdomain fields; None after ``init``: the first update adds it).
    **options: overrides of ``APTSConfig`` fields (``local_steps`` nu = 5, ``global_steps``
      None = 1 on a plain batch and 0 on a ``Stream``, ``combine``, ``local_solver``,
      ``local_lr``, ``local_radius``, ``block_bound``, ``consistency``, ``radius_units``,
      ``outer_momentum``) and of its ``trust_region``'s (``init_radius`` 0.01, ``min_radius``
      1e-6, ``max_radius`` 4, all per parameter by default, ``eta_accept`` 0, ``eta1`` 0.25,
      ``eta2`` 0.75, ``alpha`` 0.5, ``beta`` 2, ``radius_growth``, ``norm``, ``rms_decay``,
      ``rms_eps``); docs/defaults.md lists them all. An unknown name raises ValueError. With
      ``combine="sum"`` the local radii are the radii divided by N, with ``"mean"`` the radii.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``APTSState``.
  """
  num_subdomains = checks.as_int("num_subdomains", num_subdomains, 1)
  memory = checks.as_int("memory", memory, 1)
  cfg = configure_apts(base, **options)
  pblocks.check_name(param_blocks)  # an unknown name raises now; labels are checked at init
  # combine="sum" (the paper): s~ = sum_i s_i with local bound Delta / N; "mean": s~ = the mean
  # of the s_i with local bound Delta (docs/method.md, "Combining the local steps").
  total = cfg.combine == "sum"
  method = _Method(cfg=cfg, second_order=second_order, memory=memory, param_blocks=param_blocks,
                   local_share=num_subdomains if total else 1,
                   weight=1.0 if total else 1.0 / num_subdomains)

  def init_fn(params: PyTree) -> APTSState:
    return _init(method.sized(params), num_subdomains, params)

  def update_fn(grads: PyTree, state: APTSState, params: PyTree | None = None, *,
                batch: Any = None, **extra_args: Any) -> tuple[PyTree, APTSState]:
    del extra_args  # ``value`` and the like: f(theta^k) comes from the block losses.
    if params is None:
      raise ValueError("apts needs params: call update(grads, state, params, batch=...).")
    if batch is None:
      raise ValueError("apts needs the batch, which it splits into the subdomains: call "
                       "update(grads, state, params, batch=batch).")
    tree_lib.check_like(params, state.grad, "params")
    if grads is not None:
      tree_lib.check_like(grads, params, "grads")
    n_local = _local_count(axis_name, num_subdomains, batch)
    _check_state(state, n_local, method.blocks(params)[1])
    # As JAX arrays: the local loop indexes a subdomain's rows with a traced index, which a
    # NumPy batch (closed over in the caller's jit) cannot take.
    streaming = isinstance(batch, data.Stream)
    rows = data.split_subdomains(
        jax.tree.map(jnp.asarray, batch.minibatches if streaming else batch), n_local)
    sub = stages.Subdomains(loss_fn=loss_fn,
                            blocks=data.minibatch(rows, 0, axis=2) if streaming else rows,
                            num_subdomains=num_subdomains, axis_name=axis_name,
                            dtype=state.radius.dtype, has_aux=has_aux,
                            stream=rows if streaming else None)
    this = method.sized(params)
    this = this._replace(cfg=this.cfg.resolve(streaming))
    if streaming:   # one local iteration per minibatch: nu = H
      this = this._replace(cfg=this.cfg._replace(local_steps=batch.length))
    return _update(this, sub, grads, state, params, n_local)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
