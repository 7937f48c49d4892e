"""Tests of aptsjax.apts on one device and across 4 host CPU devices (shard_map and pmap)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aptsjax
from aptsjax import comm
from aptsjax import parallel
from aptsjax.optim.apts import LocalCarry, LocalSolver, local_objective
from tests import rounding


def mlp_loss(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  out = h @ params["w2"] + params["b2"]
  return jnp.mean((out[:, 0] - y) ** 2)


def problem(dtype=jnp.float32, rows=64, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = {"w1": 0.5 * jax.random.normal(k1, (4, 8), dtype), "b1": jnp.zeros(8, dtype),
            "w2": 0.5 * jax.random.normal(k2, (8, 1), dtype), "b2": jnp.zeros(1, dtype)}
  x = jax.random.normal(k3, (rows, 4), dtype)
  y = jnp.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2]
  return params, (x, y)


@functools.lru_cache(maxsize=None)
def cached_trainer(num_devices, second_order, **kw):
  """One trainer (one compiled step) per configuration, reused by the rounding probes."""
  return parallel.apts_trainer(mlp_loss, 4, num_devices=num_devices, second_order=second_order,
                               **kw)


def run_trainer(num_devices, second_order, iters, dtype=jnp.float32, params=None, **kw):
  # 128 rows per subdomain: with far fewer rows than parameters per block the local curvature is
  # rank-deficient, and float64 rounding differences grow too fast for a 10-iteration comparison.
  default_params, batch = problem(dtype, rows=512)
  params = jax.tree.map(jnp.copy, default_params if params is None else params)  # step donates
  trainer = cached_trainer(num_devices, second_order, **kw)
  state, sharded = trainer.init(params), trainer.shard_batch(batch)
  for _ in range(iters):
    params, state = trainer.step(params, state, sharded)
  return parallel.numpy_tree(params), parallel.numpy_tree(state)


def assert_close(a, b, rtol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * max(1.0, float(np.abs(y).max())))


@pytest.mark.parametrize("second_order", [False, True])
def test_full_batch_loss_never_increases(x64, second_order):
  params, batch = problem(jnp.float64)
  tx = aptsjax.apts(mlp_loss, num_subdomains=4, local_steps=3, second_order=second_order)
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(mlp_loss)(p, batch), s, p, batch=batch))
  losses = [float(mlp_loss(params, batch))]
  for _ in range(12):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    losses.append(float(state.value))
    assert float(state.value) == pytest.approx(float(mlp_loss(params, batch)), rel=1e-12)
  assert np.all(np.diff(losses) <= 1e-14 * losses[0]), losses
  assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("second_order, preset", [(False, "defaults"), (True, "defaults"),
                                                  (True, "paper")])
def test_shard_map_matches_one_device_float64(x64, second_order, preset):
  """4 devices = 1 device over 10 float64 iterations: the defaults (local Adam, mean of the
  local steps) and the paper's method (local TR with L-SR1 memories, sum)."""
  iters = 10
  kw = {"base": aptsjax.Hyperparams.paper()} if preset == "paper" else {}
  one = run_trainer(1, second_order, iters, jnp.float64, **kw)
  four = run_trainer(4, second_order, iters, jnp.float64, **kw)
  assert_close(four[0], one[0], 1e-8)
  assert_close((four[1].value, four[1].radius), (one[1].value, one[1].radius), 1e-8)
  local_one, local_four = one[1].local_state, four[1].local_state
  if preset == "paper":  # the pairs and gamma (the factor's basis is only unique up to rotation)
    for name in ("s", "y", "gamma"):
      assert_close(getattr(local_four, name), getattr(local_one, name), 1e-8)
    np.testing.assert_array_equal(local_four.in_use, local_one.in_use)
  else:                  # every subdomain's Adam state
    assert_close(local_four, local_one, 1e-8)


def pmap_run(second_order, iters, params, batch):
  """APTS under jax.pmap with the caller's all-reduced gradient (pmean of shard gradients)."""
  tx = aptsjax.apts(mlp_loss, num_subdomains=4, second_order=second_order, axis_name="data")
  state = parallel.pmap_state(
      aptsjax.apts(mlp_loss, num_subdomains=4, second_order=second_order).init(params), 4)

  def step(p, s, b):
    g = jax.lax.pmean(jax.grad(mlp_loss)(p, b), "data")
    u, s = tx.update(g, s, p, batch=b)
    return optax.apply_updates(p, u), s

  pstep = jax.pmap(step, axis_name="data", in_axes=(None, 0, 0), out_axes=(None, 0))
  x, y = batch
  batch = (x.reshape(4, -1, x.shape[-1]), y.reshape(4, -1))
  for _ in range(iters):
    params, state = pstep(params, state, batch)
  state = parallel.unpmap_state(state)
  return {"params": params, "loss": state.value, "radius": state.radius}


def one_device_float32(second_order, iters, params):
  """The single-device float32 run and its probe spread (tests/rounding.py's error model)."""
  def one_device(p):
    p, state = run_trainer(1, second_order, iters, params=p)
    return {"params": p, "loss": state.value, "radius": state.radius}

  reference = one_device(params)
  return reference, rounding.probe_spread(one_device, params, reference)


@pytest.mark.parametrize("second_order", [False, True])
def test_shard_map_and_pmap_match_one_device_float32(second_order):
  """float32: 4 devices (shard_map, pmap) equal 1 device within rounding (tests/rounding.py)."""
  iters = 3
  params, batch = problem(rows=512)
  reference, spread = one_device_float32(second_order, iters, params)
  four_params, four_state = run_trainer(4, second_order, iters, params=params)
  rounding.assert_within_rounding(
      {"params": four_params, "loss": four_state.value, "radius": four_state.radius},
      reference, spread, "shard_map, 4 devices")
  rounding.assert_within_rounding(pmap_run(second_order, iters, params, batch), reference,
                                  spread, "pmap, 4 devices")


def test_shard_map_with_callers_gradient_and_check_vma():
  """The documented recipe: grads = grad of pmean(loss) inside shard_map (check_vma on and off)."""
  params, batch = problem()
  ref_tx = aptsjax.apts(mlp_loss, num_subdomains=4, second_order=False)
  ref_updates, ref_state = ref_tx.update(jax.grad(mlp_loss)(params, batch), ref_tx.init(params),
                                         params, batch=batch)
  tx = aptsjax.apts(mlp_loss, num_subdomains=4, second_order=False, axis_name="data")
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  state = ref_tx.init(params)
  specs = aptsjax.state_specs(state, "data")
  for check_vma in (True, False):
    def step(p, s, b):
      if check_vma:
        g = jax.grad(lambda q: jax.lax.pmean(mlp_loss(q, b), "data"))(p)
      else:
        g = jax.lax.pmean(jax.grad(mlp_loss)(p, b), "data")
      return tx.update(g, s, p, batch=b)
    f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), specs, P("data")),
                              out_specs=(P(), specs), check_vma=check_vma))
    updates, new_state = f(params, state, batch)
    assert_close(updates, ref_updates, 1e-5)
    assert_close(new_state.radius, ref_state.radius, 1e-6)


P = jax.sharding.PartitionSpec


def test_state_specs():
  params, _ = problem()
  state = aptsjax.apts(mlp_loss, num_subdomains=4).init(params)
  specs = aptsjax.state_specs(state, "data")
  assert specs.radius == P()
  assert all(s == P("data") for s in jax.tree.leaves(specs.local_state,
                                                     is_leaf=lambda x: isinstance(x, P)))
  assert specs.local_steps == P("data")
  assert all(s == P() for s in jax.tree.leaves(specs.global_memory,
                                               is_leaf=lambda x: isinstance(x, P)))
  for leaf in jax.tree.leaves(state.local_state):
    assert leaf.shape[0] == 4
  tr_state = aptsjax.trust_region(mlp_loss).init(params)
  assert all(s == P() for s in jax.tree.leaves(aptsjax.state_specs(tr_state, "data"),
                                               is_leaf=lambda x: isinstance(x, P)))


def test_no_allreduce_in_local_loop_and_fixed_volume():
  params, batch = problem()
  n = sum(x.size for x in jax.tree.leaves(params))
  totals = []
  for local_steps in (2, 6):
    trainer = parallel.apts_trainer(mlp_loss, 4, num_devices=4, second_order=False,
                                    local_steps=local_steps)
    state = trainer.init(params)
    compiled = trainer.step.lower(params, state, trainer.shard_batch(batch)).compile()
    records = comm.allreduce_stats(compiled)
    assert records, "expected all-reduces in a 4-device update"
    # The local loop (a while loop whose trip count depends on the data) is there, and
    # communicates nothing; the global phase is a loop of 1 + global_steps known trips.
    assert any(" while(" in line and "known_trip_count" not in line
               for line in compiled.as_text().splitlines())
    assert not any(r.trips is None for r in records), records
    assert any(r.in_loop and r.trips == 2 for r in records), records
    totals.append(sum(r.elements * r.trips for r in records))
  assert totals[0] == totals[1]
  # g^k, s~, the gradient at theta^k + s~ and one global step: 4 n floats plus a few scalars.
  assert 4 * n <= totals[0] <= 4 * n + 16, (totals, n)


def test_allreduce_detector_flags_loops():
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

  def f(x):
    def body(c):
      i, v = c
      return i + 1, jax.lax.psum(v, "data") * 0.5
    return jax.lax.while_loop(lambda c: c[0] < x[0, 0].astype(int), body, (0, x))[1]

  g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("data"), out_specs=P("data"),
                            check_vma=False))
  records = comm.allreduce_stats(g.lower(jnp.ones((4, 3))).compile())
  assert records and all(r.in_loop and r.trips is None for r in records)


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
  _, state = tx.update(g, tx.init(params), params, batch=(x, y))
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
                      second_order=False, base=aptsjax.Hyperparams.paper())
  t_tx = aptsjax.trust_region(mlp_loss, second_order=False, min_radius=1e-3)
  a_updates, a_state = a_tx.update(g, a_tx.init(params), params, batch=batch)
  t_updates, t_state = t_tx.update(g, t_tx.init(params), params, batch=batch)
  assert bool(t_state.accepted) and bool(a_state.apts_accepted)
  assert_close(a_updates, t_updates, 1e-6)
  assert float(a_state.value) == pytest.approx(float(t_state.value), rel=1e-6)


def test_summed_step_within_global_radius():
  params, batch = problem()
  for second_order in (False, True):
    tx = aptsjax.apts(mlp_loss, num_subdomains=4, second_order=second_order, global_steps=0,
                      init_radius=0.5)
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
  updates, state = jax.jit(tx.update)(g, tx.init(params), params, batch=batch)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
  assert not bool(state.apts_accepted)       # the global trial loss is NaN: rejected
  assert float(state.radius) < 0.01          # and the radius shrank
  assert np.isfinite(float(state.value))


def test_nonfinite_current_point_is_a_noop():
  params, batch = problem()
  tx = aptsjax.apts(mlp_loss, num_subdomains=4, second_order=False)
  state = tx.init(params)
  bad = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), params)
  updates, new_state = tx.update(bad, state, params, batch=batch)
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
  with pytest.raises(ValueError, match="divisible"):
    parallel.apts_trainer(mlp_loss, 6, num_devices=4)
  tx = aptsjax.apts(mlp_loss, num_subdomains=4)
  with pytest.raises(ValueError, match="grads"):
    tx.update({"w1": g["w1"]}, tx.init(params), params, batch=batch)


@pytest.mark.parametrize("num_devices", [1, 4])
def test_trainer_donates_params_and_state(num_devices):
  """step reuses the buffers of the params and state it is given; the results do not change."""
  params, batch = problem(rows=512)
  trainer = cached_trainer(num_devices, True)
  sharded = trainer.shard_batch(batch)
  p, s = trainer.replicate(jax.tree.map(jnp.copy, params)), trainer.init(params)
  tx = trainer.tx if num_devices == 1 else aptsjax.apts(mlp_loss, 4, second_order=True)
  updates, want_state = jax.jit(lambda q, t: tx.update(None, t, q, batch=batch))(params,
                                                                                tx.init(params))
  got_params, got_state = trainer.step(p, s, sharded)
  # Every parameter-sized buffer is reused (the flags that the update only writes are not
  # inputs of the compiled step at all).
  assert all(x.is_deleted() for x in jax.tree.leaves((p, s.grad, s.local_state, s.global_memory)))
  assert not any(x.is_deleted() for x in jax.tree.leaves(params))
  assert_close(parallel.numpy_tree(got_params), optax.apply_updates(params, updates), 1e-5)
  assert_close(parallel.numpy_tree(got_state.value), want_state.value, 1e-5)
  # NumPy inputs are copied to the devices (and stay usable); an eagerly built state (one
  # buffer in several fields) is accepted.
  host, eager = parallel.numpy_tree(params), trainer.tx.init(params)
  if trainer.mesh is not None:
    eager = jax.device_put(eager, jax.tree.map(lambda spec: jax.NamedSharding(trainer.mesh, spec),
                                               aptsjax.state_specs(eager, "data")))
  trainer.step(host, eager, sharded)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(host),
                                                  jax.tree.leaves(parallel.numpy_tree(params))))


def test_sapts_minibatches_with_overlap():
  params, (x, y) = problem(rows=240)
  trainer = parallel.apts_trainer(mlp_loss, 4, num_devices=1, overlap=0.05, second_order=False)
  state = trainer.init(params)
  start = float(mlp_loss(params, (x, y)))
  for epoch in range(3):
    for batch in aptsjax.data.iterate_minibatches((x, y), 80, overlap=0.05, seed=0, epoch=epoch):
      params, state = trainer.step(params, state, trainer.shard_batch(batch))
  assert float(mlp_loss(params, (x, y))) < 0.7 * start
