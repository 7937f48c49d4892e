"""APTS on a 2-D (data x model) mesh of 4 host CPU devices equals the single-device run, and the
mesh's devices are chosen alike on every process (aptsjax.parallel.mesh).

The parameters of the test MLP are sharded over the model axis tensor-parallel (first kernel
column-sharded, second row-sharded) or FSDP-style (every kernel on its first dimension); the
state follows them (aptsjax.parallel.sharding, tests/parallel/test_sharding.py). float64 runs
agree to 1e-8 after 10 iterations; float32 runs after 3 iterations within the rounding error
model of tests/rounding.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
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


def test_mesh_configuration_errors():
  params, _ = problem()
  with pytest.raises(ValueError, match="model_devices"):
    parallel.apts_trainer(mlp_loss, 4, model_devices=8)
  with pytest.raises(ValueError, match="num_devices=4 x model_devices=2"):
    parallel.apts_trainer(mlp_loss, 4, num_devices=4, model_devices=2)
  with pytest.raises(ValueError, match="different names"):
    parallel.apts_trainer(mlp_loss, 4, num_devices=2, model_devices=2, model_axis="data")
  bad = parallel.apts_trainer(mlp_loss, 4, num_devices=2, model_devices=2,
                              param_specs={**SPECS["tp"], "w1": P("data", None)})
  with pytest.raises(ValueError, match="only be sharded over"):
    bad.init(params)
  odd = parallel.apts_trainer(mlp_loss, 4, num_devices=1, model_devices=4,
                              param_specs={**SPECS["tp"], "b2": P("model")})
  with pytest.raises(ValueError, match="not divisible by the 4 devices"):
    odd.init(params)


class FakeDevice:
  def __init__(self, process_index, id):
    self.process_index, self.id = process_index, id

  def __repr__(self):
    return f"d{self.process_index}.{self.id}"


def test_device_choice_takes_the_same_count_from_every_process():
  devices = [FakeDevice(p, 10 * p + i) for p in (1, 0) for i in range(2)]  # process 1 listed first
  assert parallel.default_num_devices(4, devices) == 4
  assert parallel.default_num_devices(2, devices) == 2
  assert parallel.default_num_devices(6, devices) == 2   # 3 per process would not fit
  assert [(d.process_index, d.id) for d in parallel.mesh_devices(2, devices)] == [(0, 0), (1, 10)]
  assert [(d.process_index, d.id) for d in parallel.mesh_devices(4, devices)] == [
      (0, 0), (0, 1), (1, 10), (1, 11)]
  with pytest.raises(ValueError, match="not divisible by the 2 processes"):
    parallel.default_num_devices(3, devices)
  with pytest.raises(ValueError, match="not a multiple of the 2 processes"):
    parallel.mesh_devices(3, devices)
  with pytest.raises(ValueError, match="needs 3 devices per process"):
    parallel.mesh_devices(6, devices)
