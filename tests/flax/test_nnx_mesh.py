"""Flax NNX models with partitioned parameters (``nnx.with_partitioning``) and ``nnx.Optimizer``.

With ``aptsjax.flax.partitioned(tx)`` the optimizer state inherits the parameters' partitioning
metadata with the leading axes it adds (L-SR1 stacks, per-subdomain states) prefixed, so
``nnx.get_named_sharding`` shards it as the parameters; three jitted updates on a 2 x 2 mesh
equal those of an unsharded model (float64, 1e-8). ``apts_trainer`` reads the same metadata
(aptsjax.parallel.sharding).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import aptsjax
from aptsjax import flax as aptsjax_flax
from aptsjax import parallel


class MLP(nnx.Module):
  """Tensor parallel: first kernel column-sharded, second row-sharded over "model"."""

  def __init__(self, rngs, sharded=True, dtype=jnp.float64):
    part = nnx.with_partitioning if sharded else (lambda init, names: init)
    self.l1 = nnx.Linear(4, 8, rngs=rngs, param_dtype=dtype, dtype=dtype,
                         kernel_init=part(nnx.initializers.lecun_normal(), (None, "model")),
                         bias_init=part(nnx.initializers.zeros_init(), ("model",)))
    self.l2 = nnx.Linear(8, 1, rngs=rngs, param_dtype=dtype, dtype=dtype,
                         kernel_init=part(nnx.initializers.lecun_normal(), ("model", None)))

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


def loss(model, batch):
  x, y = batch
  return jnp.mean((model(x)[:, 0] - y) ** 2)


def batch(rows=64):
  x = jax.random.normal(jax.random.PRNGKey(3), (rows, 4), jnp.float64)
  return x, jnp.sin(x[:, 0]) + 0.5 * x[:, 1]


def make_tx(kind, model):
  """The optimizer, its state's metadata extended by ``aptsjax.flax.partitioned``."""
  loss_fn = aptsjax_flax.nnx_loss_fn(model, loss)
  if kind == "trust_region":
    return aptsjax_flax.partitioned(aptsjax.trust_region(loss_fn, memory=3))
  return aptsjax_flax.partitioned(aptsjax.apts(loss_fn, num_subdomains=2, second_order=True,
                                               memory=3))


def train(model, kind, data, iters=3):
  optimizer = nnx.Optimizer(model, make_tx(kind, model), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, data):
    grads = nnx.grad(loss)(model, data)
    optimizer.update(model, grads, batch=data)

  for _ in range(iters):
    step(model, optimizer, data)
  return model, optimizer


def test_trust_region_state_metadata():
  """``trust_region``'s stacks carry the parameters' specs after their memory axis."""
  mesh = jax.make_mesh((2, 2), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    model = MLP(nnx.Rngs(0), dtype=jnp.float32)
    optimizer = nnx.Optimizer(model, aptsjax_flax.partitioned(make_tx("trust_region", model)),
                              wrt=nnx.Param)
    specs = nnx.get_partition_spec(nnx.state(optimizer))["opt_state"]
  assert specs["memory"]["s"]["l1"]["kernel"].get_value() == P(None, None, "model")
  assert specs["memory"]["y"]["l1"]["bias"].get_value() == P(None, "model")
  assert specs["grad"]["l2"]["kernel"].get_value() == P("model", None)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["apts"])
def test_nnx_optimizer_with_partitioned_params(x64, kind):
  mesh = jax.make_mesh((2, 2), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  data = batch()
  with jax.set_mesh(mesh):
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, aptsjax_flax.partitioned(make_tx(kind, model)), wrt=nnx.Param)
    specs = nnx.get_partition_spec(nnx.state(optimizer))
    memory = specs["opt_state"]["global_memory" if kind == "apts" else "memory"]
    assert memory["s"]["l1"]["kernel"].get_value() == P(None, None, "model")
    assert memory["y"]["l2"]["kernel"].get_value() == P(None, "model", None)
    if kind == "apts":   # per-subdomain (Adam) states: a subdomain axis, then the parameter's
      assert specs["opt_state"]["local_state"][0]["mu"]["l1"]["bias"].get_value() == P(
          None, "model")
    # The state placed as its metadata says: every leaf fits its sharding.
    state = nnx.state(optimizer)
    nnx.update(optimizer, jax.device_put(state, nnx.get_named_sharding(state, mesh)))
    @nnx.jit
    def step(model, optimizer, data):
      grads = nnx.grad(loss)(model, data)
      optimizer.update(model, grads, batch=data)

    for _ in range(3):
      step(model, optimizer, data)
    got = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert nnx.state(model, nnx.Param)["l1"]["kernel"].get_value().sharding.spec == P(
        None, "model")

  plain, _ = train(MLP(nnx.Rngs(0), sharded=False), kind, data)
  want = nnx.to_pure_dict(nnx.state(plain, nnx.Param))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    # float64: the sharded run only reorders sums (rounding ~1e-16 relative per reduction).
    np.testing.assert_allclose(a, np.asarray(b), rtol=1e-8, atol=1e-10)
  assert any(not np.allclose(a, np.asarray(b)) for a, b in zip(
      jax.tree.leaves(got), jax.tree.leaves(nnx.to_pure_dict(
          nnx.state(MLP(nnx.Rngs(0), sharded=False), nnx.Param)))))


def test_trainer_reads_nnx_partitioning_metadata():
  """``apts_trainer(model_devices=2)`` takes the specs from ``nnx.with_partitioning``."""
  with jax.set_mesh(parallel.mesh.build_mesh(2, 2, jax.devices())):   # the trainer's layout
    model = MLP(nnx.Rngs(0), dtype=jnp.float32)
  loss_fn = aptsjax_flax.nnx_loss_fn(model, loss)
  params = nnx.state(model, nnx.Param)          # Variables, with their metadata
  trainer = parallel.apts_trainer(loss_fn, 2, num_devices=2, model_devices=2,
                                  second_order=True, memory=3)
  state = trainer.init(params)
  assert trainer.replicate(params)["l1"]["kernel"].sharding.spec == P(None, "model")
  assert state.global_memory.s["l1"]["kernel"].sharding.spec == P(None, None, "model")
  assert state.local_state[0].mu["l2"]["kernel"].sharding.spec == P("data", "model", None)
  everything = parallel.apts_trainer(loss_fn, 2, num_devices=2, model_devices=2,
                                     param_specs=P())    # a prefix: all replicated
  assert everything.init(params).grad["l1"]["kernel"].sharding.spec == P(None, None)
