"""Tests of the APTS local iterations (aptsjax.local): the LocalSolver interface and the masking."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aptsjax
from aptsjax import local
from aptsjax.optim.apts import local_objective
from tests.test_apts import assert_close, mlp_loss, problem


def projected_gradient_descent(learning_rate: float) -> local.LocalSolver:
  """A custom solver: gradient steps projected into the local region; counts its steps."""
  def init(params):
    del params
    return jnp.zeros((), jnp.int32)   # steps taken over all updates (a persistent state)

  def start(params, loss, grad, state, bound):
    del bound
    return local.LocalCarry(params=params, loss=loss, state=state, extra=grad)

  def step(value_and_grad, carry, anchor, bound, active):
    moved = optax.tree.sub(optax.tree.add_scale(carry.params, -learning_rate, carry.extra), anchor)
    scale = jnp.minimum(1.0, bound / jnp.maximum(optax.tree.norm(moved), 1e-30))
    params = optax.tree.add_scale(anchor, scale, moved)
    loss, grad = value_and_grad(params)
    new = local.LocalCarry(params=params, loss=loss, state=carry.state + 1, extra=grad)
    return local.keep_inactive(active, new, carry), jnp.array(False)

  return local.LocalSolver(init=init, start=start, step=step)


def reference_steps(params, batch, num, local_steps, learning_rate, bound):
  """The same projected gradient descent on each f_i, one subdomain at a time (no vmap, no loop)."""
  x, y = batch
  rows = x.shape[0] // num
  g = jax.grad(mlp_loss)(params, batch)
  steps, decrease = [], 0.0
  for i in range(num):
    block = (x[rows * i:rows * (i + 1)], y[rows * i:rows * (i + 1)])
    r = jax.tree.map(jnp.subtract, g, jax.grad(mlp_loss)(params, block))
    f_i = local_objective(mlp_loss, block, params, r)
    p = params
    for _ in range(local_steps):
      moved = optax.tree.sub(optax.tree.add_scale(p, -learning_rate, jax.grad(f_i)(p)), params)
      p = optax.tree.add_scale(params, min(1.0, bound / float(optax.tree.norm(moved))), moved)
    steps.append(optax.tree.sub(p, params))
    decrease += float(f_i(params) - f_i(p))
  return jax.tree.map(lambda *s: sum(s), *steps), decrease


def test_custom_solver_through_the_interface(x64):
  """APTS runs a user's solver: nu steps each, the projection, s~ and (6)'s denominator."""
  params, batch = problem(jnp.float64)
  num, nu, lr = 4, 3, 0.05
  tx = aptsjax.apts(mlp_loss, num_subdomains=num, local_steps=nu, global_steps=0,
                    local_solver=projected_gradient_descent(lr), base=aptsjax.Hyperparams.paper())
  state = tx.init(params)
  updates, state = jax.jit(lambda p, s: tx.update(None, s, p, batch=batch))(params, state)
  np.testing.assert_array_equal(state.local_steps, [nu] * num)
  np.testing.assert_array_equal(state.local_state, [nu] * num)
  s_sum, decrease = reference_steps(params, batch, num, nu, lr, 0.01 / num)
  assert float(state.predicted_reduction) == pytest.approx(decrease, rel=1e-10)
  assert float(optax.tree.norm(s_sum)) <= 0.01 * (1 + 1e-12)
  assert bool(state.apts_accepted)
  assert_close(updates, s_sum, 1e-10)
  # The persistent state carries over to the next update.
  _, state = tx.update(None, state, optax.apply_updates(params, updates), batch=batch)
  np.testing.assert_array_equal(state.local_state, [2 * nu] * num)


def quartic_subdomains(curvature):
  """Local objectives with the same gradient g at 0: g.w + curvature_i |w|^4 / 4."""
  g = jnp.array([1.0, -2.0, 0.5])

  def value_and_grad(k, theta):
    return jax.value_and_grad(lambda t: g @ t["w"] + 0.25 * k * jnp.sum(t["w"] ** 2) ** 2)(theta)

  return value_and_grad, {"w": g}, jnp.asarray(curvature)


def assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("vectorize", [False, True])
def test_finished_subdomain_keeps_its_memory_exactly(x64, vectorize):
  """Subdomain 0 finishes after one step; the loop goes on for subdomain 1, not touching 0."""
  solver = local.trust_region_local_solver(aptsjax.Hyperparams(), second_order=True, memory=3)
  value_and_grad, grad, curvature = quartic_subdomains([0.5, 40.0])
  anchor = {"w": jnp.zeros(3)}
  states = jax.tree.map(lambda x: jnp.stack([x, x]), solver.init(anchor))
  run = lambda steps: jax.jit(lambda: local.run(solver, value_and_grad, curvature, anchor,
                                                 jnp.zeros(2), grad, states, jnp.asarray(1.0),
                                                 steps, vectorize=vectorize))()
  one, four = run(1), run(4)
  np.testing.assert_array_equal(one.num_steps, [1, 1])
  np.testing.assert_array_equal(four.num_steps, [1, 4])   # 0 reached its boundary, 1 did not
  first = lambda tree: jax.tree.map(lambda x: x[0], tree)
  assert int(one.state.count[0]) == 1                      # its one pair was stored ...
  assert_same(first((one.params, one.loss, one.state)), first((four.params, four.loss, four.state)))
  assert int(four.state.count[1]) > int(one.state.count[1])  # ... while 1 kept storing pairs
  assert float(optax.tree.norm(first(four.params))) == pytest.approx(1.0)


def test_inactive_step_returns_its_carry_unchanged(x64):
  """The TR step with active=False: no move, no radius change, and no pair stored."""
  solver = local.trust_region_local_solver(aptsjax.Hyperparams(), second_order=True, memory=3)
  value_and_grad, grad, _ = quartic_subdomains([])
  vg = lambda theta: value_and_grad(40.0, theta)
  anchor = {"w": jnp.zeros(3)}
  bound = jnp.asarray(1.0)
  step = jax.jit(lambda carry, active: solver.step(vg, carry, anchor, bound, active))
  carry, _ = step(solver.start(anchor, jnp.zeros(()), grad, solver.init(anchor), bound), True)
  moved, _ = step(carry, jnp.array(True))
  kept, _ = step(carry, jnp.array(False))
  assert int(moved.state.count) > int(carry.state.count)   # an active step stores a pair here
  assert_same(kept, carry)


@pytest.mark.parametrize("second_order", [False, True])
def test_vectorized_and_sequential_loops_agree(x64, monkeypatch, second_order):
  """Both loop shapes, chosen by the backend, give the same APTS run (2 devices, 2 subdomains each)."""
  params, batch = problem(jnp.float64, rows=256)
  results = []
  for backend in ("cpu", "gpu"):   # "gpu": the vectorized shape, still run on the CPU devices
    monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
    trainer = aptsjax.parallel.apts_trainer(mlp_loss, 4, num_devices=2, local_steps=3,
                                            second_order=second_order, init_radius=1.0)
    p, state, sharded = jax.tree.map(jnp.copy, params), trainer.init(params), trainer.shard_batch(batch)
    steps = []
    for _ in range(3):
      p, state = trainer.step(p, state, sharded)
      steps.append(aptsjax.parallel.numpy_tree(state.local_steps))
    results.append((aptsjax.parallel.numpy_tree(p), float(state.value), np.stack(steps)))
  (p_seq, loss_seq, steps_seq), (p_vec, loss_vec, steps_vec) = results
  np.testing.assert_array_equal(steps_seq, steps_vec)
  assert np.any(steps_seq > 1) or not second_order, steps_seq   # the loop ran several trips
  assert loss_vec == pytest.approx(loss_seq, rel=1e-10)
  assert_close(p_vec, p_seq, 1e-10)
