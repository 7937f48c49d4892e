"""Tests of aptsjax.parallel.sharding: the partition specs of the optimizer states on 1-D and 2-D
meshes, and the trainer's placement of the states by them."""
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import aptsjax
from aptsjax import parallel
from tests.parallel.runs import PAPER
from tests.parallel.runs import SPECS
from tests.parallel.runs import mesh_trainer
from tests.problems import mlp_loss
from tests.problems import problem


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


@pytest.mark.slow
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
