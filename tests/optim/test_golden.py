"""Float64 trajectories are bitwise those recorded before the package was split into layers.

``tests/golden/record.py`` recorded them on main 59704ee (the flat layout). Here the same script
runs the same explicit configurations through today's API, under the XLA flags of the recording
(``record.FLAGS``), in a subprocess beside the in-process tests (tests/background.py); every
iterate, loss, radius and acceptance must be equal bit for bit.
"""
import os
import sys

import numpy as np
import pytest

from tests import background
from tests.golden import record
from tests.helpers import ROOT
from tests.helpers import show

pytestmark = pytest.mark.slow

GOLDEN = ROOT / "tests" / "golden" / "trajectories.npz"


@background.job("tests/golden/record.py", "tests/optim/test_golden.py::")
def replay():
  path = background.scratch("golden") / "trajectories.npz"
  env = dict(os.environ, XLA_FLAGS=" ".join(record.FLAGS))
  result = background.run([sys.executable, "-m", "tests.golden.record", str(path)], cwd=ROOT,
                          timeout=600, env=env)
  assert result.returncode == 0, show(result)
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def trajectories():
  return background.result("tests/golden/record.py")


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
