"""Tests of aptsjax.optim.apts on one device: the algorithm's steps (the consistency term, the
combination of the local steps, the global ratio test), its options (``combine``, ``norm="rms"``)
and its guards.

Expectations are computed by hand or with numpy (float64), never with aptsjax itself. Across
devices (shard_map, pmap, the trainer): tests/parallel/; the contract shared with trust_region:
tests/optim/test_contract.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aptsjax
from aptsjax import APTSConfig
from aptsjax.optim.apts_stages import local_objective
from aptsjax.optim.local import LocalCarry
from aptsjax.optim.local import LocalSolver
from tests import rounding
from tests.oracles import rms_oracle
from tests.problems import apts_updates
from tests.problems import assert_close
from tests.problems import flat
from tests.problems import lsq_loss
from tests.problems import lsq_problem
from tests.problems import mlp_loss
from tests.problems import problem
from tests.problems import train


@pytest.mark.parametrize("second_order", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_full_batch_loss_never_increases(x64, second_order):
  params, batch = problem(jnp.float64)
  tx = aptsjax.apts(mlp_loss, num_subdomains=4, local_steps=3, second_order=second_order)
  run = train(tx, mlp_loss, params, batch, 12)
  np.testing.assert_allclose(run.values, run.losses[1:], rtol=1e-12)   # state.value: the loss
  losses = run.losses
  assert np.all(np.diff(losses) <= 1e-14 * losses[0]), losses
  assert losses[-1] < 0.5 * losses[0]


def test_consistency_term_gives_global_gradient():
  """grad f_i(theta^k) == g^k (the authors' reference code adds r_i after the backward pass)."""
  params, (x, y) = problem()
  g = jax.grad(mlp_loss)(params, (x, y))
  for i in range(4):
    block = (x[16 * i:16 * (i + 1)], y[16 * i:16 * (i + 1)])
    r = jax.tree.map(lambda a, b: a - b, g, jax.grad(mlp_loss)(params, block))
    f_i = local_objective(mlp_loss, block, params, r)
    assert_close(jax.grad(f_i)(params), g, 1e-5)
    assert float(f_i(params)) == pytest.approx(float(mlp_loss(params, block)), rel=1e-6)

  # And the local solver is handed exactly that objective: record its gradient at theta^k.
  def init(p):
    return jax.tree.map(jnp.zeros_like, p)

  def start(p, loss, grad, state, bound):
    del grad, bound
    return LocalCarry(params=p, loss=loss, state=state, extra=None)

  def step(value_and_grad, carry, anchor, bound, active):
    del anchor, bound
    recorded = aptsjax.local.keep_inactive(active, value_and_grad(carry.params)[1], carry.state)
    return carry._replace(state=recorded), jnp.array(True)

  tx = aptsjax.apts(mlp_loss, num_subdomains=4, local_solver=LocalSolver(init, start, step))
  _, state = jax.jit(lambda p: tx.update(g, tx.init(p), p, batch=(x, y)))(params)
  np.testing.assert_array_equal(state.local_steps, [1, 1, 1, 1])
  for i in range(4):
    assert_close(jax.tree.map(lambda a: a[i], state.local_state), g, 1e-5)


def test_single_subdomain_matches_first_order_trust_region():
  """N = 1, one local step, no global step: the APTS step is the first-order TR step.

  The local objective is then f itself (r = 0), the local region is the global one, and the
  local step -Delta g / |g| is accepted whenever TR accepts it; APTS's ratio then compares the
  same decrease with itself, so it accepts too.
  """
  params, batch = problem()
  g = jax.grad(mlp_loss)(params, batch)
  a_tx = aptsjax.apts(mlp_loss, num_subdomains=1, local_steps=1, global_steps=0,
                      second_order=False, base=APTSConfig.paper())
  t_tx = aptsjax.trust_region(mlp_loss, second_order=False, min_radius=1e-3)
  first = lambda tx: jax.jit(lambda p: tx.update(g, tx.init(p), p, batch=batch))(params)
  (a_updates, a_state), (t_updates, t_state) = first(a_tx), first(t_tx)
  assert bool(t_state.accepted) and bool(a_state.apts_accepted)
  assert_close(a_updates, t_updates, 1e-6)
  assert float(a_state.value) == pytest.approx(float(t_state.value), rel=1e-6)


@pytest.mark.parametrize("second_order", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_combined_step_within_global_radius(second_order):
  params, batch = problem()
  tx = aptsjax.apts(mlp_loss, num_subdomains=4, second_order=second_order, global_steps=0,
                    init_radius=0.5, radius_units="absolute")
  g = jax.grad(mlp_loss)(params, batch)
  updates, state = jax.jit(tx.update)(g, tx.init(params), params, batch=batch)
  if bool(state.apts_accepted):
    assert float(optax.tree.norm(updates)) <= 0.5 * (1 + 1e-6)
  assert float(state.predicted_reduction) > 0


def test_nonfinite_local_loss_is_contained():
  params, (x, y) = problem()
  marker = jnp.zeros((64, 1)).at[:16].set(1.0)  # subdomain 0 holds the poisoned rows

  def loss(p, b):
    xb, yb, mb = b
    base = mlp_loss(p, (xb, yb))
    moved = jnp.abs(p["b2"][0] - params["b2"][0]) > 0
    return base + jnp.where(moved & (jnp.max(mb) > 0), jnp.nan, 0.0)

  batch = (x, y, marker)
  tx = aptsjax.apts(loss, num_subdomains=4, second_order=False)
  g = jax.grad(loss)(params, batch)
  state = tx.init(params)
  updates, new = jax.jit(tx.update)(g, state, params, batch=batch)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
  assert not bool(new.apts_accepted)         # the global trial loss is NaN: rejected
  assert float(new.radius) < float(state.radius)   # and the radius shrank
  state = new
  assert np.isfinite(float(state.value))


def test_nonfinite_current_point_is_a_noop():
  params, batch = problem()
  tx = aptsjax.apts(mlp_loss, num_subdomains=4, second_order=False)
  state = tx.init(params)
  bad = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), params)
  updates, new_state = jax.jit(lambda g, s: tx.update(g, s, params, batch=batch))(bad, state)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
  assert bool(new_state.nonfinite) and float(new_state.radius) == float(state.radius)


def test_bad_configuration_errors():
  params, batch = problem()
  for kwargs in ({"num_subdomains": 0}, {"local_steps": 0}, {"memory": 0},
                 {"min_radius": 5.0}, {"eta1": 0.9, "eta2": 0.5}, {"learning_rate": 0.1}):
    with pytest.raises(ValueError):
      aptsjax.apts(mlp_loss, **kwargs)
  g = jax.grad(mlp_loss)(params, batch)
  tx = aptsjax.apts(mlp_loss, num_subdomains=5)
  with pytest.raises(ValueError, match="divisible"):
    tx.update(g, tx.init(params), params, batch=batch)
  tx = aptsjax.apts(mlp_loss, num_subdomains=4)
  with pytest.raises(ValueError, match="disagree on the number of rows"):
    tx.update(g, tx.init(params), params, batch=(batch[0], batch[1][:10]))
  tx = aptsjax.apts(mlp_loss, num_subdomains=4, axis_name="data")
  with pytest.raises(ValueError, match="not bound"):
    tx.update(g, tx.init(params), params, batch=batch)
  tx = aptsjax.apts(mlp_loss, num_subdomains=4)
  with pytest.raises(ValueError, match="grads"):
    tx.update({"w1": g["w1"]}, tx.init(params), params, batch=batch)


def test_sizes_must_be_integers():
  for name in ("local_steps", "memory"):
    with pytest.raises(ValueError, match=f"{name} must be an integer >= 1, got 2.5"):
      aptsjax.apts(lsq_loss, **{name: 2.5})
  # numpy integers are integers.
  tx = aptsjax.apts(lsq_loss, num_subdomains=np.int64(2), local_steps=np.int32(2))
  assert tx.init(lsq_problem()[0]).local_steps.shape == (2,)


def test_missing_or_too_small_batch_is_a_clear_value_error():
  params, batch = lsq_problem()
  apts = aptsjax.apts(lsq_loss, num_subdomains=4, second_order=False)
  state = apts.init(params)
  with pytest.raises(ValueError, match="apts needs the batch"):
    apts.update(None, state, params)
  for rows in (0, 3):
    small = jax.tree.map(lambda a, k=rows: a[:k], batch)
    with pytest.raises(ValueError, match=f"has {rows} rows, fewer than its 4 subdomains"):
      apts.update(None, state, params, batch=small)


# ----------------------------------------------------------------------------
# combine="mean": the mean of the local steps, each within Delta


def numpy_loss(params, batch):
  """``mlp_loss`` in float64 numpy (an independent evaluation)."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  x, y = (np.asarray(a, np.float64) for a in batch)
  h = np.tanh(x @ p["w1"] + p["b1"])
  return float(np.mean(((h @ p["w2"] + p["b2"])[:, 0] - y) ** 2))


def one_update(tx, params, batch):
  state = tx.init(params)
  grads = jax.grad(mlp_loss)(params, batch)
  updates, state = jax.jit(lambda g, s, p: tx.update(g, s, p, batch=batch))(grads, state, params)
  return updates, state


def test_mean_of_first_order_first_steps_is_one_normalised_gradient_step(x64):
  """combine="mean", first order, nu = 1: s~ = -Delta g / |g|, pred = mean_i local decrease."""
  params, batch = problem(jnp.float64, rows=64)
  radius = 0.05
  tx = aptsjax.apts(mlp_loss, num_subdomains=4, local_steps=1, second_order=False,
                    global_steps=0, base=APTSConfig.paper(), combine="mean",
                    init_radius=radius)
  updates, state = one_update(tx, params, batch)
  g = jax.grad(mlp_loss)(params, batch)
  gnorm = np.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(g)))
  expected = {k: -radius * np.asarray(v) / gnorm for k, v in g.items()}
  assert bool(state.apts_accepted)
  for k in params:
    np.testing.assert_allclose(updates[k], expected[k], rtol=1e-10, atol=1e-14)
  # Each subdomain's decrease f_i(theta^k) - f_i(theta^k + s): the consistency term adds
  # <g - g_i, s> to the block loss difference.
  blocks = [(batch[0][i * 16:(i + 1) * 16], batch[1][i * 16:(i + 1) * 16]) for i in range(4)]
  moved = {k: np.asarray(params[k]) + expected[k] for k in params}
  decreases = []
  for blk in blocks:
    g_i = jax.grad(mlp_loss)(params, blk)
    r_dot_s = sum(float(np.sum((np.asarray(g[k]) - np.asarray(g_i[k])) * expected[k]))
                  for k in params)
    decreases.append(numpy_loss(params, blk) - numpy_loss(moved, blk) - r_dot_s)
  np.testing.assert_allclose(float(state.predicted_reduction), np.mean(decreases), rtol=1e-9)


@pytest.mark.parametrize("second_order", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("local_solver", ["trust_region", "adam"])
def test_mean_step_within_radius_and_local_steps_reach_further(second_order, local_solver):
  """|s~| <= Delta with combine="mean" (the triangle inequality), over several updates."""
  params, batch = problem(jnp.float32, rows=64)
  tx = aptsjax.apts(mlp_loss, num_subdomains=2, local_steps=5, second_order=second_order,
                    global_steps=0, base=APTSConfig.paper(), combine="mean",
                    local_solver=local_solver, local_radius="split")
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, batch=batch))
  for _ in range(6):
    radius = float(state.radius)
    updates, state = step(jax.grad(mlp_loss)(params, batch), state, params)
    length = float(jnp.sqrt(sum(jnp.sum(u**2) for u in jax.tree.leaves(updates))))
    assert length <= radius * (1 + 1e-5), (length, radius)   # float32 rounding of one norm
    params = optax.apply_updates(params, updates)
  assert int(np.max(state.local_steps)) > 1


# ----------------------------------------------------------------------------
# apts with norm="rms"


def test_apts_first_order_rms_step(x64):
  """N = 2, one local step, no global step: every subdomain's local step is the first-order
  step -(Delta / 2) D^{-1} g / |D^{-1} g| in u (grad f_i(theta^k) = g), so the APTS step in theta
  is -Delta D^{-2} g / |D^{-1} g|."""
  params, batch = problem(jnp.float64)
  radius = 0.05
  tx = aptsjax.apts(mlp_loss, num_subdomains=2, local_steps=1, global_steps=0,
                    second_order=False, norm="rms", init_radius=radius,
                    base=APTSConfig.paper())
  [(_, updates, state)] = apts_updates(tx, params, batch, 1)
  g = flat(jax.grad(mlp_loss)(params, batch))
  _, d = rms_oracle([g], 0.999, 1e-8)
  assert bool(state.apts_accepted)
  np.testing.assert_allclose(flat(updates), -radius * g / d**2 / np.linalg.norm(g / d),
                             rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(flat(state.scaling.d), d, rtol=1e-12)


@pytest.mark.parametrize("second_order", [False, pytest.param(True, marks=pytest.mark.slow)])
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
                    base=APTSConfig.paper())
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


def test_numpy_batch_closed_over_in_a_jit():
  """A NumPy batch captured by the caller's jit works (the local loop indexes subdomains with a
  traced index) and gives the same update as the same batch passed as JAX arrays."""
  params, (x, y) = problem()
  host = (np.asarray(x), np.asarray(y))
  tx = aptsjax.apts(mlp_loss, 4, local_solver="trust_region")
  closed, _ = jax.jit(lambda p, s: tx.update(None, s, p, batch=host))(params, tx.init(params))
  passed, _ = jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b))(
      params, tx.init(params), (x, y))
  for a, b in zip(jax.tree.leaves(closed), jax.tree.leaves(passed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
