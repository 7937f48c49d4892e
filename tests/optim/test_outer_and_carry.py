"""``outer_momentum`` (the judged step s~ + c mu m) and ``local_radius="carry"``."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aptsjax
from aptsjax.optim import local_solvers
from tests.problems import mlp_loss
from tests.problems import problem

flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_momentum_step_is_s_plus_the_clipped_momentum(x64):
  """From one state, the update with momentum is the update without it plus c mu m,
  c = min(1, (Delta - |s~|) / |mu m|); accepted, the new m is that step."""
  params, batch = problem()
  params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
  batch = jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, batch)
  mu = 0.5
  with_m = aptsjax.apts(mlp_loss, 2, outer_momentum=mu, global_steps=0)
  without = aptsjax.apts(mlp_loss, 2, global_steps=0)
  state = with_m.init(params)
  assert state.momentum is not None and without.init(params).momentum is None
  up_0, new_0 = jax.jit(without.update)(None, state._replace(momentum=None), params,
                                        batch=batch)
  s, radius = flat(up_0), float(state.radius)
  room = radius - np.linalg.norm(s)
  assert bool(new_0.apts_accepted) and room > 0
  direction = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(0).normal(size=x.shape)),
                           params)
  unit = 1.0 / float(optax.tree.norm(direction))
  for factor in (0.5, 3.0):       # a momentum with room to spare, and one that is clipped
    m = optax.tree.scale(factor * room / mu * unit, direction)
    up_m, new_m = jax.jit(with_m.update)(None, state._replace(momentum=m), params, batch=batch)
    mm = mu * flat(m)
    c = min(1.0, room / np.linalg.norm(mm))
    assert (c < 1) == (factor > 1)
    assert bool(new_m.apts_accepted)
    np.testing.assert_allclose(flat(up_m), s + c * mm, rtol=1e-9, atol=1e-12)
    assert np.linalg.norm(flat(up_m)) <= radius * (1 + 1e-9)
    np.testing.assert_allclose(flat(new_m.momentum), flat(up_m), rtol=1e-12)


def test_momentum_restarts_after_a_rejection():
  params, (x, y) = problem()
  tx = aptsjax.apts(lambda p, b: mlp_loss(p, b) + jnp.where(
      optax.tree.norm(optax.tree.sub(p, params)) > 0, jnp.nan, 0.0), 2, outer_momentum=0.9)
  state = tx.init(params)
  state = state._replace(momentum=jax.tree.map(jnp.ones_like, params))
  _, new = jax.jit(tx.update)(None, state, params, batch=(x, y))
  assert not bool(new.apts_accepted)
  assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree.leaves(new.momentum))


def test_outer_momentum_must_be_below_one():
  with pytest.raises(ValueError, match="outer_momentum"):
    aptsjax.apts(mlp_loss, 2, outer_momentum=1.0)


class _Fake:
  """A solver whose steps only set the local radius (to see what carry keeps)."""

  def __init__(self, factor):
    self.factor = factor

  def solver(self):
    cfg = aptsjax.TrustRegionConfig.paper()
    start = local_solvers.radius_start(cfg, 4, "carry")

    def step(value_and_grad, carry, anchor, bound, active):
      grad, radius = carry.extra
      return carry._replace(extra=(grad, radius * self.factor)), jnp.array(False)

    return aptsjax.LocalSolver(init=lambda p: None, start=start, step=step)


def test_carry_starts_where_the_last_update_ended():
  solver = local_solvers.carried(_Fake(3.0).solver())
  x = jnp.zeros(3)
  state = solver.init(x)
  carry = solver.start(x, jnp.asarray(1.0), x, state, jnp.asarray(2.0))
  assert float(carry.extra[1]) == pytest.approx(0.5)       # first update: bound / nu
  carry, _ = solver.step(None, carry, x, jnp.asarray(2.0), jnp.array(True))
  assert float(carry.state[1]) == pytest.approx(1.5)       # kept in the state
  again = solver.start(x, jnp.asarray(1.0), x, carry.state, jnp.asarray(2.0))
  assert float(again.extra[1]) == pytest.approx(1.5)       # where the last update ended
  capped = solver.start(x, jnp.asarray(1.0), x, carry.state, jnp.asarray(1.0))
  assert float(capped.extra[1]) == pytest.approx(1.0)      # at most the bound
