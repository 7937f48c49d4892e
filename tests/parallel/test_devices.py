"""APTS across 2 or 4 host CPU devices equals the single-device run.

shard_map (``apts_trainer`` and a caller's own ``shard_map``) and ``jax.pmap``, both loop shapes
of the local iterations, parameter blocks, the scaled region, and 2-D (data x model) meshes:
float64 runs agree to 1e-8 or 1e-10, float32 runs within the rounding error model of
tests/rounding.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import aptsjax
from aptsjax import parallel
from aptsjax.parallel import sharding
from tests import rounding
from tests.parallel.runs import PAPER
from tests.parallel.runs import SPECS
from tests.parallel.runs import one_device_float32
from tests.parallel.runs import run_mesh
from tests.parallel.runs import run_trainer
from tests.problems import assert_close
from tests.problems import mlp_loss
from tests.problems import problem

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("second_order, preset", [(False, "defaults"), (True, "defaults"),
                                                  (True, "paper")])
def test_shard_map_matches_one_device_float64(x64, second_order, preset):
  """4 devices = 1 device over 10 float64 iterations: the defaults (local Adam, mean of the
  local steps) and the paper's method (local TR with L-SR1 memories, sum)."""
  iters = 10
  kw = PAPER if preset == "paper" else {}
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


@pytest.mark.parametrize("second_order", [False, True])
def test_vectorized_and_sequential_loops_agree(x64, monkeypatch, second_order):
  """Both loop shapes, chosen by the backend, give the same APTS run (2 devices, 2 subdomains each)."""
  params, batch = problem(jnp.float64, rows=256)
  results = []
  for backend in ("cpu", "gpu"):   # "gpu": the vectorized shape, still run on the CPU devices
    monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
    trainer = parallel.apts_trainer(mlp_loss, 4, num_devices=2, local_steps=3,
                                            second_order=second_order, init_radius=1.0)
    p, state, sharded = jax.tree.map(jnp.copy, params), trainer.init(params), trainer.shard_batch(batch)
    steps = []
    for _ in range(3):
      p, state = trainer.step(p, state, sharded)
      steps.append(parallel.numpy_tree(state.local_steps))
    results.append((parallel.numpy_tree(p), float(state.value), np.stack(steps)))
  (p_seq, loss_seq, steps_seq), (p_vec, loss_vec, steps_vec) = results
  np.testing.assert_array_equal(steps_seq, steps_vec)
  assert np.any(steps_seq > 1) or not second_order, steps_seq   # the loop ran several trips
  assert loss_vec == pytest.approx(loss_seq, rel=1e-10)
  assert_close(p_vec, p_seq, 1e-10)


# Parameter blocks: per-column blocks of w1 (labels of shape (1, 8)), b1 with w1's columns,
# w2 and b2 one more block (J = 4, as "layers" gives for the four leaves).
COLUMNS = {"w1": np.array([[0, 1, 2, 0, 1, 2, 0, 1]]), "b1": np.array([0, 1, 2, 0, 1, 2, 0, 1]),
           "w2": 3, "b2": 3}


def trainer_run(num_devices, param_blocks, base):
  params, batch = problem(jnp.float64, rows=64)
  trainer = parallel.apts_trainer(mlp_loss, 2, num_devices=num_devices, local_steps=3,
                                  base=base, param_blocks=param_blocks)
  state, sharded = trainer.init(params), trainer.shard_batch(batch)
  for _ in range(3):
    params, state = trainer.step(params, state, sharded)
  return parallel.numpy_tree(params), parallel.numpy_tree(state)


@pytest.mark.parametrize("param_blocks, base, backend", [
    ("layers", None, "cpu"), (COLUMNS, PAPER["base"], "gpu")])
def test_blocks_two_devices_match_one(x64, monkeypatch, param_blocks, base, backend):
  """apts_trainer over 2 devices (shard_map, each holding N / 2 x J problems) = 1 device: the
  defaults (Adam local solver) and the paper's local TR; "gpu": the 2-device run takes the
  vectorized local loop (still on the CPU devices), the 1-device run the sequential one."""
  one = trainer_run(1, param_blocks, base)
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  two = trainer_run(2, param_blocks, base)
  assert one[1].local_steps.shape == two[1].local_steps.shape == (2 * 4,)
  for a, b in zip(jax.tree.leaves(two[0]) + [two[1].value, two[1].radius],
                  jax.tree.leaves(one[0]) + [one[1].value, one[1].radius]):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
  np.testing.assert_array_equal(two[1].local_steps, one[1].local_steps)
  assert bool(one[1].accepted)


def test_rms_trainer_two_devices_matches_one_float32():
  """norm="rms" under apts_trainer: 2 devices equal 1 within rounding (tests/rounding.py)."""
  params, _ = problem(rows=512)

  def run(num_devices, p):
    p, state = run_trainer(num_devices, True, 3, params=p, norm="rms")
    assert state.scaling is not None
    return {"params": p, "loss": state.value, "radius": state.radius, "d": state.scaling.d}

  reference = run(1, params)
  spread = rounding.probe_spread(lambda p: run(1, p), params, reference)
  rounding.assert_within_rounding(run(2, params), reference, spread, "norm='rms', 2 devices")


# ----------------------------------------------------------------------------
# 2-D (data x model) meshes: the parameters sharded over the model axis tensor-parallel (first
# kernel column-sharded, second row-sharded) or FSDP-style (every kernel on its first
# dimension); the state follows them (tests/parallel/test_sharding.py).


# Both layouts on both meshes, both orders; second order also with the paper's local TR steps.
@pytest.mark.parametrize("layout,data,model,second_order,kw", [
    ("tp", 2, 2, False, {}), ("tp", 1, 4, True, PAPER), ("fsdp", 2, 2, True, {}),
    ("fsdp", 1, 4, False, {})],
    ids=["tp-2x2-o1", "tp-1x4-o2-paper", "fsdp-2x2-o2", "fsdp-1x4-o1"])
def test_mesh_matches_one_device_float64(x64, layout, data, model, second_order, kw):
  kw = tuple(kw.items())
  params, state = run_mesh(layout, data, model, second_order, 10, jnp.float64, **dict(kw))
  want_params, want_state = run_trainer(1, second_order, 10, jnp.float64, **dict(kw))
  assert state.iteration == 10 and bool(np.any(np.asarray(state.local_steps) > 0))
  assert_close(parallel.numpy_tree(params), want_params, 1e-8)
  for name in ("value", "radius", "predicted_reduction", "actual_reduction"):
    assert_close(np.asarray(getattr(state, name)), getattr(want_state, name), 1e-8)
  assert bool(state.accepted) == bool(want_state.accepted)


@pytest.mark.parametrize("layout,data,model,second_order", [
    ("tp", 2, 2, True), ("fsdp", 1, 4, False)])
def test_mesh_matches_one_device_float32(layout, data, model, second_order):
  iters = 3
  params, _ = problem(rows=512)
  reference, spread = one_device_float32(second_order, iters, params)
  got, state = run_mesh(layout, data, model, second_order, iters, params=params)
  rounding.assert_within_rounding(
      {"params": parallel.numpy_tree(got), "loss": np.asarray(state.value),
       "radius": np.asarray(state.radius)}, reference, spread, f"{layout} {data}x{model} mesh")


def test_apts_in_users_shard_map_over_the_data_axis(x64):
  """``aptsjax.apts`` in the caller's shard_map, manual over "data" only, equals the trainer."""
  params, batch = problem(jnp.float64, rows=512)
  mesh = parallel.mesh.build_mesh(2, 2, jax.devices())
  specs = SPECS["tp"]
  tx = aptsjax.apts(mlp_loss, num_subdomains=4, axis_name="data", second_order=True)
  placed = jax.device_put(params, sharding.shardings(specs, mesh))
  state = tx.init(placed)
  state = jax.device_put(state, sharding.shardings(
      aptsjax.state_specs(state, "data", params, specs), mesh))
  laid = aptsjax.data.overlapping_subdomains(batch, 4)
  laid = jax.device_put(laid, NamedSharding(mesh, P("data")))
  data_specs = aptsjax.state_specs(state, "data")

  @jax.jit
  def step(p, s, b):
    def inner(p, s, b):
      updates, s = tx.update(None, s, p, batch=b)
      return jax.tree.map(lambda a, u: a + u, p, updates), s
    return jax.shard_map(inner, mesh=mesh, in_specs=(P(), data_specs, P("data")),
                         out_specs=(P(), data_specs), axis_names={"data"})(p, s, b)

  for _ in range(3):
    placed, state = step(placed, state, laid)
  want, _ = run_trainer(1, True, 3, jnp.float64)
  assert placed["w1"].sharding.spec == P(None, "model")
  assert_close(parallel.numpy_tree(placed), want, 1e-8)
