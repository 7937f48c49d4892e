"""Tests of the trust-region options: the ``Hyperparams`` table, ``radius_growth``,
``local_radius`` and the optax local solver (the scaled region: tests/test_options_scaling.py).

Expectations are computed by hand or with numpy (float64), never with aptsjax itself.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aptsjax
from aptsjax import local
from aptsjax.optim.apts import local_objective
from aptsjax.optim.settings import Hyperparams, make_hyperparams, ratio_test, reaches_boundary
from tests.test_apts import assert_close, mlp_loss, problem
from tests.test_trust_region import quadratic, rosenbrock, X0

# ----------------------------------------------------------------------------
# make_hyperparams and Hyperparams.paper


def test_make_hyperparams_accepts_the_options():
  hp = make_hyperparams(radius_growth="boundary", norm="rms", local_radius="split",
                        rms_decay=0.9, rms_eps=1e-6, eta2=0.8)
  assert (hp.radius_growth, hp.norm, hp.local_radius) == ("boundary", "rms", "split")
  assert (hp.rms_decay, hp.rms_eps, hp.eta2) == (0.9, 1e-6, 0.8)
  assert make_hyperparams() == Hyperparams()
  base = Hyperparams(init_radius=0.5, norm="rms")
  assert make_hyperparams(base, eta1=0.1) == base._replace(eta1=0.1)


@pytest.mark.parametrize("name, allowed", [("radius_growth", ("always", "boundary")),
                                           ("norm", ("l2", "rms")),
                                           ("local_radius", ("bound", "split"))])
def test_make_hyperparams_rejects_bad_option_values(name, allowed):
  for value in ("sometimes", allowed[0].upper(), 1, 1.0, None, True):
    with pytest.raises(ValueError) as info:
      make_hyperparams(**{name: value})
    assert name in str(info.value)
    assert all(repr(a) in str(info.value) for a in allowed), str(info.value)


def test_make_hyperparams_rejects_bad_constants():
  with pytest.raises(ValueError, match="eta1 must be a number"):
    make_hyperparams(eta1="0.25")
  with pytest.raises(ValueError, match="init_radius must be a number"):
    make_hyperparams(init_radius=True)
  with pytest.raises(ValueError, match="unknown"):
    make_hyperparams(learning_rate=0.1)
  with pytest.raises(ValueError, match="base"):
    make_hyperparams({"init_radius": 0.1})
  for kwargs in ({"rms_decay": 1.0}, {"rms_decay": -0.1}, {"rms_decay": 2.0},
                 {"rms_eps": 0.0}, {"rms_eps": -1e-8}, {"rms_decay": float("nan")}):
    with pytest.raises(ValueError, match="rms_decay"):
      make_hyperparams(**kwargs)
    with pytest.raises(ValueError, match="rms_decay"):
      aptsjax.trust_region(quadratic, norm="rms", **kwargs)
    with pytest.raises(ValueError, match="rms_decay"):
      aptsjax.apts(mlp_loss, norm="rms", **kwargs)


def test_paper_table():
  hp = Hyperparams.paper()
  assert (hp.radius_growth, hp.norm, hp.local_radius) == ("always", "l2", "bound")
  assert (hp.init_radius, hp.min_radius, hp.max_radius) == (0.01, 1e-3, 4.0)
  assert (hp.eta_accept, hp.eta1, hp.eta2) == (0.0, 0.25, 0.75)
  assert (hp.alpha, hp.beta) == (0.5, 2.0)
  assert hp.validate() is hp


def test_base_is_respected():
  """A base table sets the initial radius, the ceiling and the norm of both transformations."""
  base = Hyperparams(init_radius=0.05, max_radius=0.05, norm="rms")
  x = jnp.asarray(X0, jnp.float32)
  tx = aptsjax.trust_region(quadratic, second_order=False, base=base)
  state = tx.init(x)
  assert float(state.radius) == pytest.approx(0.05) and state.scaling is not None
  _, state = jax.jit(tx.update)(jax.grad(quadratic)(x), state, x)
  # A short first-order step on a quadratic: rho ~ 1 > eta2, but the ceiling is the base's.
  assert bool(state.accepted)
  assert float(state.actual_reduction) > 0.75 * float(state.predicted_reduction)
  assert float(state.radius) == pytest.approx(0.05)
  params, batch = problem()
  tx = aptsjax.apts(mlp_loss, num_subdomains=2, local_steps=1, second_order=False, base=base)
  state = tx.init(params)
  assert float(state.radius) == pytest.approx(0.05) and state.scaling is not None
  _, state = jax.jit(lambda p, s: tx.update(None, s, p, batch=batch))(params, state)
  assert float(state.radius) <= 0.05 * (1 + 1e-7)
  # An override beats the base.
  assert aptsjax.apts(mlp_loss, base=base, norm="l2").init(params).scaling is None


# ----------------------------------------------------------------------------
# ratio_test with radius_growth, reaches_boundary


@pytest.mark.parametrize("growth, on_boundary, grows", [
    ("always", True, True), ("always", False, True),
    ("boundary", True, True), ("boundary", False, False)])
def test_ratio_test_growth_rule(growth, on_boundary, grows):
  hp = Hyperparams(radius_growth=growth)
  for edge in (on_boundary, jnp.array(on_boundary)):
    accept, shrink, grow = jax.jit(lambda a, p, e: ratio_test(a, p, hp, e))(
        jnp.float32(0.9), jnp.float32(1.0), edge)
    assert (bool(accept), bool(shrink), bool(grow)) == (True, False, grows)
  # Whatever on_boundary says, a moderate or bad ratio never grows the radius.
  for actual, expected in ((0.5, (True, False, False)), (-1.0, (False, True, False))):
    out = ratio_test(jnp.float32(actual), jnp.float32(1.0), hp, jnp.array(on_boundary))
    assert tuple(bool(v) for v in out) == expected


def test_reaches_boundary(x64):
  radius = 2.0
  threshold = (1.0 - 1e-3) * radius
  cases = {radius: True, 1.5 * radius: True, threshold: True,
           np.nextafter(threshold, 0.0): False, 0.5 * radius: False, 0.0: False}
  for norm, expected in cases.items():
    got = reaches_boundary(jnp.float64(norm), jnp.float64(radius))
    assert bool(got) == expected, norm


# ----------------------------------------------------------------------------
# trust_region with radius_growth: the radius trajectory against a numpy re-implementation


def radius_rule(radius, rho, step_norm, growth, hp=Hyperparams()):
  """The radius update (7) in numpy; for "boundary" growth needs |s| = radius.

  Returns None when the step length is too close to the boundary fraction to classify.
  """
  on_boundary = step_norm >= (1 - 1e-9) * radius
  if growth == "boundary" and rho > hp.eta2 and not on_boundary and step_norm > (1 - 2e-3) * radius:
    return None
  if rho > hp.eta2 and (growth == "always" or on_boundary):
    return min(hp.beta * radius, hp.max_radius)
  if rho < hp.eta1:
    return max(hp.alpha * radius, 1e-10)
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
# local_radius: "bound" and "split" (the TR local solver)

LOCAL_G = np.array([1.0, -2.0, 0.5])


def local_quadratic(curvature: float):
  """value_and_grad of g.w + curvature |w|^2 / 2 (gradient g at the anchor w = 0)."""
  return jax.value_and_grad(lambda w: jnp.asarray(LOCAL_G, w.dtype) @ w + 0.5 * curvature * w @ w)


def local_steps_of(local_radius: str, steps: int, bound: float, curvature: float = 1.0,
                   local_steps: int = 4):
  """First-order TR local iterations from the anchor 0; returns [(|w - 0|, local radius, done)]."""
  hp = Hyperparams(local_radius=local_radius).scaled(2)
  solver = local.trust_region_local_solver(hp, second_order=False, memory=3,
                                           local_steps=local_steps)
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
  bound = Hyperparams().min_radius / 2
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
                    base=aptsjax.Hyperparams.paper())
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
                    base=aptsjax.Hyperparams.paper())
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
