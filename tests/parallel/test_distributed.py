"""aptsjax.parallel.distributed in one process (start-up settings, timeouts, the configuration
digest) and the environment the launcher gives each process (aptsjax.parallel.launch).

Real launches of several OS processes: tests/parallel/test_multiprocess.py.
"""
import socket
import time

import numpy as np
import pytest

from aptsjax.parallel import distributed
from aptsjax.parallel import launch as launcher


def test_unreachable_coordinator_raises_within_the_timeout():
  port = launcher.free_port()
  start = time.monotonic()
  with pytest.raises(TimeoutError, match=f"could not reach the JAX coordinator at 127.0.0.1:{port}"):
    distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=1, timeout=1.5)
  assert time.monotonic() - start < 5.0
  assert not distributed.launched()


def test_wait_for_coordinator_returns_once_the_port_listens():
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen()
    distributed.wait_for_coordinator(f"127.0.0.1:{server.getsockname()[1]}", timeout=2.0)


@pytest.mark.parametrize("settings, message", [
    ({"coordinator_address": "127.0.0.1:1"}, "missing num_processes, process_id"),
    ({"coordinator_address": "127.0.0.1:1", "num_processes": 2, "process_id": 2}, "must lie in"),
    ({"coordinator_address": "localhost", "num_processes": 2, "process_id": 1}, "host:port"),
])
def test_initialize_rejects_bad_settings(settings, message):
  with pytest.raises(ValueError, match=message):
    distributed.initialize(**settings, timeout=1.0)


def test_single_process_initialize_and_checks_are_no_ops():
  assert distributed.initialize() is False
  distributed.check_same({"num_subdomains": 4, "params": {"w": np.zeros((2, 3))}})
  assert distributed.is_main_process()


def test_describe_compares_structure_and_shapes_not_values():
  a = distributed._describe({"w": np.zeros((2, 3), np.float32)})
  assert a == distributed._describe({"w": np.ones((2, 3), np.float32)})
  assert a != distributed._describe({"w": np.zeros((3, 2), np.float32)})
  assert a != distributed._describe({"w": np.zeros((2, 3), np.float64)})
  assert a != distributed._describe({"v": np.zeros((2, 3), np.float32)})
  assert distributed._describe(0.05) != distributed._describe(0.050000001)
  # Functions (e.g. a custom local solver) compare by name, not by their address in memory.
  f = lambda x: x
  assert " at 0x" in repr(f) and " at 0x" not in distributed._describe({"solver": f})
  g = test_describe_compares_structure_and_shapes_not_values
  assert distributed._describe({"solver": f}) != distributed._describe({"solver": g})


def test_process_env_sets_the_runtime_variables():
  env = launcher.process_env({"XLA_FLAGS": "--foo --xla_force_host_platform_device_count=8"},
                           process_id=1, num_processes=3, port=1234, devices_per_process=2,
                           platform="cpu")
  assert env[distributed.ENV_COORDINATOR] == "127.0.0.1:1234"
  assert env[distributed.ENV_NUM_PROCESSES] == "3" and env[distributed.ENV_PROCESS_ID] == "1"
  assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=2"
  gpu = launcher.process_env({}, process_id=1, num_processes=2, port=1, devices_per_process=2,
                           platform="gpu")
  assert gpu[distributed.ENV_LOCAL_DEVICE_IDS] == "2,3" and "XLA_FLAGS" not in gpu
