"""Tests of aptsjax.numerics.compact: the hard-case unit vectors of the compact representation."""
import jax
import jax.numpy as jnp
import numpy as np

from aptsjax.numerics import compact


def test_unit_entries_and_add_unit_against_numpy():
  """The hard-case unit vectors: the first flat entries of the smallest leaves, read and added
  through one-hot contractions (small leaves) or static slices (larger ones) alike."""
  rng = np.random.default_rng(0)
  tree = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(5,)), "c": rng.normal(size=(2, 3, 4))}
  stack = jax.tree.map(lambda x: jnp.asarray(np.stack([x, -2 * x]), jnp.float32), tree)
  # smallest first: b (5 entries) gives 5 by contraction (5 x 5 <= n = 41), then a gives 5 by
  # slices (12 x 5 > 41); c gives none. Columns come in leaf order: a's, then b's.
  got = np.asarray(compact.unit_entries(stack, 10))
  want = np.concatenate([np.stack([tree["a"].ravel()[:5], -2 * tree["a"].ravel()[:5]]),
                         np.stack([tree["b"][:5], -2 * tree["b"][:5]])], axis=1)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  values = np.arange(1.0, 11.0)
  added = compact.add_unit(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree),
                           jnp.asarray(values))
  expect = {k: v.copy() for k, v in tree.items()}
  expect["b"][:5] += values[5:]
  flat = expect["a"].ravel()
  flat[:5] += values[:5]
  expect["a"] = flat.reshape(3, 4)
  for k in tree:
    np.testing.assert_allclose(np.asarray(added[k]), expect[k], rtol=1e-6)
