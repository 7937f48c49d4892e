"""aptsjax.flax: aptsjax.trust_region and aptsjax.apts in Flax loops: NNX (nnx.Optimizer, with
``nnx_loss_fn``), Linen (TrainState, with ``apply_train_state``), optax.chain.

Every trust-region run is full batch on two Gaussian blobs (200 rows), so the loss never
increases between iterations. NNX models with partitioned parameters on meshes:
tests/flax/test_nnx_mesh.py.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import aptsjax
from aptsjax.flax import apply_train_state
from aptsjax.flax import nnx_loss_fn
from tests.problems import lsq_problem

STEPS = 30


def blobs(rows: int = 200, seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """Two 2-d Gaussian blobs centred at (+2, +2) and (-2, -2); labels 0 and 1."""
  rng = np.random.default_rng(seed)
  half = rows // 2
  x = np.concatenate([rng.normal(2.0, 1.0, (half, 2)), rng.normal(-2.0, 1.0, (half, 2))])
  y = np.concatenate([np.zeros(half, np.int32), np.ones(half, np.int32)])
  return jnp.asarray(x, jnp.float32), jnp.asarray(y)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def assert_trained(losses: list[float]) -> None:
  """The loss falls to under a fifth of its start and never increases."""
  losses = np.asarray(losses)
  assert np.all(np.isfinite(losses)), losses
  assert np.all(np.diff(losses) <= 0.0), losses
  assert losses[-1] < 0.2 * losses[0], losses


# ----------------------------------------------------------------------------
# NNX


class MLP(nnx.Module):
  """2 -> 16 -> 2 tanh MLP."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(2, 16, rngs=rngs)
    self.out = nnx.Linear(16, 2, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.out(jnp.tanh(self.hidden(x)))


def nnx_loss(model: nnx.Module, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
  """The loss of an NNX model on a (features, labels) batch."""
  x, y = batch
  return cross_entropy(model(x), y)


@nnx.jit
def nnx_train_step(model: MLP, optimizer: nnx.Optimizer, batch) -> jax.Array:
  """One trust-region iteration; returns the loss before it."""
  loss, grads = nnx.value_and_grad(nnx_loss)(model, batch)
  optimizer.update(model, grads, batch=batch)
  return loss


def test_nnx_optimizer_trains_mlp():
  batch = blobs()
  model = MLP(nnx.Rngs(0))
  tx = aptsjax.trust_region(nnx_loss_fn(model, nnx_loss))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  losses = [float(nnx_train_step(model, optimizer, batch)) for _ in range(STEPS)]
  losses.append(float(nnx_loss(model, batch)))
  assert_trained(losses)
  assert int(optimizer.step[...]) == STEPS
  assert int(optimizer.opt_state.iteration[...]) == STEPS
  assert int(optimizer.opt_state.num_accepted[...]) >= STEPS // 2
  # The optimizer's loss is the model's loss at the final parameters.
  np.testing.assert_allclose(float(optimizer.opt_state.value[...]), losses[-1], rtol=1e-5)


def test_nnx_loss_fn_takes_pure_and_variable_states():
  batch = blobs()
  model = MLP(nnx.Rngs(1))
  loss_fn = nnx_loss_fn(model, nnx_loss)
  expected = float(nnx_loss(model, batch))
  params = nnx.state(model, nnx.Param)
  assert float(loss_fn(params, batch)) == pytest.approx(expected, rel=1e-6)
  assert float(loss_fn(nnx.as_pure(params), batch)) == pytest.approx(expected, rel=1e-6)
  # loss_fn reads the params it is given, not the model's.
  doubled = jax.tree.map(lambda p: 2.0 * p, nnx.as_pure(params))
  model_2 = MLP(nnx.Rngs(1))
  nnx.update(model_2, doubled)
  assert float(loss_fn(doubled, batch)) == pytest.approx(float(nnx_loss(model_2, batch)), rel=1e-6)
  assert float(nnx_loss(model, batch)) == expected  # the model is untouched


@pytest.mark.parametrize("second_order", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_nnx_float32_model_with_float64_data(x64, second_order):
  """float32 parameters with float64 data under jax_enable_x64, through nnx.Optimizer, with
  either method: the model and the optimizer state stay float32 and the loss falls."""
  _, batch = lsq_problem()
  batch = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), batch)
  model_loss = lambda m, b: jnp.mean((m(b[0])[:, 0] - b[1]) ** 2)

  @nnx.jit
  def nnx_step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(model_loss)(model, batch)
    optimizer.update(model, grads, batch=batch)
    return loss

  for make in (aptsjax.trust_region,
               lambda f, **kw: aptsjax.apts(f, num_subdomains=2, local_steps=2, **kw)):
    model = nnx.Linear(5, 1, rngs=nnx.Rngs(0), param_dtype=jnp.float32)
    tx = make(nnx_loss_fn(model, model_loss), second_order=second_order)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    losses = [float(nnx_step(model, optimizer, batch)) for _ in range(4)]
    assert model.kernel[...].dtype == jnp.float32
    assert optimizer.opt_state.value[...].dtype == jnp.float32
    assert float(optimizer.opt_state.value[...]) < losses[0], losses


class WithBatchNorm(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.linear = nnx.Linear(2, 4, rngs=rngs)
    self.norm = nnx.BatchNorm(4, rngs=rngs)

  def __call__(self, x):
    return self.norm(self.linear(x))


class WithDropout(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, dropout_rngs: nnx.Rngs | None):
    self.linear = nnx.Linear(2, 4, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=dropout_rngs)

  def __call__(self, x):
    return self.drop(self.linear(x))


class WithCounter(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.linear = nnx.Linear(2, 4, rngs=rngs)
    self.calls = nnx.Variable(jnp.zeros((), jnp.int32))

  def __call__(self, x):
    self.calls[...] += 1
    return self.linear(x)


class WithRngs(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.linear = nnx.Linear(2, 4, rngs=rngs)
    self.rngs = rngs

  def __call__(self, x):
    return self.linear(x) + jax.random.normal(self.rngs.noise(), (x.shape[0], 4))


@pytest.mark.parametrize("make, culprit", [
    (lambda: WithBatchNorm(nnx.Rngs(0)), "BatchStat"),
    (lambda: WithDropout(nnx.Rngs(0), nnx.Rngs(dropout=1)), "drop"),
    (lambda: WithDropout(nnx.Rngs(0), None), "Dropout"),
    (lambda: WithCounter(nnx.Rngs(0)), "calls"),
    (lambda: WithRngs(nnx.Rngs(0, noise=1)), "rngs"),
], ids=["batchnorm", "dropout", "dropout-no-rngs", "mutable-variable", "rngs"])
def test_nnx_loss_fn_rejects_mutable_state(make, culprit):
  with pytest.raises(ValueError, match="deterministic") as info:
    nnx_loss_fn(make(), nnx_loss)
  assert culprit in str(info.value)


class WithConstant(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.linear = nnx.Linear(2, 2, rngs=rngs)
    self.shift = nnx.data(jnp.array([0.5, -0.5]))
    self.drop = nnx.Dropout(0.0)

  def __call__(self, x):
    return self.drop(self.linear(x) + self.shift, deterministic=True)


def test_nnx_loss_fn_accepts_plain_array_constants():
  batch = blobs()
  model = WithConstant(nnx.Rngs(0))
  loss_fn = nnx_loss_fn(model, nnx_loss)
  assert float(loss_fn(nnx.state(model, nnx.Param), batch)) == pytest.approx(
      float(nnx_loss(model, batch)), rel=1e-6)


# ----------------------------------------------------------------------------
# Linen


class LinenMLP(nn.Module):
  """2 -> 16 -> 2 tanh MLP."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(2)(jnp.tanh(nn.Dense(16)(x)))


def make_linen_state(batch) -> tuple[train_state.TrainState, Callable]:
  """A TrainState with aptsjax.trust_region on a Linen MLP, and its loss_fn."""
  module = LinenMLP()
  params = module.init(jax.random.key(0), batch[0][:1])["params"]

  def loss_fn(params, batch):
    x, y = batch
    return cross_entropy(module.apply({"params": params}, x), y)

  tx = aptsjax.trust_region(loss_fn)
  return train_state.TrainState.create(apply_fn=module.apply, params=params, tx=tx), loss_fn


def test_linen_train_state_trains_mlp():
  batch = blobs()
  state, loss_fn = make_linen_state(batch)

  @jax.jit
  def train_step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
    return apply_train_state(state, grads, batch=batch, value=loss), loss

  losses = []
  for _ in range(STEPS):
    state, loss = train_step(state, batch)
    losses.append(float(loss))
  losses.append(float(loss_fn(state.params, batch)))
  assert_trained(losses)
  assert int(state.step) == STEPS
  assert int(state.opt_state.iteration) == STEPS


def recording_transformation(seen: list) -> optax.GradientTransformationExtraArgs:
  """Returns -grads / 2 and records the keyword arguments of every ``update`` call."""

  def update_fn(updates, state, params=None, **extra_args):
    seen.append((params is not None, sorted(extra_args)))
    return jax.tree.map(lambda g: -0.5 * g, updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def test_apply_train_state_forwards_extra_args():
  seen = []
  params = {"w": jnp.array([1.0, 2.0])}
  state = train_state.TrainState.create(apply_fn=None, params=params,
                                        tx=recording_transformation(seen))
  grads = {"w": jnp.array([2.0, 4.0])}
  new = apply_train_state(state, grads, batch=(1, 2), value=3.0)
  assert seen == [(True, ["batch", "value"])]
  np.testing.assert_array_equal(new.params["w"], [0.0, 0.0])
  assert int(new.step) == 1 and new.opt_state == state.opt_state
  # Why the helper exists: flax's apply_gradients never passes keywords to tx.update.
  state.apply_gradients(grads=grads)
  assert seen[-1] == (True, [])
  with pytest.raises(TypeError):
    state.apply_gradients(grads=grads, batch=(1, 2))


def test_apply_train_state_rejects_overwrite_with_gradient():
  params = {"params": {"w": jnp.ones(2)}, train_state.OVERWRITE_WITH_GRADIENT: {"s": jnp.ones(())}}
  state = train_state.TrainState.create(apply_fn=None, params=params,
                                        tx=recording_transformation([]))
  with pytest.raises(ValueError, match="overwrite_with_gradient"):
    apply_train_state(state, params, batch=None)


# ----------------------------------------------------------------------------
# optax.chain


def passthrough_extra_args() -> optax.GradientTransformationExtraArgs:
  """An ExtraArgs transformation that accepts (and ignores) any keyword and keeps the updates."""

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    return updates, state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def chain_trajectory(tx, loss_fn, params, batch, steps: int = STEPS):
  """Parameters and losses (before each update) of ``steps`` jitted full-batch updates."""

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, batch=batch, value=loss)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  history = []
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state)
    history.append((params, loss))
  return history


def test_chain_matches_bare_transformation():
  # One chain with a plain transformation (optax.identity, wrapped by optax.chain) and an
  # ExtraArgs one that also receives batch=... and value=...: both leave the trust-region
  # updates alone, so the trajectory is the bare transformation's, bit for bit (the same loop
  # traces to the same computation).
  batch = blobs()
  state, loss_fn = make_linen_state(batch)
  bare = chain_trajectory(aptsjax.trust_region(loss_fn), loss_fn, state.params, batch)
  chained_tx = optax.chain(aptsjax.trust_region(loss_fn), optax.identity(),
                           passthrough_extra_args())
  chained = chain_trajectory(chained_tx, loss_fn, state.params, batch)
  for (p_bare, l_bare), (p_chain, l_chain) in zip(bare, chained):
    np.testing.assert_array_equal(l_bare, l_chain)
    jax.tree.map(np.testing.assert_array_equal, p_bare, p_chain)
  assert bare[-1][1] < 0.2 * bare[0][1]
