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
4. ``global_steps`` TR iterations on the global objective from there (default 1). Steps 3 and
   4 are one loop of 1 + ``global_steps`` trips sharing one trial evaluation and one
   ``trust_region.commit``.

Communication per update with ``axis_name`` set: one all-reduce of s~ (n floats), one of the
gradient at theta^k + s~ (n), one per global step (n), plus a few scalars; with the caller's
all-reduce of g^k that is 4 n + O(1) floats for global_steps = 1, independent of local_steps.
Forward and backward passes over the batch per update: 1 (theta^k) + up to ``local_steps`` (the
local trials) + 1 (theta^k + s~) + ``global_steps``.

Each subdomain keeps its own L-SR1 memory across updates: with the same data every iteration
(APTS) its pairs stay pairs of the same f(.; D_i) (the linear term r_i cancels in y), so the
curvature model keeps improving; with minibatches (SAPTS) it is the usual stochastic
quasi-Newton memory. The local radius restarts at Delta^k / N each update.

The steps above are the paper's method, ``Hyperparams.paper()``. The options of
``aptsjax.Hyperparams`` (docs/method.md, "Options beyond the paper") change them: ``combine=
"mean"`` takes s~ as the mean of the local steps, each bounded by Delta^k, and the denominator
of (6) as the mean of the local decreases; ``local_method="adam"`` runs Adam steps projected into
the local region instead of local TR; ``norm="rms"`` runs every phase in u = D theta (the region
|D s~| <= Delta^k); ``local_radius="split"`` starts the local radius at Delta^k / (N nu) (the
bound divided by nu); ``radius_growth="boundary"`` grows the radius only after steps on the
boundary.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aptsjax.numerics import checks as _checks
from aptsjax.numerics import tree as _stack
from aptsjax.optim import blocks as pblocks
from aptsjax import data
from aptsjax.optim import local
from aptsjax.numerics import lsr1
from aptsjax.numerics import scaling
from aptsjax.optim import trust_region as tr
from aptsjax.optim.settings import Hyperparams, reaches_boundary
from aptsjax.optim.local import LocalCarry, LocalSolver, trust_region_local_solver  # re-exported

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
    scaling: the diagonal scaling D of ``norm="rms"`` (``aptsjax.scaling``), None otherwise;
      with it, every L-SR1 memory holds its pairs in the variables u = D theta.
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
  scaling: scaling.ScaleState | None = None

  PER_SUBDOMAIN = ("local_steps", "local_state")


def to_varying(tree: PyTree, axis_name: str | None) -> PyTree:
  """Marks a device-invariant pytree as varying over ``axis_name`` (no-op when None or varying).

  Inside ``jax.shard_map`` with check_vma=True, differentiating a shard's loss with respect to
  invariant parameters would return the psum of the shard gradients; casting first keeps each
  device's gradient its own (and keeps all-reduces out of the local iterations).
  """
  if axis_name is None:
    return tree
  cast = lambda x: x if axis_name in _stack.varying_axes(x) else jax.lax.pcast(x, axis_name, to="varying")
  return jax.tree.map(cast, tree)


def _device_count(axis_name: str | None) -> int:
  if axis_name is None:
    return 1
  try:
    return jax.lax.axis_size(axis_name)
  except NameError as e:
    raise ValueError(f"axis_name {axis_name!r} is not bound: call update inside jax.shard_map or "
                     "jax.pmap over that axis, or use axis_name=None on one device.") from e


def local_objective(loss_fn: LossFn, block: Any, theta_k: PyTree, r: PyTree
                    ) -> Callable[[PyTree], jax.Array]:
  """The local objective (3)-(4): f_i(theta) = f(theta; D_i) + <r_i, theta - theta^k>.

  With r_i = g^k - grad f(theta^k; D_i), grad f_i(theta^k) = g^k (first-order consistency): the
  term is part of the function that is differentiated, not added after the backward pass as in
  the authors' reference code (docs/method.md, "Departures from the reference code"). r_i is
  constant, so it cancels in L-SR1 pairs.
  """
  def f_i(theta):
    loss = tr.scalar_loss(loss_fn, theta, block)
    return (loss + _stack.vdot(r, optax.tree.sub(theta, theta_k))).astype(loss.dtype)
  return f_i


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


def apts(loss_fn: LossFn, num_subdomains: int = 2, local_steps: int = 5,
         second_order: bool = False, axis_name: str | None = None, memory: int = 10,
         global_steps: int = 1, local_solver: LocalSolver | None = None,
         base: Hyperparams | None = None, param_blocks: Any = None,
         block_bound: str = "equal", **hyperparams: float | str
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
    num_subdomains: N, the total number of subdomains (in every mode); num_subdomains,
      local_steps, memory (>= 1) and global_steps (>= 0) must be integers (ValueError).
    local_steps: nu, the maximum local TR iterations per update.
    second_order: L-SR1 models (local and global; with the Adam local solver, the global
      steps) or first-order models. False by default: with the default options first order
      was better on the validation split in every setting of the study (docs/method.md,
      "Defaults"); True with ``base=Hyperparams.paper()`` is the paper's second-order APTS.
    axis_name: None on one device; the mesh/pmap axis name across devices (its size D must
      divide N; each device's shard of the batch holds its N / D subdomains).
    memory: L-SR1 pairs per memory (each subdomain's and the global one).
    global_steps: global TR iterations after the APTS step (the paper: 1).
    local_solver: a ``LocalSolver`` replacing the one ``local_method`` names (for instance
      ``aptsjax.optax_local_solver(optax.sgd(1e-2, momentum=0.9))``).
    base: the table the overrides apply to: ``Hyperparams()`` (the library's defaults) when
      None, ``Hyperparams.paper()`` for the paper's method exactly.
    param_blocks: None (subdomains of the data only), ``"leaves"``, ``"layers"`` or a labels
      pytree (``aptsjax.blocks``): J parameter blocks, N x J local problems (see above).
    block_bound: how the local bound is split over the blocks (``aptsjax.blocks.divisors``):
      ``"equal"`` (/ sqrt(J) each) or ``"size"`` (x sqrt(n_j / n), the same per entry).
    **hyperparams: overrides of ``aptsjax.Hyperparams`` (radii, thresholds and factors as the
      paper: init_radius 0.01, min_radius 0.001, max_radius 4.0, eta_accept 0, eta1 0.25,
      eta2 0.75, alpha 0.5, beta 2; options ``radius_growth``, ``norm``, ``rms_decay``,
      ``rms_eps``, ``local_radius``, ``combine``, ``local_method``, ``local_lr``). With
      ``combine="sum"`` the local radii are the radii divided by N, with ``"mean"`` the radii.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``APTSState``.
  """
  num_subdomains = _checks.as_int("num_subdomains", num_subdomains, 1)
  local_steps = _checks.as_int("local_steps", local_steps, 1)
  memory = _checks.as_int("memory", memory, 1)
  global_steps = _checks.as_int("global_steps", global_steps, 0)
  hp = tr.make_hyperparams(base, **hyperparams)
  # combine="sum" (the paper): s~ = sum_i s_i with local bound Delta / N; "mean": s~ = the mean
  # of the s_i with local bound Delta (docs/method.md, "Combining the local steps").
  local_share = num_subdomains if hp.combine == "sum" else 1
  weight = 1.0 if hp.combine == "sum" else 1.0 / num_subdomains
  pblocks.check_name(param_blocks)  # an unknown name raises now; labels are checked at init
  if block_bound not in pblocks.BOUNDS:
    raise ValueError(f"block_bound must be one of {pblocks.BOUNDS}, got {block_bound!r}.")

  def make_solver(share: float) -> LocalSolver:
    """The local solver with the local radii divided by ``share`` (N or 1; x sqrt(J))."""
    if local_solver is not None:
      return local_solver
    if hp.local_method == "adam":
      return local.optax_local_solver(optax.adam(hp.local_lr))
    return trust_region_local_solver(hp.scaled(share), second_order, memory, local_steps)
  n_sub = num_subdomains

  def init_fn(params: PyTree) -> APTSState:
    _checks.check_params(params, second_order)
    dtype = _stack.tree_dtype(params)
    spec = pblocks.resolve(param_blocks, params)
    count = pblocks.count(spec)
    local = jax.tree.map(lambda x: jnp.repeat(x[None], n_sub * count, axis=0),
                         make_solver(pblocks.share(local_share, spec)).init(params))
    zero = jnp.zeros((), dtype)
    return APTSState(
        radius=jnp.asarray(hp.init_radius, dtype), value=jnp.asarray(jnp.inf, dtype),
        grad=optax.tree.zeros_like(params), accepted=jnp.array(False),
        apts_accepted=jnp.array(False), stalled=jnp.array(False), nonfinite=jnp.array(False),
        iteration=jnp.zeros((), jnp.int32), predicted_reduction=zero, actual_reduction=zero,
        local_steps=jnp.zeros((n_sub * count,), jnp.int32), local_state=local,
        global_memory=lsr1.init(params, memory) if second_order else None,
        scaling=scaling.init(params) if hp.norm == "rms" else None)

  def update_fn(grads: PyTree, state: APTSState, params: PyTree | None = None, *,
                batch: Any = None, **extra_args: Any) -> tuple[PyTree, APTSState]:
    del extra_args  # ``value`` and the like: f(theta^k) comes from the block losses.
    if params is None:
      raise ValueError("apts needs params: call update(grads, state, params, batch=...).")
    if batch is None:
      raise ValueError("apts needs the batch, which it splits into the subdomains: call "
                       "update(grads, state, params, batch=batch).")
    _stack.check_like(params, state.grad, "params")
    if grads is not None:
      _stack.check_like(grads, params, "grads")
    num_devices = _device_count(axis_name)
    if n_sub % num_devices:
      raise ValueError(f"num_subdomains={n_sub} is not divisible by the {num_devices} devices "
                       f"of axis {axis_name!r}.")
    n_local = n_sub // num_devices
    _check_rows(data.row_count(batch), n_sub, num_devices)
    spec = pblocks.resolve(param_blocks, params)
    count, share = pblocks.count(spec), pblocks.share(local_share, spec)
    solver = make_solver(share)
    if state.local_steps.shape != (n_local * count,):
      raise ValueError(f"the state holds {state.local_steps.shape[0]} local problems here, "
                       f"expected {n_local} subdomains x {count} parameter blocks: init it with "
                       "the same param_blocks and shard it with aptsjax.state_specs (shard_map) "
                       "or aptsjax.parallel.pmap_state (pmap).")
    blocks = data.split_subdomains(batch, n_local)   # this device's subdomains, in order
    dtype = state.radius.dtype

    def total(x):  # sum over this device's subdomains, then over devices.
      x = _stack.sum_leading(x)
      return x if axis_name is None else jax.lax.psum(x, axis_name)

    def block_value_and_grad(p):
      def one(blk):
        return jax.value_and_grad(lambda q: tr.scalar_loss(loss_fn, q, blk))(to_varying(p, axis_name))
      return jax.vmap(one)(blocks)

    def global_value_and_grad(p):
      losses, block_grads = block_value_and_grad(p)
      return (total(losses) / n_sub).astype(dtype), jax.tree.map(lambda g: total(g) / n_sub, block_grads)

    losses, block_grads = block_value_and_grad(params)
    loss_k = (total(losses) / n_sub).astype(dtype)
    if grads is None:  # g^k from the block gradients (one all-reduce), no extra pass.
      grads = jax.tree.map(lambda g: total(g) / n_sub, block_grads)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    ok = jnp.isfinite(loss_k) & _stack.all_finite(grads)

    # norm="rms": D from g^k (the same on every device), the memories moved to the new
    # variables, and everything below in u = D theta (aptsjax.scaling); identity otherwise.
    scale, local_state, gmem = state.scaling, state.local_state, state.global_memory
    if hp.norm == "rms":
      scale = scaling.update(state.scaling, grads, hp.rms_decay, hp.rms_eps, valid=ok)
      ratio = scaling.ratio(state.scaling, scale)
      if gmem is not None:
        gmem = lsr1.rescale(gmem, ratio)
      if solver.rescale is not None and jax.tree.leaves(local_state):
        local_state = jax.vmap(solver.rescale, in_axes=(0, None))(local_state, ratio)
    coords = scaling.coordinates(scale)

    # Local iterations on f_i, all of this device's subdomains in one loop (aptsjax.local); with
    # J parameter blocks problem i * J + j runs on f_i restricted to block j, bound / sqrt(J).
    if spec is not None:   # problem i * J + j: the bound of block j
      share = jnp.asarray(np.tile(pblocks.divisors(local_share, spec, block_bound), n_local), dtype)
    bound = jnp.where(ok, state.radius / share, 0.0)   # 0: no local iterations (no-op)
    theta_k = to_varying(params, axis_name)
    u_k = coords.to_u(theta_k)
    g_k = to_varying(grads, axis_name)

    r = jax.tree.map(lambda g, gi: g[None] - gi, g_k, block_grads)
    inputs, pick, project = pblocks.problems((blocks, r), n_local, spec)

    def local_value_and_grad(inp, u):
      blk, r_i = pick(inp)
      f_i = jax.value_and_grad(local_objective(loss_fn, blk, theta_k, r_i))
      return coords.value_and_grad(f_i)(u)

    losses_ij = losses if spec is None else jnp.repeat(losses, count)
    res = local.run(solver, local_value_and_grad, inputs, u_k, losses_ij.astype(dtype),
                    coords.grad_to_u(g_k), local_state, bound, local_steps, project=project)

    def contribution(theta_i, loss_end, loss_i):  # a non-finite subdomain contributes nothing
      step = optax.tree.sub(theta_i, u_k)
      good = jnp.isfinite(loss_end) & _stack.all_finite(step) & jnp.isfinite(loss_i)
      return (jax.tree.map(lambda x: jnp.where(good, weight * x, 0.0), step),
              jnp.where(good, weight * (loss_i - loss_end), 0.0))

    steps, decrease = jax.vmap(contribution)(res.params, res.loss, losses_ij)
    s_sum = jax.tree.map(total, steps)
    s_norm = _stack.norm(s_sum).astype(dtype)
    shrink_to = jnp.where(s_norm > state.radius, state.radius / jnp.where(s_norm > 0, s_norm, 1.0), 1.0)
    s_sum = optax.tree.scale(shrink_to, s_sum)
    s_on_boundary = reaches_boundary(jnp.minimum(s_norm, state.radius), state.radius)
    predicted = total(decrease).astype(dtype)
    global_value_and_grad_u = coords.value_and_grad(global_value_and_grad)

    # The global phase: event 0 decides the APTS step s~ (ratio (6), radius update (7), global
    # memory pair), events 1..global_steps are TR iterations on the global objective. One
    # proposal, one trial evaluation, one tr.commit for all of them.
    def event(i, c):
      theta, loss, grad, radius, gmem, _, changed, apts = c
      first = i == 0
      cast = lambda step: jax.tree.map(lambda x, p: x.astype(p.dtype), step, params)

      def model():
        result = tr.model_step(grad, gmem, radius)
        return cast(result.step), result.predicted_reduction.astype(dtype), result.on_boundary

      step, pred, edge = jax.lax.cond(first, lambda: (cast(s_sum), predicted, s_on_boundary),
                                      model)
      trial_loss, trial_grad = global_value_and_grad_u(optax.apply_updates(theta, step))
      out = tr.commit(theta, loss, grad, radius, gmem,
                      tr.Trial(step, pred, trial_loss, trial_grad, edge), hp, store_pair=ok)
      apts = jax.tree.map(lambda a, b: jnp.where(first, a, b), (out.accepted, out.actual), apts)
      return (out.params, out.loss, out.grad, out.radius, out.memory, ~first & out.stalled,
              changed | out.accepted, apts)

    u_start = coords.to_u(params)
    start = (u_start, loss_k, coords.grad_to_u(grads), state.radius, gmem, jnp.array(False),
             jnp.array(False), (jnp.array(False), jnp.zeros((), dtype)))
    theta, loss, grad, radius, gmem, stalled, changed, (accept, actual) = jax.lax.fori_loop(
        0, 1 + global_steps, event, start)
    grad = coords.grad_to_theta(grad)

    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    moved = coords.to_theta(optax.tree.sub(theta, u_start))
    updates = jax.tree.map(lambda a: jnp.where(ok, a, jnp.zeros_like(a)), moved)
    new_state = APTSState(
        radius=jnp.where(ok, radius, state.radius), value=jnp.where(ok, loss, state.value),
        grad=keep(grad, state.grad), accepted=ok & changed, apts_accepted=ok & accept,
        stalled=ok & stalled, nonfinite=~ok, iteration=state.iteration + 1,
        predicted_reduction=jnp.where(ok, predicted, 0.0),
        actual_reduction=jnp.where(ok, actual, 0.0).astype(dtype),
        local_steps=jnp.where(ok, res.num_steps, 0).astype(jnp.int32),
        local_state=res.state, global_memory=gmem, scaling=scale)
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
