"""Test configuration: every test sees 4 host CPU devices.

XLA_FLAGS must be set before jax is imported anywhere, hence at the top of conftest.
"""
import os

# The tests use tiny problems, so compile time dominates: the two flags after the device count
# cut XLA's CPU compile time about 7-fold (second-order APTS: 42 s -> 6 s) at no cost in
# correctness (they only lower the backend's optimization effort).
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
