"""Test configuration: every test sees 4 host CPU devices.

XLA_FLAGS must be set before jax is imported anywhere, hence at the top of conftest.
"""
import os

# The tests use tiny problems, so compile time dominates. The two flags after the device count
# lower XLA's CPU backend effort (they change no result). Users do not need them:
# `apts_trainer` compiles with XLA's loop emitters on CPU itself (second-order step of the paper
# MLP about 9 s at default flags). The suite keeps both because it also jits `tx.update` in its
# own functions, and the lower optimization level halves compile time again (the same step:
# about 4 s) at a run-time cost the tiny test problems do not feel.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    " --xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"
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
