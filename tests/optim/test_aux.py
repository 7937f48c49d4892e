"""Auxiliary outputs (``has_aux=True``): ``loss_fn -> (loss, aux)``, the aux of the point an update
ends at in ``state.aux``; a pair returned without the option raises naming it."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aptsjax
from tests.problems import mlp_loss
from tests.problems import problem


def loss_with_aux(params, batch):
  """``mlp_loss`` and, as aux, the mean absolute error and the rows seen."""
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  err = (h @ params["w2"] + params["b2"])[:, 0] - y
  return jnp.mean(err ** 2), {"mae": jnp.mean(jnp.abs(err)), "rows": jnp.asarray(x.shape[0])}


def mae(params, batch):
  return float(loss_with_aux(params, batch)[1]["mae"])


@pytest.mark.parametrize("second_order", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_trust_region_keeps_the_aux_of_the_current_point(second_order):
  params, batch = problem()
  tx = aptsjax.trust_region(loss_with_aux, has_aux=True, second_order=second_order,
                            init_radius=3.0)
  state = tx.init(params)
  assert state.aux is None
  step = jax.jit(lambda p, s: tx.update(jax.grad(mlp_loss)(p, batch), s, p, batch=batch))
  accepted = []
  for _ in range(6):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    accepted.append(bool(state.accepted))
    assert float(state.aux["mae"]) == pytest.approx(mae(params, batch), rel=1e-5)
    assert int(state.aux["rows"]) == 64
  assert any(accepted) and not all(accepted), accepted   # both branches of the choice seen


def test_value_and_grad_from_state_with_aux():
  """Full batch, the caller passes ``value=``: the aux comes from the state after the first
  update (which evaluates it), and it describes the current parameters."""
  params, batch = problem()
  tx = aptsjax.trust_region(loss_with_aux, has_aux=True)
  vg = aptsjax.value_and_grad_from_state(loss_with_aux, has_aux=True)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    (value, aux), grads = vg(params, batch, state=state)
    updates, state = tx.update(grads, state, params, batch=batch, value=value)
    return optax.apply_updates(params, updates), state, value, aux

  for _ in range(4):
    new_params, state, value, aux = step(params, state)
    assert float(value) == pytest.approx(float(mlp_loss(params, batch)), rel=1e-5)
    assert float(aux["mae"]) == pytest.approx(mae(params, batch), rel=1e-5)
    params = new_params
  assert float(state.aux["mae"]) == pytest.approx(mae(params, batch), rel=1e-5)


@pytest.mark.parametrize("second_order", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_apts_keeps_each_subdomains_aux(second_order):
  params, batch = problem()
  n = 4
  tx = aptsjax.apts(loss_with_aux, n, has_aux=True, second_order=second_order)
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(None, s, p, batch=batch))
  for _ in range(3):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  x, y = batch
  blocks = [(x[i * 16:(i + 1) * 16], y[i * 16:(i + 1) * 16]) for i in range(n)]
  np.testing.assert_allclose(np.asarray(state.aux["mae"]), [mae(params, b) for b in blocks],
                             rtol=1e-5)
  assert state.aux["rows"].tolist() == [16] * n
  assert "aux" in aptsjax.APTSState.PER_SUBDOMAIN


def test_a_skipped_update_keeps_the_aux_at_the_current_point():
  params, batch = problem()
  tx = aptsjax.trust_region(loss_with_aux, has_aux=True)
  step = jax.jit(lambda p, s, b: tx.update(jax.grad(mlp_loss)(p, b), s, p, batch=b))
  state = tx.init(params)
  updates, state = step(params, state, batch)
  params = optax.apply_updates(params, updates)
  x, y = batch
  bad = (x.at[0, 0].set(jnp.nan), y)
  _, skipped = step(params, state, bad)
  assert bool(skipped.nonfinite)
  assert float(skipped.aux["mae"]) == float(state.aux["mae"])


@pytest.mark.parametrize("method", ["trust_region", "apts"])
def test_a_pair_without_has_aux_raises_naming_the_option(method):
  params, batch = problem()
  tx = getattr(aptsjax, method)(loss_with_aux)
  grads = jax.grad(mlp_loss)(params, batch)
  with pytest.raises(ValueError, match="pass has_aux=True"):
    tx.update(grads, tx.init(params), params, batch=batch)


def test_has_aux_with_a_scalar_loss_raises():
  params, batch = problem()
  tx = aptsjax.trust_region(mlp_loss, has_aux=True)
  with pytest.raises(ValueError, match=r"has_aux=True: loss_fn must return a pair \(loss, aux\)"):
    tx.update(jax.grad(mlp_loss)(params, batch), tx.init(params), params, batch=batch)
