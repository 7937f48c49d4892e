"""Test configuration: every test sees 4 host CPU devices; subprocess runs start in the background.

XLA_FLAGS must be set before jax is imported anywhere, hence at the top of conftest.
"""
import os

# The tests use tiny problems, so compile time dominates. The two flags after the device count
# lower XLA's CPU backend effort (they change no result). Users do not need them:
# `apts_trainer` compiles with XLA's loop emitters on CPU itself (second-order step of the paper
# MLP about 9 s at default flags). The suite keeps both because it also jits `tx.update` in its
# own functions, and the lower optimization level halves compile time again (the same step:
# about 4 s) at a run-time cost the tiny test problems do not feel. The last flag compiles each
# program as one LLVM module instead of several compiled in parallel: for the hundreds of small
# programs of the suite on a few cores the split costs more than it gains (about 20% of the
# compile time). Like the others it may change the last bits of a result (float64 trajectories
# differ from the default flags' by 1e-16 to 1e-15), so tests/optim/test_golden.py replays its
# recording under exactly the recording's flags.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    " --xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"
    " --xla_cpu_parallel_codegen_split_count=1"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import pytest  # noqa: E402


@pytest.fixture
def x64():
  """Runs a test with float64 enabled, restoring the previous setting afterwards."""
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", previous)


# Subprocess runs beside the in-process tests (tests/background.py): the tests that read them run
# last, and their jobs start as soon as the selection is known.
from tests import background  # noqa: E402


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
  """Moves the tests that read a background job to the end (a stable sort: the order within each
  group is kept), so that the jobs have the in-process tests' time to finish."""
  items.sort(key=lambda item: bool(background.needs(item.nodeid)))


def pytest_collection_finish(session):
  if not session.config.option.collectonly:
    background.start([item.nodeid for item in session.items])


def pytest_sessionfinish(session):
  background.stop()
