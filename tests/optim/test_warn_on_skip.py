"""aptsjax.warn_on_skip: a RuntimeWarning for an update skipped in a user's own jitted loop.

``trust_region`` and ``apts`` skip an update whose loss or gradient at the current point is not
finite and only set ``state.nonfinite``; wrapped, the jitted update also warns, from a host
callback, with the message the trainer's ``on_nonfinite="warn"`` uses (issue 22).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aptsjax
from aptsjax.optim import guard
from aptsjax.parallel import step as step_lib


def loss_fn(params, batch):
  x, y = batch
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def problem(nan: bool):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 3)).astype(np.float32)
  if nan:
    x[2, 1] = np.nan
  params = {"w": jnp.zeros(3, jnp.float32), "b": jnp.zeros((), jnp.float32)}
  return params, (jnp.asarray(x), jnp.asarray(x @ np.arange(1.0, 4.0, dtype=np.float32)))


def jitted_updates(tx, nan: bool, count: int = 2):
  """``count`` updates of ``tx`` in a jitted function, as a user's own loop runs them."""
  params, batch = problem(nan)
  state = tx.init(params)

  @jax.jit
  def update(params, state):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  for _ in range(count):
    params, state = update(params, state)
  jax.block_until_ready(state)
  jax.effects_barrier()  # the warning comes from a host callback
  return params, state


@pytest.mark.parametrize("make, method", [
    (lambda: aptsjax.trust_region(loss_fn), "TrustRegion"),
    (lambda: aptsjax.apts(loss_fn, 2, local_steps=2, second_order=False), "APTS"),
    (lambda: optax.chain(optax.identity(), aptsjax.trust_region(loss_fn)), "TrustRegion"),
])
def test_a_skipped_update_warns_under_jit(make, method):
  with pytest.warns(RuntimeWarning) as caught:
    params, state = jitted_updates(aptsjax.warn_on_skip(make()), nan=True)
  messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
  assert len(messages) == 2, messages  # one per skipped update
  for i, message in enumerate(messages, 1):
    assert message == guard.nonfinite_message(i, method)
    assert f"{method} update {i} (state.iteration = {i})" in message
    assert "update was skipped" in message and "NaN/Inf" in message
  assert bool(optax.tree.get(state, "nonfinite"))
  assert all(np.all(np.asarray(p) == 0.0) for p in jax.tree.leaves(params))  # nothing moved


def test_finite_updates_do_not_warn_and_the_state_is_tx_s_own():
  tx = aptsjax.trust_region(loss_fn)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _, state = jitted_updates(aptsjax.warn_on_skip(tx), nan=False)
  assert isinstance(state, aptsjax.TrustRegionState) and not bool(state.nonfinite)
  assert jax.tree.structure(state) == jax.tree.structure(tx.init(problem(False)[0]))


def test_a_state_without_the_flags_is_refused():
  params, batch = problem(False)
  tx = aptsjax.warn_on_skip(optax.adam(1e-3))
  with pytest.raises(ValueError, match="nonfinite"):
    tx.update(params, tx.init(params), params)


def test_the_trainer_shares_the_message_and_the_callback():
  assert step_lib.nonfinite_message is guard.nonfinite_message
  assert step_lib.report_nonfinite is guard.report_nonfinite
  assert guard.nonfinite_message(3).startswith("APTS update 3 (state.iteration = 3)")
