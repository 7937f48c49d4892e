"""Simulated CPU devices for the multi-device examples, on a machine without accelerators.

``simulate(count)`` must run before jax is imported: it appends
``--xla_force_host_platform_device_count=count`` to ``XLA_FLAGS`` unless jax is already imported
or ``XLA_FLAGS`` already sets a device count. GPUs and TPUs ignore the flag and use their real
devices.
"""
from __future__ import annotations

import os
import sys


def simulate(count: int) -> None:
  """Asks XLA for ``count`` host CPU devices (see the module docstring)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
