"""APTS's ``combine`` and ``local_method`` options, and the presets (``Hyperparams.paper()``).

Oracles: the mean-combined APTS step of first-order subdomains with one local step is known in
closed form (every f_i has gradient g^k at theta^k, so every first step is -Delta g^k / |g^k|),
and its predicted reduction is the mean of the local decreases, evaluated here in numpy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aptsjax
from tests.test_apts import mlp_loss, problem


def numpy_loss(params, batch):
  """``mlp_loss`` in float64 numpy (an independent evaluation)."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  x, y = (np.asarray(a, np.float64) for a in batch)
  h = np.tanh(x @ p["w1"] + p["b1"])
  return float(np.mean(((h @ p["w2"] + p["b2"])[:, 0] - y) ** 2))


def one_update(tx, params, batch):
  state = tx.init(params)
  grads = jax.grad(mlp_loss)(params, batch)
  updates, state = jax.jit(lambda g, s, p: tx.update(g, s, p, batch=batch))(grads, state, params)
  return updates, state


def test_mean_of_first_order_first_steps_is_one_normalised_gradient_step(x64):
  """combine="mean", first order, nu = 1: s~ = -Delta g / |g|, pred = mean_i local decrease."""
  params, batch = problem(jnp.float64, rows=64)
  radius = 0.05
  tx = aptsjax.apts(mlp_loss, num_subdomains=4, local_steps=1, second_order=False,
                    global_steps=0, base=aptsjax.Hyperparams.paper(), combine="mean",
                    init_radius=radius)
  updates, state = one_update(tx, params, batch)
  g = jax.grad(mlp_loss)(params, batch)
  gnorm = np.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(g)))
  expected = {k: -radius * np.asarray(v) / gnorm for k, v in g.items()}
  assert bool(state.apts_accepted)
  for k in params:
    np.testing.assert_allclose(updates[k], expected[k], rtol=1e-10, atol=1e-14)
  # Each subdomain's decrease f_i(theta^k) - f_i(theta^k + s): the consistency term adds
  # <g - g_i, s> to the block loss difference.
  blocks = [(batch[0][i * 16:(i + 1) * 16], batch[1][i * 16:(i + 1) * 16]) for i in range(4)]
  moved = {k: np.asarray(params[k]) + expected[k] for k in params}
  decreases = []
  for blk in blocks:
    g_i = jax.grad(mlp_loss)(params, blk)
    r_dot_s = sum(float(np.sum((np.asarray(g[k]) - np.asarray(g_i[k])) * expected[k]))
                  for k in params)
    decreases.append(numpy_loss(params, blk) - numpy_loss(moved, blk) - r_dot_s)
  np.testing.assert_allclose(float(state.predicted_reduction), np.mean(decreases), rtol=1e-9)


@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("local_method", ["trust_region", "adam"])
def test_mean_step_within_radius_and_local_steps_reach_further(second_order, local_method):
  """|s~| <= Delta with combine="mean" (the triangle inequality), over several updates."""
  params, batch = problem(jnp.float32, rows=64)
  tx = aptsjax.apts(mlp_loss, num_subdomains=2, local_steps=5, second_order=second_order,
                    global_steps=0, base=aptsjax.Hyperparams.paper(), combine="mean",
                    local_method=local_method, local_radius="split")
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, batch=batch))
  for _ in range(6):
    radius = float(state.radius)
    updates, state = step(jax.grad(mlp_loss)(params, batch), state, params)
    length = float(jnp.sqrt(sum(jnp.sum(u**2) for u in jax.tree.leaves(updates))))
    assert length <= radius * (1 + 1e-5), (length, radius)   # float32 rounding of one norm
    params = optax.apply_updates(params, updates)
  assert int(np.max(state.local_steps)) > 1


def test_local_method_adam_is_the_optax_local_solver():
  """local_method="adam" runs exactly optax_local_solver(optax.adam(local_lr))."""
  params, batch = problem(jnp.float32, rows=64)
  common = dict(num_subdomains=2, local_steps=3, second_order=True, combine="mean",
                base=aptsjax.Hyperparams.paper())
  by_name = aptsjax.apts(mlp_loss, local_method="adam", local_lr=3e-3, **common)
  by_solver = aptsjax.apts(mlp_loss, local_solver=aptsjax.optax_local_solver(optax.adam(3e-3)),
                           **common)
  out_a, state_a = one_update(by_name, params, batch)
  out_b, state_b = one_update(by_solver, params, batch)
  for a, b in zip(jax.tree.leaves((out_a, state_a)), jax.tree.leaves((out_b, state_b))):
    np.testing.assert_array_equal(a, b)


def test_paper_preset_is_the_paper_table():
  paper = aptsjax.Hyperparams.paper()
  assert (paper.radius_growth, paper.norm, paper.local_radius, paper.combine,
          paper.local_method) == ("always", "l2", "bound", "sum", "trust_region")
  assert paper[:8] == (0.01, 0.001, 4.0, 0.0, 0.25, 0.75, 0.5, 2.0)
  # The defaults change options only, never the radii, thresholds or factors.
  assert aptsjax.Hyperparams()[:8] == paper[:8]


def test_paper_preset_equals_explicit_paper_options():
  """base=Hyperparams.paper() is the same method as every paper option spelled out."""
  params, batch = problem(jnp.float32, rows=64)
  preset = aptsjax.apts(mlp_loss, num_subdomains=2, base=aptsjax.Hyperparams.paper())
  explicit = aptsjax.apts(mlp_loss, num_subdomains=2, radius_growth="always", norm="l2",
                          local_radius="bound", combine="sum", local_method="trust_region")
  out_a, _ = one_update(preset, params, batch)
  out_b, _ = one_update(explicit, params, batch)
  for a, b in zip(jax.tree.leaves(out_a), jax.tree.leaves(out_b)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", [{"combine": "max"}, {"local_method": "sgd"}, {"local_lr": 0.0},
                                 {"combine": 1.0}])
def test_bad_options_raise(bad):
  with pytest.raises(ValueError):
    aptsjax.apts(mlp_loss, num_subdomains=2, **bad)
