"""Float64 trajectories are bitwise those recorded before the package was split into layers.

``tests/golden/record.py`` recorded them on main 59704ee (the flat layout). Here the same explicit
configurations run through today's API, under the suite's XLA flags (tests/conftest.py, the
flags of the recording), and every iterate, loss, radius and acceptance must be equal bit for bit.
"""
import pathlib

import jax
import numpy as np
import pytest

from tests.golden import record

GOLDEN = pathlib.Path(record.__file__).with_name("trajectories.npz")


@pytest.fixture(scope="module")
def trajectories():
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield record.record()
  finally:
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as f:
    return {k: f[k] for k in f.files}


def test_same_configurations(trajectories, golden):
  assert sorted(trajectories) == sorted(golden)


@pytest.mark.parametrize("name", sorted({k.rsplit("/", 1)[0] for k in np.load(GOLDEN).files}))
def test_bitwise(trajectories, golden, name):
  for field in ("params", "value", "radius", "accepted"):
    got, want = trajectories[f"{name}/{field}"], golden[f"{name}/{field}"]
    assert got.dtype == want.dtype and got.shape == want.shape, (name, field)
    assert np.array_equal(got, want), (name, field, np.max(np.abs(got - want)))
