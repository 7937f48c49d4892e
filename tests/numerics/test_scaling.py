"""Tests of aptsjax.numerics.scaling: the diagonal RMS scaling D of ``norm="rms"``.

Every expectation comes from numpy in float64 (tests/oracles.py), never from aptsjax. The scaled
region in the optimizers: tests/optim/test_trust_region.py and tests/optim/test_apts.py; the
L-SR1 rescaling: tests/numerics/test_lsr1.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aptsjax.numerics import scaling
from tests.oracles import rms_oracle
from tests.problems import flat, leaves_like


@pytest.mark.parametrize("eps", [1e-8, 0.5])
def test_scaling_update_matches_numpy(x64, eps):
  """EMA, bias correction, w and the normalisation mean(D^2) = 1 over all leaves of a pytree.

  eps = 0.5 is of the size of the RMS, so that the bias correction is visible in D (with a tiny
  eps it cancels in the normalisation).
  """
  rng = np.random.default_rng(0)
  template = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  decay = 0.9
  state = scaling.init(template)
  np.testing.assert_array_equal(flat(state.d), np.ones(7))
  update = jax.jit(scaling.update, static_argnums=(2, 3))
  grads = []
  for t in range(1, 4):
    g = rng.normal(size=7) * np.array([1e-2, 1.0, 10.0, 0.3, 3.0, 1e-3, 1.0])
    grads.append(g)
    state = update(state, leaves_like(template, g), decay, eps)
    nu, d = rms_oracle(grads, decay, eps)
    assert int(state.count) == t
    np.testing.assert_allclose(flat(state.nu), nu, rtol=1e-13)
    np.testing.assert_allclose(flat(state.d), d, rtol=1e-13)
    assert np.mean(flat(state.d) ** 2) == pytest.approx(1.0, rel=1e-13)
    assert jax.tree.structure(state.d) == jax.tree.structure(template)


def test_scaling_update_invalid_keeps_state_and_zero_gradient_is_finite():
  template = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  state = scaling.update(scaling.init(template), jax.tree.map(jnp.zeros_like, template),
                         0.999, 1e-8)
  # A zero gradient at the first call: w = eps everywhere, so D = 1 (finite, no 0 / 0).
  assert int(state.count) == 1
  np.testing.assert_array_equal(flat(state.d), np.ones(7))
  g = leaves_like(template, np.arange(1.0, 8.0))
  moved = scaling.update(state, g, 0.999, 1e-8)
  assert not np.allclose(flat(moved.d), 1.0)
  for valid in (False, jnp.array(False)):
    kept = scaling.update(moved, jax.tree.map(lambda x: 5.0 * x, g), 0.999, 1e-8, valid=valid)
    jax.tree.map(np.testing.assert_array_equal, kept, moved)
  # A non-finite gradient keeps the state whatever ``valid`` says.
  bad = scaling.update(moved, jax.tree.map(lambda x: x * jnp.nan, g), 0.999, 1e-8)
  jax.tree.map(np.testing.assert_array_equal, bad, moved)
