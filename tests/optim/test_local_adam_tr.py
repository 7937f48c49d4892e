"""The learning-rate-free local solver ``local_solver="adam_tr"``: Adam's direction, the local
trust region's length, the local ratio test against the linear model (numpy oracle)."""
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aptsjax
from aptsjax.optim import local
from tests.problems import mlp_loss
from tests.problems import problem

CFG = aptsjax.TrustRegionConfig.paper()


def quadratic(x):
  a = np.array([3.0, 1.0, 0.2])
  return 0.5 * float(np.sum(a * x * x)) - float(x[0]), a * x - np.array([1.0, 0.0, 0.0])


def oracle_step(x, loss, grad, m, v, count, radius, bound, anchor):
  """One step in numpy: Adam's moments and direction, s = -r d/|d|, the ratio test, rule (7)."""
  b1, b2, eps = 0.9, 0.999, 1e-8
  m, v, count = b1 * m + (1 - b1) * grad, b2 * v + (1 - b2) * grad ** 2, count + 1
  d = (m / (1 - b1 ** count)) / (np.sqrt(v / (1 - b2 ** count)) + eps)
  length = min(radius, bound - np.linalg.norm(x - anchor))
  s = -length * d / np.linalg.norm(d)
  pred = -grad @ s
  new_loss, new_grad = quadratic(x + s)
  actual = loss - new_loss
  accept = pred > 0 and actual > CFG.eta_accept * pred
  if pred > 0 and actual > CFG.eta2 * pred:
    radius = min(CFG.beta * radius, CFG.max_radius)
  elif not (pred > 0 and actual >= CFG.eta1 * pred):
    radius = max(CFG.alpha * radius, CFG.min_radius)
  if accept:
    x, loss, grad = x + s, new_loss, new_grad
  return x, loss, grad, m, v, count, radius


@pytest.mark.parametrize("radius", [0.05, 2.5])   # growing; with rejections (steps 2 and 4)
def test_steps_match_the_numpy_oracle(x64, radius):
  solver = local.adam_trust_region_local_solver(CFG)
  vg = jax.value_and_grad(lambda x: 0.5 * jnp.sum(jnp.array([3.0, 1.0, 0.2]) * x * x) - x[0])
  anchor = np.array([1.0, -2.0, 0.5])
  loss, grad = quadratic(anchor)
  carry = solver.start(jnp.asarray(anchor), jnp.asarray(loss), jnp.asarray(grad),
                       solver.init(jnp.asarray(anchor)), jnp.asarray(radius))
  want = (anchor, loss, grad, np.zeros(3), np.zeros(3), 0, radius)
  bound = 6.0
  for _ in range(4):
    carry, _ = solver.step(vg, carry, jnp.asarray(anchor), jnp.asarray(bound), jnp.array(True))
    want = oracle_step(*want, bound, anchor)
    np.testing.assert_allclose(np.asarray(carry.params), want[0], rtol=1e-12, atol=1e-14)
    assert float(carry.loss) == pytest.approx(want[1], rel=1e-12)
    assert float(carry.extra[1]) == pytest.approx(want[6], rel=1e-12)
    assert int(carry.state.count) == want[5]


def test_apts_with_adam_tr_trains_without_a_learning_rate():
  params, batch = problem()
  tx = aptsjax.apts(mlp_loss, 4, local_solver="adam_tr", local_radius="split")
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(None, s, p, batch=batch))
  first = float(mlp_loss(params, batch))
  for _ in range(10):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  assert float(state.value) < 0.5 * first
  assert int(np.max(state.local_steps)) > 1       # the local region lets several steps run


def test_adam_tr_is_one_of_the_choices():
  assert "adam_tr" in typing.get_args(aptsjax.optim.config.LocalMethod)
  assert aptsjax.APTSConfig(local_solver="adam_tr").validate().local_solver == "adam_tr"
