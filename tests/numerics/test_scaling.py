"""Tests of the scaled trust region |D s| <= Delta (``norm="rms"``): aptsjax.scaling, the L-SR1
rescaling, and the scaled region in aptsjax.trust_region, aptsjax.apts and the trainer.

Every expectation comes from numpy / scipy in float64 (tests/oracles.py), never from aptsjax.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg
from jax.flatten_util import ravel_pytree

import aptsjax
from aptsjax import lsr1
from aptsjax import scaling
from tests import rounding
from tests.oracles import sr1_dense, tr_subproblem_dense
from tests.test_apts import mlp_loss, problem

EPS64 = float(np.finfo(np.float64).eps)

# ----------------------------------------------------------------------------
# numpy oracles of the scaling and of gamma


def rms_oracle(grads: list[np.ndarray], decay: float, eps: float):
  """Adam's bias-corrected second moment and D from a sequence of flat gradients (float64).

  Returns ``(nu, d)`` after the last gradient: nu = EMA of g * g, w = sqrt(nu / (1 - decay^t))
  + eps and D = sqrt(w / mean(w)).
  """
  nu = np.zeros_like(grads[0], dtype=np.float64)
  for g in grads:
    nu = decay * nu + (1.0 - decay) * np.asarray(g, np.float64) ** 2
  w = np.sqrt(nu / (1.0 - decay ** len(grads))) + eps
  return nu, np.sqrt(w / np.mean(w))


def gamma_oracle(S: np.ndarray, Y: np.ndarray) -> float:
  """gamma = mu_min / 2 of the pencil (D + L + L^T, S^T S) over the pairs (rows, oldest first).

  Only for pairs where mu_min > 0 and S has full rank (the tests assert both).
  """
  sy = S @ Y.T                          # [i, j] = s_i . y_j
  k = S.shape[0]
  newer = np.arange(k)[:, None] >= np.arange(k)[None, :]
  sym = np.where(newer, sy, sy.T)       # s_newer . y_older
  mu = scipy.linalg.eigh(sym, S @ S.T, eigvals_only=True)
  assert mu[0] > 0, mu
  return 0.5 * float(mu[0])


def flat(tree) -> np.ndarray:
  return np.asarray(ravel_pytree(tree)[0], np.float64)


# ----------------------------------------------------------------------------
# scaling.update


def leaves_like(template, vector):
  """``vector`` (flat, ravel order) as a pytree like ``template``."""
  return ravel_pytree(template)[1](jnp.asarray(vector))


@pytest.mark.parametrize("eps", [1e-8, 0.5])
def test_scaling_update_matches_numpy(x64, eps):
  """EMA, bias correction, w and the normalisation mean(D^2) = 1 over all leaves of a pytree.

  eps = 0.5 is of the size of the RMS, so that the bias correction is visible in D (with a tiny
  eps it cancels in the normalisation).
  """
  rng = np.random.default_rng(0)
  template = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  decay = 0.9
  state = scaling.init(template)
  np.testing.assert_array_equal(flat(state.d), np.ones(7))
  update = jax.jit(scaling.update, static_argnums=(2, 3))
  grads = []
  for t in range(1, 4):
    g = rng.normal(size=7) * np.array([1e-2, 1.0, 10.0, 0.3, 3.0, 1e-3, 1.0])
    grads.append(g)
    state = update(state, leaves_like(template, g), decay, eps)
    nu, d = rms_oracle(grads, decay, eps)
    assert int(state.count) == t
    np.testing.assert_allclose(flat(state.nu), nu, rtol=1e-13)
    np.testing.assert_allclose(flat(state.d), d, rtol=1e-13)
    assert np.mean(flat(state.d) ** 2) == pytest.approx(1.0, rel=1e-13)
    assert jax.tree.structure(state.d) == jax.tree.structure(template)


def test_scaling_update_invalid_keeps_state_and_zero_gradient_is_finite():
  template = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  state = scaling.update(scaling.init(template), jax.tree.map(jnp.zeros_like, template),
                         0.999, 1e-8)
  # A zero gradient at the first call: w = eps everywhere, so D = 1 (finite, no 0 / 0).
  assert int(state.count) == 1
  np.testing.assert_array_equal(flat(state.d), np.ones(7))
  g = leaves_like(template, np.arange(1.0, 8.0))
  moved = scaling.update(state, g, 0.999, 1e-8)
  assert not np.allclose(flat(moved.d), 1.0)
  for valid in (False, jnp.array(False)):
    kept = scaling.update(moved, jax.tree.map(lambda x: 5.0 * x, g), 0.999, 1e-8, valid=valid)
    jax.tree.map(np.testing.assert_array_equal, kept, moved)
  # A non-finite gradient keeps the state whatever ``valid`` says.
  bad = scaling.update(moved, jax.tree.map(lambda x: x * jnp.nan, g), 0.999, 1e-8)
  jax.tree.map(np.testing.assert_array_equal, bad, moved)


# ----------------------------------------------------------------------------
# lsr1.rescale


def random_memory(rng, template, num_pairs: int, memory: int):
  """An L-SR1 memory fed with pairs (s, A s) of an SPD matrix A, all of them in use."""
  n = flat(template).size
  q = rng.normal(size=(n, n))
  a = q @ q.T / n + np.diag(np.linspace(0.5, 3.0, n))
  state, update = lsr1.init(template, memory), jax.jit(lsr1.update)
  for _ in range(num_pairs):
    s = rng.normal(size=n)
    state = update(state, leaves_like(template, s), leaves_like(template, a @ s))
  assert int(np.sum(np.asarray(state.in_use))) == num_pairs
  return state


def test_lsr1_rescale_matches_dense_oracle(x64):
  rng = np.random.default_rng(1)
  template = {"a": jnp.zeros(4), "b": jnp.zeros((3,))}
  state = random_memory(rng, template, num_pairs=3, memory=4)
  ratio = rng.uniform(0.3, 3.0, size=7)
  rescaled = jax.jit(lsr1.rescale)(state, leaves_like(template, ratio))
  # The stored stacks, every slot: (r s, y / r); s.y is unchanged, so are the stamps.
  stacked = lambda tree: np.stack([flat(jax.tree.map(lambda b, i=i: b[i], tree)) for i in range(4)])
  np.testing.assert_allclose(stacked(rescaled.s), stacked(state.s) * ratio, rtol=1e-15)
  np.testing.assert_allclose(stacked(rescaled.y), stacked(state.y) / ratio, rtol=1e-15)
  np.testing.assert_array_equal(rescaled.stamp, state.stamp)
  # The pairs in use, oldest first, and the Gram matrices of the new stacks.
  S0, Y0, _ = lsr1.dense_pairs(state)
  S, Y, gamma = lsr1.dense_pairs(rescaled)
  np.testing.assert_allclose(S, S0 * ratio, rtol=1e-15)
  np.testing.assert_allclose(Y, Y0 / ratio, rtol=1e-15)
  order = np.argsort(np.asarray(state.stamp))[-3:]
  np.testing.assert_allclose(np.asarray(rescaled.ss)[np.ix_(order, order)], S @ S.T, rtol=1e-13)
  np.testing.assert_allclose(np.asarray(rescaled.yy)[np.ix_(order, order)], Y @ Y.T, rtol=1e-13)
  # gamma recomputed from the new pairs, and B v the SR1 recursion over them.
  assert gamma == pytest.approx(gamma_oracle(S, Y), rel=1e-10)
  assert gamma != pytest.approx(float(state.gamma), rel=1e-3)   # the ratio changed it
  dense = sr1_dense(S, Y, gamma)
  for _ in range(3):
    v = rng.normal(size=7)
    got = flat(lsr1.matvec(rescaled, leaves_like(template, v)))
    np.testing.assert_allclose(got, dense @ v, rtol=0,
                               atol=1e-11 * np.linalg.norm(dense, 2) * np.linalg.norm(v))


def test_lsr1_rescale_by_ones_keeps_the_matrix():
  """float32: ratio 1 recomputes S^T S, gamma and the factorisation from the same pairs.

  Error model: every recomputed quantity is a sum of at most n products or a k-by-k
  eigendecomposition, each within a few eps of its old value relative to |B|; these errors reach
  B v amplified at most by the condition number kappa of M^{-1} = D + L + L^T - gamma S^T S. So
  |B' v - B v| <= C k eps kappa |B| |v| with C = 10.
  """
  rng = np.random.default_rng(2)
  template = {"a": jnp.zeros(4), "b": jnp.zeros((3,))}
  state = random_memory(rng, template, num_pairs=3, memory=4)
  same = lsr1.rescale(state, jax.tree.map(jnp.ones_like, template))
  np.testing.assert_array_equal(same.in_use, state.in_use)
  S, Y, gamma = lsr1.dense_pairs(state)
  k = S.shape[0]
  sy = S @ Y.T
  newer = np.arange(k)[:, None] >= np.arange(k)[None, :]
  kappa = np.linalg.cond(np.where(newer, sy, sy.T) - gamma * S @ S.T)
  b_norm = np.linalg.norm(sr1_dense(S, Y, gamma), 2)
  eps32 = float(np.finfo(np.float32).eps)
  for _ in range(3):
    v = rng.normal(size=7).astype(np.float32)
    before = flat(lsr1.matvec(state, leaves_like(template, v)))
    after = flat(lsr1.matvec(same, leaves_like(template, v)))
    assert np.linalg.norm(after - before) <= 10 * k * eps32 * kappa * b_norm * np.linalg.norm(v)


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


# ----------------------------------------------------------------------------
# apts with norm="rms"


def apts_updates(tx, params, batch, iters: int):
  """``iters`` jitted APTS updates; returns the list of (radius before, updates, state)."""
  step = jax.jit(lambda p, s: tx.update(None, s, p, batch=batch))
  state, out = tx.init(params), []
  for _ in range(iters):
    radius = float(state.radius)
    updates, state = step(params, state)
    out.append((radius, updates, state))
    params = optax.apply_updates(params, updates)
  return out


def test_apts_first_order_rms_step(x64):
  """N = 2, one local step, no global step: every subdomain's local step is the first-order
  step -(Delta / 2) D^{-1} g / |D^{-1} g| in u (grad f_i(theta^k) = g), so the APTS step in theta
  is -Delta D^{-2} g / |D^{-1} g|."""
  params, batch = problem(jnp.float64)
  radius = 0.05
  tx = aptsjax.apts(mlp_loss, num_subdomains=2, local_steps=1, global_steps=0,
                    second_order=False, norm="rms", init_radius=radius,
                    base=aptsjax.Hyperparams.paper())
  [(_, updates, state)] = apts_updates(tx, params, batch, 1)
  g = flat(jax.grad(mlp_loss)(params, batch))
  _, d = rms_oracle([g], 0.999, 1e-8)
  assert bool(state.apts_accepted)
  np.testing.assert_allclose(flat(updates), -radius * g / d**2 / np.linalg.norm(g / d),
                             rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(flat(state.scaling.d), d, rtol=1e-12)


@pytest.mark.parametrize("second_order", [False, True])
def test_apts_step_within_scaled_region(second_order):
  """|D s~| <= Delta for the APTS step s~ (the update, with global_steps=0), in float32.

  Error model: s~ is scaled to |u| <= Delta in float32, then mapped to theta and back (two
  roundings per element): |D s~| <= Delta (1 + 8 eps32). rms_eps = 0.05, of the size of the
  gradient's entries, keeps D from being proportional to sqrt|g| (with which the first steps are
  sign steps whose Euclidean length equals their D-length).
  """
  params, batch = problem()
  tx = aptsjax.apts(mlp_loss, num_subdomains=2, local_steps=3, global_steps=0,
                    second_order=second_order, norm="rms", rms_eps=0.05, init_radius=0.05,
                    base=aptsjax.Hyperparams.paper())
  boundary, euclid = 0, []
  for radius, updates, state in apts_updates(tx, params, batch, 3):
    d = flat(state.scaling.d)
    step = flat(updates)
    assert np.linalg.norm(d * step) <= radius * (1 + 8 * rounding.EPS32)
    if bool(state.apts_accepted):
      boundary += np.linalg.norm(d * step) >= 0.99 * radius
      euclid.append(np.linalg.norm(step) / radius)
  assert boundary >= 1
  assert max(abs(e - 1.0) for e in euclid) > 0.05   # the region is not the Euclidean one


def test_apts_paper_options_are_bitwise_the_explicit_ones():
  """base=Hyperparams.paper() is the same method as the explicit options, and overrides beat a
  base that says otherwise."""
  params, batch = problem()
  paper = dict(radius_growth="always", norm="l2", local_radius="bound", combine="sum",
               local_method="trust_region")
  other = aptsjax.Hyperparams(radius_growth="boundary", norm="rms", local_radius="split")
  kw = dict(num_subdomains=2, local_steps=3, init_radius=0.1, second_order=False)
  runs = [apts_updates(aptsjax.apts(mlp_loss, base=aptsjax.Hyperparams.paper(), **kw),
                       params, batch, 3),
          apts_updates(aptsjax.apts(mlp_loss, **paper, **kw), params, batch, 3),
          apts_updates(aptsjax.apts(mlp_loss, base=other, **paper, **kw), params, batch, 3)]
  # The options would change this run: "split" and "rms" give other steps.
  changed = apts_updates(aptsjax.apts(mlp_loss, base=other, **kw), params, batch, 1)
  assert not np.array_equal(flat(changed[0][1]), flat(runs[0][0][1]))
  assert runs[0][-1][2].scaling is None
  for run in runs[1:]:
    for (_, u_ref, s_ref), (_, u, s) in zip(runs[0], run, strict=True):
      jax.tree.map(np.testing.assert_array_equal, (u, s), (u_ref, s_ref))


def test_rms_trainer_two_devices_matches_one_float32():
  """norm="rms" under apts_trainer: 2 devices equal 1 within rounding (tests/rounding.py)."""
  from tests.test_apts import run_trainer   # pylint: disable=import-outside-toplevel
  params, _ = problem(rows=512)

  def run(num_devices, p):
    p, state = run_trainer(num_devices, True, 3, params=p, norm="rms")
    assert state.scaling is not None
    return {"params": p, "loss": state.value, "radius": state.radius, "d": state.scaling.d}

  reference = run(1, params)
  spread = rounding.probe_spread(lambda p: run(1, p), params, reference)
  rounding.assert_within_rounding(run(2, params), reference, spread, "norm='rms', 2 devices")
