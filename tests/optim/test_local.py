"""Tests of the APTS local iterations (aptsjax.optim.local): the LocalSolver interface, the
masking of finished subdomains, the trust-region local solver's ``local_radius``, the optax local
solver and the choice of a solver by ``local_solver=``.

Expectations are computed by hand or with numpy / optax on the written-out local objectives,
never with the code under test.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aptsjax
from aptsjax import APTSConfig
from aptsjax import TrustRegionConfig
from aptsjax.optim import local
from aptsjax.optim.apts_stages import local_objective
from tests.problems import apts_updates
from tests.problems import assert_close
from tests.problems import flat
from tests.problems import mlp_loss
from tests.problems import problem


def projected_gradient_descent(learning_rate: float) -> local.LocalSolver:
  """A custom solver: gradient steps projected into the local region; counts its steps."""
  def init(params):
    del params
    return jnp.zeros((), jnp.int32)   # steps taken over all updates (a persistent state)

  def start(params, loss, grad, state, bound):
    del bound
    return local.LocalCarry(params=params, loss=loss, state=state, extra=grad)

  def step(value_and_grad, carry, anchor, bound, active):
    moved = optax.tree.sub(optax.tree.add_scale(carry.params, -learning_rate, carry.extra), anchor)
    scale = jnp.minimum(1.0, bound / jnp.maximum(optax.tree.norm(moved), 1e-30))
    params = optax.tree.add_scale(anchor, scale, moved)
    loss, grad = value_and_grad(params)
    new = local.LocalCarry(params=params, loss=loss, state=carry.state + 1, extra=grad)
    return local.keep_inactive(active, new, carry), jnp.array(False)

  return local.LocalSolver(init=init, start=start, step=step)


def reference_steps(params, batch, num, local_steps, learning_rate, bound):
  """The same projected gradient descent on each f_i, one subdomain at a time (no vmap, no loop)."""
  x, y = batch
  rows = x.shape[0] // num
  g = jax.grad(mlp_loss)(params, batch)
  steps, decrease = [], 0.0
  for i in range(num):
    block = (x[rows * i:rows * (i + 1)], y[rows * i:rows * (i + 1)])
    r = jax.tree.map(jnp.subtract, g, jax.grad(mlp_loss)(params, block))
    f_i = local_objective(mlp_loss, block, params, r)
    p = params
    for _ in range(local_steps):
      moved = optax.tree.sub(optax.tree.add_scale(p, -learning_rate, jax.grad(f_i)(p)), params)
      p = optax.tree.add_scale(params, min(1.0, bound / float(optax.tree.norm(moved))), moved)
    steps.append(optax.tree.sub(p, params))
    decrease += float(f_i(params) - f_i(p))
  return jax.tree.map(lambda *s: sum(s), *steps), decrease


def test_custom_solver_through_the_interface(x64):
  """APTS runs a user's solver: nu steps each, the projection, s~ and (6)'s denominator."""
  params, batch = problem(jnp.float64)
  num, nu, lr = 4, 3, 0.05
  tx = aptsjax.apts(mlp_loss, num_subdomains=num, local_steps=nu, global_steps=0,
                    local_solver=projected_gradient_descent(lr), base=APTSConfig.paper())
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(None, s, p, batch=batch))
  updates, state = step(params, state)
  np.testing.assert_array_equal(state.local_steps, [nu] * num)
  np.testing.assert_array_equal(state.local_state, [nu] * num)
  s_sum, decrease = reference_steps(params, batch, num, nu, lr, 0.01 / num)
  assert float(state.predicted_reduction) == pytest.approx(decrease, rel=1e-10)
  assert float(optax.tree.norm(s_sum)) <= 0.01 * (1 + 1e-12)
  assert bool(state.apts_accepted)
  assert_close(updates, s_sum, 1e-10)
  # The persistent state carries over to the next update.
  _, state = step(optax.apply_updates(params, updates), state)
  np.testing.assert_array_equal(state.local_state, [2 * nu] * num)


def quartic_subdomains(curvature):
  """Local objectives with the same gradient g at 0: g.w + curvature_i |w|^4 / 4."""
  g = jnp.array([1.0, -2.0, 0.5])

  def value_and_grad(k, theta):
    return jax.value_and_grad(lambda t: g @ t["w"] + 0.25 * k * jnp.sum(t["w"] ** 2) ** 2)(theta)

  return value_and_grad, {"w": g}, jnp.asarray(curvature)


def assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("vectorize", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_finished_subdomain_keeps_its_memory_exactly(x64, vectorize):
  """Subdomain 0 finishes after one step; the loop goes on for subdomain 1, not touching 0."""
  solver = local.trust_region_local_solver(TrustRegionConfig.paper(), second_order=True, memory=3)
  value_and_grad, grad, curvature = quartic_subdomains([0.5, 40.0])
  anchor = {"w": jnp.zeros(3)}
  states = jax.tree.map(lambda x: jnp.stack([x, x]), solver.init(anchor))
  run = lambda steps: jax.jit(lambda: local.run(solver, value_and_grad, curvature, anchor,
                                                 jnp.zeros(2), grad, states, jnp.asarray(1.0),
                                                 steps, vectorize=vectorize))()
  one, four = run(1), run(4)
  np.testing.assert_array_equal(one.num_steps, [1, 1])
  np.testing.assert_array_equal(four.num_steps, [1, 4])   # 0 reached its boundary, 1 did not
  first = lambda tree: jax.tree.map(lambda x: x[0], tree)
  assert int(one.state.count[0]) == 1                      # its one pair was stored ...
  assert_same(first((one.params, one.loss, one.state)), first((four.params, four.loss, four.state)))
  assert int(four.state.count[1]) > int(one.state.count[1])  # ... while 1 kept storing pairs
  assert float(optax.tree.norm(first(four.params))) == pytest.approx(1.0)


def test_inactive_step_returns_its_carry_unchanged(x64):
  """The TR step with active=False: no move, no radius change, and no pair stored."""
  solver = local.trust_region_local_solver(TrustRegionConfig.paper(), second_order=True, memory=3)
  value_and_grad, grad, _ = quartic_subdomains([])
  vg = lambda theta: value_and_grad(40.0, theta)
  anchor = {"w": jnp.zeros(3)}
  bound = jnp.asarray(1.0)
  step = jax.jit(lambda carry, active: solver.step(vg, carry, anchor, bound, active))
  carry, _ = step(solver.start(anchor, jnp.zeros(()), grad, solver.init(anchor), bound), True)
  moved, _ = step(carry, jnp.array(True))
  kept, _ = step(carry, jnp.array(False))
  assert int(moved.state.count) > int(carry.state.count)   # an active step stores a pair here
  assert_same(kept, carry)


# ----------------------------------------------------------------------------
# local_radius: "bound" and "split" (the TR local solver)

LOCAL_G = np.array([1.0, -2.0, 0.5])


def local_quadratic(curvature: float):
  """value_and_grad of g.w + curvature |w|^2 / 2 (gradient g at the anchor w = 0)."""
  return jax.value_and_grad(lambda w: jnp.asarray(LOCAL_G, w.dtype) @ w + 0.5 * curvature * w @ w)


def local_steps_of(local_radius: str, steps: int, bound: float, curvature: float = 1.0,
                   local_steps: int = 4):
  """First-order TR local iterations from the anchor 0; returns [(|w - 0|, local radius, done)]."""
  cfg = TrustRegionConfig.paper().scaled(2)
  solver = local.trust_region_local_solver(cfg, second_order=False, memory=3,
                                           local_steps=local_steps, local_radius=local_radius)
  anchor, bound = jnp.zeros(3), jnp.asarray(bound)
  carry = solver.start(anchor, jnp.zeros(()), jnp.asarray(LOCAL_G), None, bound)
  out = [(0.0, float(carry.extra[1]), False)]
  step = jax.jit(lambda c: solver.step(local_quadratic(curvature), c, anchor, bound,
                                       jnp.array(True)))
  for _ in range(steps):
    carry, done = step(carry)
    out.append((float(jnp.linalg.norm(carry.params)), float(carry.extra[1]), bool(done)))
  return out


def test_local_radius_split_starts_at_bound_over_local_steps(x64):
  """"split": the first trial step has length bound / nu (a first-order step fills its radius);
  on a gentle quadratic (rho ~ 1 > eta2) the local radius doubles after each step, and the
  steps stop at the bound."""
  bound, nu = 0.2, 4
  trace = local_steps_of("split", 3, bound, local_steps=nu)
  assert trace[0][1] == pytest.approx(bound / nu, rel=1e-15)
  assert trace[1][0] == pytest.approx(bound / nu, rel=1e-14)
  assert trace[1][1] == pytest.approx(2 * bound / nu, rel=1e-14)   # grown after a good step
  # The next step, along the new gradient, is at most the doubled radius; the third reaches
  # the bound (min(radius, room left)) and ends the iterations.
  assert trace[1][0] < trace[2][0] <= trace[1][0] + 2 * bound / nu
  assert not trace[1][2] and not trace[2][2]
  assert trace[3][0] == pytest.approx(bound, rel=1e-12) and trace[3][2]


def test_local_radius_bound_starts_at_bound(x64):
  trace = local_steps_of("bound", 1, 0.2)
  assert trace[0][1] == pytest.approx(0.2, rel=1e-15)
  assert trace[1][0] == pytest.approx(0.2, rel=1e-14) and trace[1][2]


def test_local_radius_split_rejection_does_not_grow_the_radius(x64):
  """A rejected local step must not enlarge the local radius.

  With "split" the local radius would start at Delta / (N nu), below the local floor
  Delta_min / N whenever Delta < nu Delta_min (here Delta = Delta_min = 1e-3, N = 2, nu = 5:
  1e-4 < 5e-4), and the radius update max(alpha radius, min_radius) would turn the shrink after
  a rejected step into a jump up to the floor (a 5 times longer next trial). The start is
  therefore floored at the local Delta_min (and capped by the bound).
  """
  bound = TrustRegionConfig.paper().min_radius / 2
  trace = local_steps_of("split", 1, bound, curvature=1e6, local_steps=5)
  (_, start, _), (moved, after, _) = trace
  assert start == pytest.approx(bound)   # the floor, Delta_min / N, equals the bound here
  assert moved == 0.0                    # rejected: rho < 0 on the steep quadratic
  assert after <= start, (start, after)


# ----------------------------------------------------------------------------
# optax_local_solver


def project(anchor: np.ndarray, point: np.ndarray, bound: float) -> np.ndarray:
  """anchor + the step point - anchor shortened to length ``bound`` when longer."""
  step = point - anchor
  length = np.linalg.norm(step)
  return anchor + (step if length <= bound else step * bound / length)


@pytest.mark.parametrize("lr, projected", [(0.5, True), (0.01, False)])
def test_optax_sgd_local_step_is_projected_sgd(x64, lr, projected):
  """Two local steps of optax.sgd(lr) on g.w + |w|^2 / 2 from the anchor, against numpy."""
  solver = aptsjax.optax_local_solver(optax.sgd(lr))
  anchor, bound = np.array([0.3, -0.1, 0.2]), 0.1
  vg = lambda w: jax.value_and_grad(lambda v: jnp.asarray(LOCAL_G) @ v + 0.5 * v @ v)(w)
  grad = lambda w: LOCAL_G + w
  a = jnp.asarray(anchor)
  carry = solver.start(a, vg(a)[0], vg(a)[1], solver.init(a), jnp.asarray(bound))
  w = anchor
  for _ in range(2):
    carry, done = solver.step(vg, carry, a, jnp.asarray(bound), jnp.array(True))
    sgd = w - lr * grad(w)
    w = project(anchor, sgd, bound)
    np.testing.assert_allclose(carry.params, w, rtol=1e-14)
    if not projected:
      np.testing.assert_allclose(carry.params, sgd, rtol=1e-14)
    assert bool(done) == (np.linalg.norm(sgd - anchor) >= bound)
    np.testing.assert_allclose(carry.extra, grad(w), rtol=1e-14)
    assert float(carry.loss) == pytest.approx(LOCAL_G @ w + 0.5 * w @ w, rel=1e-14)
  if projected:
    assert np.linalg.norm(w - anchor) == pytest.approx(bound, rel=1e-14)


def adam_apts(vectorize: bool, monkeypatch, loss=mlp_loss, steps: int = 2, lr: float = 1e-4):
  """APTS with Adam local solvers (N = 2, 3 local steps, no global step), float64, ``steps``
  updates; the loop shape chosen through the backend it sees."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu" if vectorize else "cpu")
  params, batch = problem(jnp.float64)
  tx = aptsjax.apts(loss, num_subdomains=2, local_steps=3, global_steps=0, second_order=False,
                    local_solver=aptsjax.optax_local_solver(optax.adam(lr)),
                    base=APTSConfig.paper())
  step = jax.jit(lambda p, s: tx.update(None, s, p, batch=batch))
  state, states = tx.init(params), []
  for _ in range(steps):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    states.append(state)
  return params, states


def test_optax_adam_inside_apts_both_loop_shapes(x64, monkeypatch):
  p_seq, s_seq = adam_apts(False, monkeypatch)
  p_vec, s_vec = adam_apts(True, monkeypatch)
  assert_close(p_vec, p_seq, 1e-10)
  assert_close(s_vec[-1].local_state, s_seq[-1].local_state, 1e-10)
  for states in (s_seq, s_vec):
    # Adam's state persists across updates: its count adds up the local steps taken.
    counts = [np.asarray(s.local_state[0].count) for s in states]
    steps = np.cumsum([np.asarray(s.local_steps) for s in states], axis=0)
    np.testing.assert_array_equal(counts, steps)
    assert np.all(counts[-1] > counts[0])


def test_optax_local_solver_nonfinite_subdomain_is_dropped(x64, monkeypatch):
  """Subdomain 0's loss is NaN once the parameters move: it stops after one step, contributes
  nothing, and the denominator of (6) is subdomain 1's decrease alone (reference: the same Adam
  steps, projected, on f_1 written out by hand)."""
  params, (x, y) = problem(jnp.float64)
  marker = jnp.zeros((64,)).at[:32].set(1.0)

  def loss(p, b):
    xb, yb, mb = b
    moved = jnp.abs(p["b2"][0] - params["b2"][0]) > 0
    return mlp_loss(p, (xb, yb)) + jnp.where(moved & (jnp.max(mb) > 0), jnp.nan, 0.0)

  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  batch = (x, y, marker)
  lr, bound = 1e-4, 0.01 / 2
  tx = aptsjax.apts(loss, num_subdomains=2, local_steps=3, global_steps=0, second_order=False,
                    local_solver=aptsjax.optax_local_solver(optax.adam(lr)),
                    base=APTSConfig.paper())
  _, state = jax.jit(lambda p, s: tx.update(None, s, p, batch=batch))(params, tx.init(params))
  np.testing.assert_array_equal(state.local_steps, [1, 3])
  # Block 0 is part of the global objective too, so the trial loss at theta^k + s~ is NaN: the
  # step is rejected and the radius shrinks; actual_reduction reports that NaN as it is.
  assert not bool(state.apts_accepted) and float(state.radius) < 0.01
  bad = [jax.tree_util.keystr(k) for k, leaf in jax.tree_util.tree_leaves_with_path(state)
         if not bool(jnp.all(jnp.isfinite(leaf)))]
  assert bad == [".actual_reduction"], bad
  # Subdomain 1 by hand.
  block = (x[32:], y[32:])
  g = jax.grad(mlp_loss)(params, (x, y))
  r = jax.tree.map(jnp.subtract, g, jax.grad(mlp_loss)(params, block))
  f_1 = local_objective(mlp_loss, block, params, r)
  adam, p = optax.adam(lr), params
  opt = adam.init(params)
  for _ in range(3):
    upd, opt = adam.update(jax.grad(f_1)(p), opt, p)
    moved = optax.tree.sub(optax.apply_updates(p, upd), params)
    p = optax.tree.add_scale(params, min(1.0, bound / float(optax.tree.norm(moved))), moved)
  assert float(state.predicted_reduction) == pytest.approx(float(f_1(params) - f_1(p)), rel=1e-10)


def test_local_solver_by_name_object_or_transformation_is_one_choice():
  """local_solver="adam" is optax_local_solver(optax.adam(local_lr)), as is optax.adam itself."""
  params, batch = problem(jnp.float32, rows=64)
  common = dict(num_subdomains=2, local_steps=3, second_order=False, combine="mean",
                base=APTSConfig.paper())
  outs = [apts_updates(aptsjax.apts(mlp_loss, local_solver=solver, **common), params, batch, 1)
          for solver in ("adam", aptsjax.optax_local_solver(optax.adam(1e-3)), optax.adam(1e-3))]
  for out in outs[1:]:
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(outs[0]), strict=True):
      np.testing.assert_array_equal(a, b)
  # local_lr reaches the named solver.
  faster = apts_updates(aptsjax.apts(mlp_loss, local_solver="adam", local_lr=3e-3, **common),
                        params, batch, 1)
  assert not np.array_equal(flat(faster[0][1]), flat(outs[0][0][1]))
