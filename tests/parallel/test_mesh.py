"""APTS on a 2-D (data x model) mesh of 4 host CPU devices equals the single-device run.

The parameters of the test MLP are sharded over the model axis tensor-parallel (first kernel
column-sharded, second row-sharded) or FSDP-style (every kernel on its first dimension); the
state follows them (aptsjax.sharding). float64 runs agree to 1e-8 after 10 iterations; float32
runs after 3 iterations within the rounding error model of tests/rounding.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import aptsjax
from aptsjax import parallel
from aptsjax import sharding
from tests import rounding
from tests.test_apts import assert_close
from tests.test_apts import mlp_loss
from tests.test_apts import one_device_float32
from tests.test_apts import problem
from tests.test_apts import run_trainer

SPECS = {
    "tp": {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()},
    "fsdp": {"w1": P("model", None), "b1": P("model"), "w2": P("model", None), "b2": P()},
}


@functools.lru_cache(maxsize=None)
def mesh_trainer(layout, data, model, second_order, **kw):
  return parallel.apts_trainer(mlp_loss, 4, num_devices=data, model_devices=model,
                               param_specs=SPECS[layout], second_order=second_order, **kw)


def run_mesh(layout, data, model, second_order, iters, dtype=jnp.float32, params=None, **kw):
  default_params, batch = problem(dtype, rows=512)
  params = jax.tree.map(jnp.copy, default_params if params is None else params)
  trainer = mesh_trainer(layout, data, model, second_order, **kw)
  state, sharded = trainer.init(params), trainer.shard_batch(batch)
  for _ in range(iters):
    params, state = trainer.step(params, state, sharded)
  return params, state


PAPER = {"base": aptsjax.Hyperparams.paper()}   # local trust-region steps, L-SR1 everywhere


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
  for name in ("loss", "radius", "predicted_reduction", "actual_reduction"):
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


def test_state_sharded_like_the_parameters():
  """Every parameter-shaped state leaf carries the parameter's spec; memory falls with M."""
  params, _ = problem(rows=512)
  trainer = mesh_trainer("tp", 2, 2, True, **PAPER)
  placed = trainer.replicate(params)
  state = trainer.init(params)
  assert placed["w1"].sharding.spec == P(None, "model")
  assert state.global_memory.s["w1"].sharding.spec == P(None, None, "model")
  assert state.global_memory.y["w2"].sharding.spec == P(None, "model", None)
  assert state.grad["b1"].sharding.spec == P("model")
  assert state.local_state.s["w1"].sharding.spec == P("data", None, None, "model")
  assert state.local_state.ss.sharding.spec == P("data")
  assert state.radius.sharding.spec == P()

  def on_device0(tree):
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == jax.devices()[0])

  # A hidden width of 256, so that the stacks (not the k-by-k matrices) dominate.
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  wide = {"w1": jax.random.normal(k1, (4, 256)), "b1": jnp.zeros(256),
          "w2": jax.random.normal(k2, (256, 1)), "b2": jnp.zeros(1)}
  per_device = {}
  for model in (1, 2, 4):   # one replica holding the 4 subdomains, over M devices
    t = parallel.apts_trainer(mlp_loss, 4, num_devices=1, model_devices=model,
                              param_specs=SPECS["tp"], second_order=True, **PAPER)
    per_device[model] = on_device0((t.replicate(wide), t.init(wide)))
  assert 0.45 < per_device[2] / per_device[1] < 0.55, per_device
  assert 0.2 < per_device[4] / per_device[1] < 0.3, per_device


def test_state_specs_match_eval_shape():
  params, _ = problem()
  tx = aptsjax.apts(mlp_loss, num_subdomains=2, second_order=True, memory=3, **PAPER)
  abstract = jax.eval_shape(tx.init, params)
  specs = aptsjax.state_specs(abstract, "data", params, SPECS["fsdp"])
  assert specs.global_memory.s["w1"] == P(None, "model", None)
  assert specs.local_state.y["b1"] == P("data", None, "model")
  assert specs.local_state.gamma == P("data")
  assert specs.grad["b2"] == P(None)
  plain = aptsjax.state_specs(abstract, "data")      # without params: the 1-D data mesh
  assert plain.global_memory.s["w1"] == P() and plain.local_state.s["w1"] == P("data")


def test_apts_in_users_shard_map_over_the_data_axis(x64):
  """``aptsjax.apts`` in the caller's shard_map, manual over "data" only, equals the trainer."""
  params, batch = problem(jnp.float64, rows=512)
  mesh = aptsjax.mesh.build_mesh(2, 2, jax.devices())
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


def test_checkpoint_restores_the_2d_shardings(tmp_path):
  """A checkpoint of a 2 x 2 run comes back sharded as ``like`` and continues bitwise."""
  params, batch = problem(rows=512)
  params = jax.tree.map(np.asarray, params)
  trainer = mesh_trainer("tp", 2, 2, True)
  laid = trainer.shard_batch(batch)
  p, state = trainer.step(params, trainer.init(params), laid)
  aptsjax.checkpoint.save(tmp_path, 1, {"params": p, "state": state})
  want, _ = trainer.step(jax.tree.map(jnp.copy, p), jax.tree.map(jnp.copy, state), laid)
  like = {"params": trainer.replicate(params), "state": trainer.init(params)}
  back = aptsjax.checkpoint.restore(tmp_path, like)
  assert back["state"].global_memory.s["w1"].sharding.spec == P(None, None, "model")
  assert back["params"]["w1"].sharding.spec == P(None, "model")
  got, _ = trainer.step(back["params"], back["state"], laid)
  got, want = parallel.numpy_tree(got), parallel.numpy_tree(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
