"""Tests of aptsjax.optim.trust_region: the transformation, its radius trajectory, its guards and
the scaled region ``norm="rms"``.

Expectations are computed by hand or with numpy (float64, tests/oracles.py), never with aptsjax
itself. The ratio test and the radius update alone: tests/optim/test_radius.py; the contract
shared with apts (jit, extra args, dtypes, optax utilities): tests/optim/test_contract.py.
"""
from __future__ import annotations

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import aptsjax
from aptsjax import TrustRegionConfig
from tests.oracles import gamma_oracle
from tests.oracles import rms_oracle
from tests.oracles import sr1_dense
from tests.oracles import tr_subproblem_dense
from tests.problems import A
from tests.problems import B
from tests.problems import X0
from tests.problems import flat
from tests.problems import leaves_like
from tests.problems import lsq_loss
from tests.problems import lsq_problem
from tests.problems import quadratic
from tests.problems import rosenbrock

NAN = float("nan")


def rosenbrock_start(dtype=jnp.float32, shift: float = 0.0):
  """The classic start (-1.2, 1) per pair, optionally shifted."""
  return {"u": jnp.full((3,), -1.2 + shift, dtype), "v": jnp.full((3,), 1.0 - shift, dtype)}


def make_step(tx, loss_fn, batch=None):
  """One full update: gradient at params, tx.update, apply_updates."""

  def step(params, state):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  return step


def run(step, params, state, steps: int):
  """Applies ``step`` ``steps`` times; returns the final (params, state)."""
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


# ----------------------------------------------------------------------------
# First update, memory


def test_first_order_first_step_is_scaled_negative_gradient():
  radius = 0.1
  tx = aptsjax.trust_region(quadratic, second_order=False, init_radius=radius)
  x = jnp.asarray(X0, jnp.float32)
  state = tx.init(x)
  updates, state = tx.update(jax.grad(quadratic)(x), state, x)
  g = A @ X0 - B
  step = -radius * g / np.linalg.norm(g)
  np.testing.assert_allclose(updates, step, rtol=1e-5, atol=1e-7)
  f = lambda z: 0.5 * z @ A @ z - B @ z
  actual, predicted = f(X0) - f(X0 + step), radius * np.linalg.norm(g)
  rho = actual / predicted
  assert rho > 0.75  # so the radius doubles
  assert bool(state.accepted) and not bool(state.nonfinite)
  assert float(state.radius) == pytest.approx(2 * radius, rel=1e-6)
  assert float(state.value) == pytest.approx(f(X0 + step), rel=1e-5)
  np.testing.assert_allclose(state.grad, A @ (X0 + step) - B, rtol=1e-5, atol=1e-6)
  assert float(state.predicted_reduction) == pytest.approx(predicted, rel=1e-5)
  assert float(state.actual_reduction) == pytest.approx(actual, rel=1e-4)
  assert int(state.iteration) == 1 and int(state.num_accepted) == 1
  assert state.memory is None


# ----------------------------------------------------------------------------
# One second-order configuration, compiled once, for the memory and non-finite tests. The
# radius is part of the state, so tests set it with ``state._replace(radius=...)``.

BOX = 3.0
CALLS: list[int] = []  # runtime evaluations of ``fenced`` (see value_and_grad_from_state test)


def fenced(x, batch=None):
  """The quadratic, NaN outside the box |x_i| <= BOX; counts its evaluations in CALLS."""
  jax.debug.callback(lambda: CALLS.append(1))
  return jnp.where(jnp.max(jnp.abs(x)) > BOX, jnp.nan, quadratic(x, batch))


FENCED_TX = aptsjax.trust_region(fenced, memory=3, init_radius=1.0, max_radius=100.0)
FENCED_UPDATE = jax.jit(FENCED_TX.update)


def fenced_state(x, radius: float):
  """``FENCED_TX.init(x)`` with the given radius."""
  state = FENCED_TX.init(x)
  return state._replace(radius=jnp.asarray(radius, state.radius.dtype))


def fenced_step(x, state):
  """One jitted second-order update on ``fenced``; returns (params, updates, state)."""
  updates, state = FENCED_UPDATE(jax.grad(fenced)(x), state, x)
  return optax.apply_updates(x, updates), updates, state


def test_rejected_step_still_feeds_the_memory():
  # Radius 5: the first (steepest-descent) step stays in the box but overshoots (rho < 0).
  x = jnp.asarray(X0, jnp.float32)
  state = fenced_state(x, 5.0)
  assert int(state.memory.count) == 0
  new_x, updates, state = fenced_step(x, state)
  assert not bool(state.accepted) and not bool(state.nonfinite)
  np.testing.assert_array_equal(updates, np.zeros(4))
  np.testing.assert_array_equal(new_x, x)
  assert float(state.radius) == pytest.approx(2.5)
  assert int(state.memory.count) == 1
  g = A @ X0 - B
  s = -5.0 * g / np.linalg.norm(g)  # empty memory: B = 0, the first-order step
  slot = int(np.argmax(np.asarray(state.memory.stamp) == 0))
  np.testing.assert_allclose(state.memory.s[slot], s, rtol=1e-5)
  np.testing.assert_allclose(state.memory.y[slot], A @ s, rtol=1e-4, atol=1e-5)
  # The state keeps the current point's loss and gradient.
  assert float(state.value) == pytest.approx(0.5 * X0 @ A @ X0 - B @ X0, rel=1e-6)
  np.testing.assert_allclose(state.grad, g, rtol=1e-6)


# ----------------------------------------------------------------------------
# Non-finite values


def test_nonfinite_trial_loss_is_rejected():
  # Radius 10: the trial point leaves the box, the trial loss is NaN.
  x = jnp.asarray(X0, jnp.float32)
  new_x, updates, state = fenced_step(x, fenced_state(x, 10.0))
  assert not bool(state.accepted) and not bool(state.nonfinite)
  np.testing.assert_array_equal(new_x, x)
  assert float(state.radius) == pytest.approx(5.0)
  assert float(state.value) == pytest.approx(float(quadratic(x)))
  for leaf in jax.tree.leaves((state.grad, state.memory)):
    assert bool(jnp.all(jnp.isfinite(leaf)))
  # Training goes on: the radius shrinks until the trial point is inside the box.
  for _ in range(6):
    new_x, _, state = fenced_step(new_x, state)
  assert bool(jnp.all(jnp.isfinite(new_x))) and int(state.num_accepted) >= 1
  assert float(fenced(new_x)) < float(quadratic(x))
  # The same with the first-order method.
  tx = aptsjax.trust_region(fenced, second_order=False, init_radius=10.0, max_radius=100.0)
  updates, state = tx.update(jax.grad(fenced)(x), tx.init(x), x)
  np.testing.assert_array_equal(updates, np.zeros(4))
  assert not bool(state.accepted) and float(state.radius) == pytest.approx(5.0)


def test_nonfinite_trial_loss_pair_is_not_stored():
  # trust_region's docstring: "Non-finite trial loss or gradient: the step is rejected and the
  # radius shrinks; the pair is not stored." Here the trial loss is NaN while its gradient is
  # finite (zero: jnp.where's derivative), so y = -g would be a meaningless curvature pair.
  x = jnp.asarray(X0, jnp.float32)
  _, _, state = fenced_step(x, fenced_state(x, 10.0))
  assert not bool(state.accepted)
  assert int(state.memory.count) == 0
  assert not bool(jnp.any(state.memory.in_use))


def nan_gradient_far_from_x0(x, batch=None):
  """The quadratic (finite everywhere) whose gradient is NaN where |x - X0|_inf > 0.5."""
  outside = jnp.max(jnp.abs(x - jnp.asarray(X0, x.dtype))) > 0.5
  # sqrt'(0) = inf, and 0 * inf = NaN in the gradient; the value gains exactly 0.
  return quadratic(x, batch) + 0.0 * jnp.sqrt(jnp.where(outside, 0.0, 1.0) * jnp.sum(x**2))


def test_nonfinite_trial_gradient_is_rejected():
  # Radius 1: the trial point decreases the loss (rho = 0.72, see the first-order test's
  # algebra) but its gradient is NaN: rejected, radius halved, pair not stored.
  tx = aptsjax.trust_region(nan_gradient_far_from_x0, memory=3, init_radius=1.0)
  x = jnp.asarray(X0, jnp.float32)
  grads = jax.grad(nan_gradient_far_from_x0)(x)
  assert bool(jnp.all(jnp.isfinite(grads)))
  updates, state = jax.jit(tx.update)(grads, tx.init(x), x)
  g = A @ X0 - B
  trial = X0 - g / np.linalg.norm(g)
  f = lambda z: 0.5 * z @ A @ z - B @ z
  assert f(trial) < f(X0)
  np.testing.assert_array_equal(updates, np.zeros(4))
  assert not bool(state.accepted) and not bool(state.nonfinite)
  assert float(state.radius) == pytest.approx(0.5)
  assert float(state.value) == pytest.approx(f(X0), rel=1e-6)
  assert int(state.memory.count) == 0
  for leaf in jax.tree.leaves(state):
    assert bool(jnp.all(jnp.isfinite(leaf)))


def test_nonfinite_current_point_is_a_no_op():
  x = jnp.asarray(X0, jnp.float32)
  state = fenced_state(x, 0.5)
  for _ in range(2):
    x, _, state = fenced_step(x, state)
  before = state
  assert int(before.memory.count) > 0 and int(before.num_accepted) > 0
  # (a) non-finite loss at the current point.
  outside = jnp.full((4,), 5.0, jnp.float32)
  updates, state = FENCED_UPDATE(jnp.ones(4, jnp.float32), before, outside)
  # (b) finite loss, non-finite gradient.
  bad_grad = jnp.array([1.0, NAN, 0.0, 0.0], jnp.float32)
  updates_b, state_b = FENCED_UPDATE(bad_grad, before, x)
  for ups, st, at in [(updates, state, outside), (updates_b, state_b, x)]:
    np.testing.assert_array_equal(ups, np.zeros(4))
    assert bool(st.nonfinite) and not bool(st.accepted)
    assert int(st.iteration) == int(before.iteration) + 1
    assert int(st.num_accepted) == int(before.num_accepted)
    assert float(st.radius) == float(before.radius)
    assert float(st.value) == float(before.value)
    assert_trees_equal(st.grad, before.grad)
    assert_trees_equal(st.memory, before.memory)
    assert bool(jnp.all(jnp.isfinite(optax.apply_updates(at, ups))))


# ----------------------------------------------------------------------------
# Errors


def test_non_scalar_loss_raises():
  tx = aptsjax.trust_region(lambda x, batch: x**2)
  x = jnp.ones(3)
  with pytest.raises(ValueError, match="scalar"):
    tx.update(jnp.ones(3), tx.init(x), x)
  with pytest.raises(ValueError, match="scalar"):
    jax.jit(lambda g, s, p: tx.update(g, s, p))(jnp.ones(3), tx.init(x), x)


@pytest.mark.parametrize("grads", [
    {"u": jnp.ones(3)},                                                # missing leaf
    {"u": jnp.ones(3), "v": jnp.ones(3), "w": jnp.ones(1)},            # extra leaf
    {"u": jnp.ones(4), "v": jnp.ones(3)},                              # wrong shape
    [jnp.ones(3), jnp.ones(3)],                                        # wrong container
], ids=["missing", "extra", "shape", "container"])
def test_mismatched_grads_raise(grads):
  tx = aptsjax.trust_region(rosenbrock)
  params = rosenbrock_start()
  with pytest.raises(ValueError):
    tx.update(grads, tx.init(params), params)
  other = {"u": jnp.ones(2), "v": jnp.ones(2)}  # params unlike the state's
  with pytest.raises(ValueError):
    tx.update(other, tx.init(params), other)


@pytest.mark.parametrize("kwargs", [
    dict(memory=0), dict(memory=-1), dict(memory=2.5), dict(memory=True),
    dict(min_radius=5.0, max_radius=1.0), dict(min_radius=0.0), dict(init_radius=10.0),
    dict(eta1=0.8, eta2=0.5), dict(eta_accept=0.5, eta1=0.25), dict(eta2=1.0),
    dict(alpha=1.5), dict(beta=0.5), dict(learning_rate=0.1), dict(radius=1.0),
])
def test_bad_configuration_raises_at_construction(kwargs):
  with pytest.raises(ValueError):
    aptsjax.trust_region(rosenbrock, **kwargs)


def test_memory_must_be_an_integer():
  with pytest.raises(ValueError, match="memory must be an integer >= 1, got 2.5"):
    aptsjax.trust_region(lsq_loss, memory=2.5, second_order=False)


def test_missing_or_empty_batch_is_a_clear_value_error():
  params, batch = lsq_problem()
  grads = jax.grad(lsq_loss)(params, batch)
  tx = aptsjax.trust_region(lsq_loss)
  with pytest.raises(ValueError, match=r"without batch=.*loss_fn\(params, None\) failed") as info:
    tx.update(grads, tx.init(params), params)
  assert "tx.update(grads, state, params, batch=batch)" in str(info.value)
  assert "optimizer.update(model, grads, batch=batch)" in str(info.value)
  assert isinstance(info.value.__cause__, TypeError)  # the user's own error, chained
  # A loss without data still runs with batch=None (first order: an eager update is cheap).
  quad = aptsjax.trust_region(lambda p, _: jnp.sum(p ** 2), second_order=False)
  x = jnp.ones(3)
  updates, _ = quad.update(2.0 * x, quad.init(x), x)
  assert float(jnp.sum((x + updates) ** 2)) < 3.0
  empty = jax.tree.map(lambda a: a[:0], batch)
  with pytest.raises(ValueError, match="0 rows"):
    tx.update(grads, tx.init(params), params, batch=empty)


def test_rescaling_chain_consequence_is_documented():
  """A rescaling chain is documented, not detected: the documented consequence."""
  for doc in (aptsjax.trust_region.__doc__, aptsjax.apts.__doc__):
    assert "optax.chain(tx,\n  optax.scale(c))" in doc or "optax.chain(tx, optax.scale(c))" in doc
    assert "not detected" in doc
  params, batch = lsq_problem()
  gaps = {}
  for name, tx in (("alone", aptsjax.trust_region(lsq_loss, second_order=False)),
                   ("scaled", optax.chain(aptsjax.trust_region(lsq_loss, second_order=False),
                                          optax.scale(0.5)))):
    state = tx.init(params)
    grads = jax.grad(lsq_loss)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    tr_state = state if name == "alone" else state[0]
    assert bool(tr_state.accepted)
    new_params = optax.apply_updates(params, updates)
    gaps[name] = abs(float(tr_state.value) - float(lsq_loss(new_params, batch)))
    gaps[name] /= float(lsq_loss(new_params, batch))
  assert gaps["alone"] < 1e-6, gaps   # state.value is the loss at the new parameters ...
  assert gaps["scaled"] > 1e-3, gaps  # ... but not after optax.scale(0.5) halved the step.


# ----------------------------------------------------------------------------
# Save / restore, jit, vmap, dtypes (one second-order configuration on extended Rosenbrock)

ROSEN_TX = aptsjax.trust_region(rosenbrock, memory=4)
ROSEN_STEP = jax.jit(make_step(ROSEN_TX, rosenbrock))
ROSEN_VMAP_STEP = jax.jit(jax.vmap(make_step(ROSEN_TX, rosenbrock)))
SHIFTS = (0.0, 0.2, -0.3, 0.5)


def test_state_round_trip_resumes_bit_identically():
  params0 = rosenbrock_start()
  mid_params, mid_state = run(ROSEN_STEP, params0, ROSEN_TX.init(params0), 8)
  assert int(mid_state.memory.count) > 0  # the memory is in use
  want_params, want_state = run(ROSEN_STEP, mid_params, mid_state, 8)

  data_params = flax.serialization.to_bytes(mid_params)
  data_state = flax.serialization.to_bytes(mid_state)
  template = rosenbrock_start(shift=0.3)
  params = flax.serialization.from_bytes(template, data_params)
  state = flax.serialization.from_bytes(ROSEN_TX.init(template), data_state)
  assert jax.tree.structure(state) == jax.tree.structure(mid_state)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(mid_state)):
    assert got.dtype == want.dtype and got.shape == want.shape
  got_params, got_state = run(ROSEN_STEP, params, state, 8)
  assert_trees_equal(got_params, want_params)
  assert_trees_equal(got_state, want_state)
  assert got_params["u"].dtype == jnp.float32


def tolerance(dtype) -> dict:
  return dict(rtol=1e-4, atol=1e-5) if dtype == jnp.float32 else dict(rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", pytest.param("float64", marks=pytest.mark.slow)])
def test_vmap_matches_separate_runs(dtype, request):
  if dtype == "float64":
    request.getfixturevalue("x64")
  dtype, steps = jnp.dtype(dtype), 6
  starts = [rosenbrock_start(dtype, shift) for shift in SHIFTS]
  singles = [run(ROSEN_STEP, p, ROSEN_TX.init(p), steps) for p in starts]
  for params, state in singles:
    assert params["u"].dtype == dtype and state.radius.dtype == dtype
    assert state.value.dtype == dtype and state.memory.ss.dtype == dtype
    assert state.grad["u"].dtype == dtype

  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  params, state = run(ROSEN_VMAP_STEP, stack(starts), stack([ROSEN_TX.init(p) for p in starts]),
                      steps)
  tol = tolerance(dtype)
  for i, (want_params, want_state) in enumerate(singles):
    take = lambda tree: jax.tree.map(lambda x: x[i], tree)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), take(params), want_params)
    got = take(state)
    assert bool(got.accepted) == bool(want_state.accepted)
    assert int(got.num_accepted) == int(want_state.num_accepted)
    assert int(got.memory.count) == int(want_state.memory.count)
    np.testing.assert_allclose(got.radius, want_state.radius, **tol)
    np.testing.assert_allclose(got.value, want_state.value, **tol)
  # The problems really differ and all make progress.
  losses = [float(s.value) for _, s in singles]
  assert len(set(losses)) == len(losses)
  assert all(l < float(rosenbrock(p)) for l, p in zip(losses, starts))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_jit_matches_no_jit(dtype, request):
  # First order: the second-order update is far too slow to run op by op in a unit test.
  if dtype == "float64":
    request.getfixturevalue("x64")
  dtype, steps = jnp.dtype(dtype), 8
  tx = aptsjax.trust_region(rosenbrock, second_order=False, init_radius=0.1)
  step = make_step(tx, rosenbrock)
  params0 = rosenbrock_start(dtype)
  eager = run(step, params0, tx.init(params0), steps)
  jitted = run(jax.jit(step), params0, tx.init(params0), steps)
  tol = tolerance(dtype)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), eager, jitted)
  assert eager[0]["u"].dtype == dtype and jitted[1].radius.dtype == dtype
  assert int(jitted[1].num_accepted) >= steps // 2
  assert float(jitted[1].value) < float(rosenbrock(params0))


# ----------------------------------------------------------------------------
# value_and_grad_from_state


def test_value_and_grad_from_state_reuses_and_matches():
  steps = 8
  x0 = jnp.asarray(X0, jnp.float32)

  def trajectory(value_and_grad):
    """Full-batch updates of FENCED_TX (jitted, value= given); returns (path, loss calls)."""
    CALLS.clear()
    x, state, path = x0, fenced_state(x0, 0.5), []
    for _ in range(steps):
      value, grads = value_and_grad(x, state)
      updates, state = FENCED_UPDATE(grads, state, x, value=value)
      x = optax.apply_updates(x, updates)
      path.append((x, state))
    return path, len(CALLS)

  recompute = jax.value_and_grad(fenced)
  path_a, calls_a = trajectory(lambda x, state: recompute(x, None))
  reuse = aptsjax.value_and_grad_from_state(fenced)
  path_b, calls_b = trajectory(lambda x, state: reuse(x, None, state=state))

  for (xa, sa), (xb, sb) in zip(path_a, path_b):
    np.testing.assert_allclose(xa, xb, rtol=1e-6, atol=1e-7)
    assert bool(sa.accepted) == bool(sb.accepted)
    np.testing.assert_allclose(sa.radius, sb.radius, rtol=1e-6)
    np.testing.assert_allclose(sa.value, sb.value, rtol=1e-6)
  assert int(path_a[-1][1].num_accepted) >= steps // 2
  assert float(path_a[-1][1].value) < float(quadratic(x0))
  # Recomputing: one evaluation at params and one at the trial point per iteration. Reusing:
  # the one at the trial point only, once the state holds the loss and gradient.
  assert calls_a == 2 * steps
  assert calls_b == steps + 1


# ----------------------------------------------------------------------------
# trust_region with radius_growth: the radius trajectory against a numpy re-implementation


def radius_rule(radius, rho, step_norm, growth, hp=TrustRegionConfig()):
  """The radius update (7) in numpy; for "boundary" growth needs |s| = radius.

  Returns None when the step length is too close to the boundary fraction to classify.
  """
  on_boundary = step_norm >= (1 - 1e-9) * radius
  if growth == "boundary" and rho > hp.eta2 and not on_boundary and step_norm > (1 - 2e-3) * radius:
    return None
  if rho > hp.eta2 and (growth == "always" or on_boundary):
    return min(hp.beta * radius, hp.max_radius)
  if rho < hp.eta1:
    return max(hp.alpha * radius, hp.min_radius)
  return radius


@pytest.mark.parametrize("growth", ["always", "boundary"])
def test_trust_region_radius_growth(x64, growth):
  """Second-order TR on Rosenbrock: every radius update follows the rule of ``growth``; some
  accepted interior steps with rho > eta2 happen, which grow the radius only for "always"."""
  tx = aptsjax.trust_region(rosenbrock, memory=3, init_radius=0.1, radius_growth=growth)
  update = jax.jit(tx.update)
  x = {"u": jnp.full((2,), -1.2), "v": jnp.full((2,), 1.0)}
  state = tx.init(x)
  interior_good = 0
  for _ in range(14):
    radius = float(state.radius)
    updates, state = update(jax.grad(rosenbrock)(x), state, x)
    rho = float(state.actual_reduction) / float(state.predicted_reduction)
    step_norm = float(optax.tree.norm(updates))   # 0 for a rejected step (which has rho <= 0)
    expected = radius_rule(radius, rho, step_norm, growth)
    assert expected is not None
    assert float(state.radius) == pytest.approx(expected, rel=1e-12)
    if bool(state.accepted) and rho > 0.75 and step_norm < (1 - 1e-3) * radius:
      interior_good += 1
      assert (float(state.radius) > radius) == (growth == "always")
    x = optax.apply_updates(x, updates)
  assert interior_good >= 2


# ----------------------------------------------------------------------------
# trust_region with norm="rms"

_RNG = np.random.default_rng(3)
_Q = _RNG.normal(size=(6, 6))
QA = _Q @ _Q.T / 6 + np.diag([20.0, 5.0, 1.0, 0.2, 0.05, 2.0])   # SPD, badly scaled
QB = _RNG.normal(size=6)
QX0 = _RNG.normal(size=6)
QTEMPLATE = {"a": jnp.zeros(2), "b": jnp.zeros(4)}


def scaled_quadratic(params, batch=None):
  """f(x) = 0.5 x.Ax - b.x on a two-leaf pytree (x its ravelled vector)."""
  del batch
  x = ravel_pytree(params)[0]
  return 0.5 * x @ (jnp.asarray(QA, x.dtype) @ x) - jnp.asarray(QB, x.dtype) @ x


def quadratic_grad(x: np.ndarray) -> np.ndarray:
  return QA @ x - QB


def test_first_order_rms_step(x64):
  """s = -Delta D^{-2} g / |D^{-1} g| with D from the first gradient; |D s| = Delta."""
  radius, decay, eps = 0.3, 0.999, 1e-8
  tx = aptsjax.trust_region(scaled_quadratic, second_order=False, norm="rms", init_radius=radius)
  x = leaves_like(QTEMPLATE, QX0)
  updates, state = jax.jit(tx.update)(jax.grad(scaled_quadratic)(x), tx.init(x), x)
  g = quadratic_grad(QX0)
  _, d = rms_oracle([g], decay, eps)
  assert np.ptp(d) > 0.5                                 # D is far from the identity here
  step = -radius * g / d**2 / np.linalg.norm(g / d)
  assert bool(state.accepted)
  np.testing.assert_allclose(flat(updates), step, rtol=1e-12)
  assert np.linalg.norm(d * flat(updates)) == pytest.approx(radius, rel=1e-12)
  np.testing.assert_allclose(flat(state.scaling.d), d, rtol=1e-12)
  # The state holds the theta-space gradient and the loss at the new point.
  x1 = QX0 + step
  np.testing.assert_allclose(flat(state.grad), quadratic_grad(x1), rtol=1e-12, atol=1e-12)
  assert float(state.value) == pytest.approx(0.5 * x1 @ QA @ x1 - QB @ x1, rel=1e-12)
  # The predicted reduction is that of the first-order model: -g.s = Delta |D^{-1} g|.
  assert float(state.predicted_reduction) == pytest.approx(radius * np.linalg.norm(g / d),
                                                           rel=1e-12)


def stored_pairs(memory) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Every stored pair (rows, oldest first) and its slot numbers, in the state's variables."""
  stamp = np.asarray(memory.stamp)
  slots = [i for i in np.argsort(stamp, kind="stable") if stamp[i] >= 0]
  row = lambda stack, i: flat(jax.tree.map(lambda b: b[i], stack))
  return (np.stack([row(memory.s, i) for i in slots]), np.stack([row(memory.y, i) for i in slots]),
          np.asarray(slots))


def sr1_safeguard_passes(S: np.ndarray, Y: np.ndarray, gamma: float, r_tol: float) -> bool:
  """Whether every pair passes |s.r| > r_tol |s| |r| in the SR1 recursion from gamma I."""
  B = gamma * np.eye(S.shape[1])
  for s, y in zip(S, Y):
    r = y - B @ s
    if abs(s @ r) <= r_tol * np.linalg.norm(s) * np.linalg.norm(r):
      return False
    B = B + np.outer(r, r) / (r @ s)
  return True


def test_second_order_rms_step_matches_dense_oracle(x64):
  """Each update solves the L-SR1 subproblem in u = D theta with the memory moved to the new D.

  The oracle: D from the gradients so far (numpy); the stored pairs (kept in the previous
  variables) times D_new / D_old and divided by it; gamma from the pencil; B_u their SR1
  recursion; u = the dense trust-region solution for g_u = g / d; the step in theta is u / d.
  """
  radius0, decay, eps = 0.3, 0.999, 1e-8
  tx = aptsjax.trust_region(scaled_quadratic, memory=3, norm="rms", init_radius=radius0)
  update = jax.jit(tx.update)
  x = leaves_like(QTEMPLATE, QX0)
  state = tx.init(x)
  grads, checked, interior = [], 0, 0
  for it in range(8):
    xv = flat(x)
    g = quadratic_grad(xv)
    grads.append(g)
    _, d = rms_oracle(grads, decay, eps)
    radius = float(state.radius)
    S_old, Y_old, _ = stored_pairs(state.memory) if int(state.memory.count) else (None,) * 3
    updates, new = update(jax.grad(scaled_quadratic)(x), state, x)
    np.testing.assert_allclose(flat(new.scaling.d), d, rtol=1e-12)
    S_new, Y_new, slots = stored_pairs(new.memory)
    # The memory is kept in u = D theta: every pair is (D s, D^{-1} A s) for a theta-step s.
    a_u = QA / d[:, None] / d[None, :]
    np.testing.assert_allclose(Y_new, S_new @ a_u.T, rtol=0,
                               atol=1e-10 * np.abs(Y_new).max())
    stored_now = int(new.memory.count) > int(state.memory.count)
    u_step = S_new[-1] if stored_now else None
    if stored_now and bool(new.accepted):
      np.testing.assert_allclose(flat(updates), u_step / d, rtol=1e-12, atol=1e-15)
    if stored_now and bool(new.accepted) and it >= 1:
      d_old = flat(state.scaling.d)
      S_u, Y_u = S_old * (d / d_old), Y_old / (d / d_old)
      gamma = gamma_oracle(S_u, Y_u)
      assert sr1_safeguard_passes(S_u, Y_u, gamma, 1e-8)   # every pair in use
      p, _ = tr_subproblem_dense(g / d, sr1_dense(S_u, Y_u, gamma), radius)
      np.testing.assert_allclose(u_step, p, rtol=0, atol=1e-8 * np.linalg.norm(p))
      checked += 1
      interior += np.linalg.norm(p) < (1 - 1e-3) * radius
    assert np.linalg.norm(d * flat(updates)) <= radius * (1 + 1e-12)
    x, state = optax.apply_updates(x, updates), new
  assert checked >= 3 and interior >= 1, (checked, interior)
