"""The simulated host devices of the multi-device benchmarks."""

from __future__ import annotations

import os

_COUNT_FLAG = "xla_force_host_platform_device_count"


def simulate_host_devices(count: int) -> None:
  """Asks XLA for ``count`` host CPU devices, unless ``XLA_FLAGS`` already sets a device count.

  XLA reads the flag when JAX first looks for devices, so call this before anything queries
  them (the benchmarks' ``main`` functions do, first thing). A run under ``aptsjax.launch`` or
  the tests' conftest keeps the count it was given.

  Args:
    count: the number of host devices.
  """
  if _COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --{_COUNT_FLAG}={count}").strip()
