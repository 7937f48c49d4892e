"""APTS across real OS processes (jax.distributed over gloo on CPU), launched by aptsjax.launch.

Two processes with 2 host CPU devices each form one 4-device mesh; they must give the same
parameters, losses and radii as one process with 4 devices and as one device with N = 4
(float32, 3 iterations, within rounding), resume from a checkpoint onto the same trajectory,
and reject mismatched configurations at start-up. One launch does all three (each test reads its
part): a launch pays a JAX start-up and a compilation per process, which dominate these runs.
"""

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import aptsjax
from aptsjax import distributed
from aptsjax.parallel import launch as launcher
from tests import multiprocess_worker as worker
from tests import rounding
from tests.helpers import ROOT, launch, printed, show

ITERS = 3


def run_launch(*worker_args: str, timeout: float = 240.0) -> subprocess.CompletedProcess:
  return launch(sys.executable, os.path.join(ROOT, "tests", "multiprocess_worker.py"),
                *worker_args, timeout=timeout)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> tuple:
  """One launch: the mismatch checks, 3 iterations per order saving a checkpoint after the first,
  then a resume of each order from that checkpoint (fresh state, restored from disk)."""
  out = tmp_path_factory.mktemp("mp")
  result = run_launch("--mismatch", "--out", str(out), "--iters", str(ITERS), "--ckpt",
                      str(out / "ckpt"), "--save-at", "1", "--resume-out", str(out / "resumed"))
  return out, result


def results(two_process_run, directory: str = "") -> dict[str, np.ndarray]:
  """What process 0 wrote to ``result.npz`` under the run's directory (asserting a clean exit)."""
  out, result = two_process_run
  assert result.returncode == 0, show(result)
  return dict(np.load(out / directory / "result.npz"))


@pytest.mark.parametrize("order", [1, 2])
def test_two_processes_match_one_process_and_one_device(two_process_run, order):
  multi = results(two_process_run)
  assert int(multi["processes"]) == 2 and int(multi["devices"]) == 4
  params, _ = worker.problem()
  one_device = lambda p: worker.run(order, ITERS, num_devices=1, params=p)
  reference = one_device(params)
  spread = rounding.probe_spread(one_device, params, reference)
  got = {key: multi[f"{key}_o{order}"] for key in reference}
  for name, result in (("one process, 4 devices", worker.run(order, ITERS, num_devices=4)),
                       ("2 processes x 2 devices", got)):
    rounding.assert_within_rounding(result, reference, spread, f"order {order}, {name}")
  assert np.all(np.diff(multi[f"loss_o{order}"]) <= 0)  # full batch: the loss never increases


def test_resume_continues_the_same_trajectory(two_process_run):
  out, _ = two_process_run
  full, resumed = results(two_process_run), results(two_process_run, "resumed")
  assert sorted(os.listdir(out / "ckpt" / "o2")) == ["1"]
  for order in (1, 2):
    assert resumed[f"loss_o{order}"].shape == (ITERS - 1,)  # iterations 2 and 3 only
    np.testing.assert_array_equal(resumed[f"loss_o{order}"], full[f"loss_o{order}"][1:])
    np.testing.assert_array_equal(resumed[f"radius_o{order}"], full[f"radius_o{order}"][1:])
    np.testing.assert_array_equal(resumed[f"params_o{order}"], full[f"params_o{order}"])


def test_only_process_zero_writes(two_process_run):
  out, _ = two_process_run
  results(two_process_run)
  assert {p.name for p in out.iterdir()} - {"ckpt", "resumed"} == {"result.npz"}


def test_configuration_mismatch_is_an_error_at_start_up(two_process_run):
  _, result = two_process_run
  text = result.stdout
  for process in (0, 1):
    for message in ("num_subdomains: the trainer configuration differs",
                    "params: the parameter pytree differs", "rows: the batch differs"):
      assert printed(text, process, f"MISMATCH {message}"), show(result)
  assert "num_subdomains (process 1 has 2" in text and "(4, 9):float32" in text
  assert result.returncode == 0, show(result)


def test_unreachable_coordinator_raises_within_the_timeout():
  port = launcher.free_port()
  start = time.monotonic()
  with pytest.raises(TimeoutError, match=f"could not reach the JAX coordinator at 127.0.0.1:{port}"):
    distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=1, timeout=1.5)
  assert time.monotonic() - start < 5.0
  assert not aptsjax.distributed.launched()


def test_wait_for_coordinator_returns_once_the_port_listens():
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen()
    distributed.wait_for_coordinator(f"127.0.0.1:{server.getsockname()[1]}", timeout=2.0)


def test_coordinator_without_peers_stops_within_the_timeout():
  code = ("import aptsjax; aptsjax.distributed.initialize("
          f"'127.0.0.1:{launcher.free_port()}', num_processes=2, process_id=0, timeout=2)")
  start = time.monotonic()
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
  assert result.returncode != 0
  assert time.monotonic() - start < 30.0
  assert "waiting up to 2 s for all 2 processes" in result.stderr
  assert "DEADLINE_EXCEEDED" in result.stderr


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


def test_launch_returns_the_failure_and_stops_the_others():
  code = ("import os, sys, time\n"
          f"if os.environ['{distributed.ENV_PROCESS_ID}'] == '1': sys.exit(3)\n"
          "time.sleep(60)\n")
  start = time.monotonic()
  assert launcher.launch([sys.executable, "-c", code], num_processes=2, grace=0.5) == 3
  assert time.monotonic() - start < 20.0
  assert launcher.launch([sys.executable, "-c", "pass"], num_processes=2) == 0
  abort = "import os, signal; os.kill(os.getpid(), signal.SIGABRT)"
  assert launcher.launch([sys.executable, "-c", abort], num_processes=2, grace=0.5) == 134
  assert launcher.launch([sys.executable, "-c", "import time; time.sleep(30)"], num_processes=2,
                         timeout=1.0) == 124
  with pytest.raises(ValueError, match="no command"):
    launcher.launch([], num_processes=2)


class FakeDevice:
  def __init__(self, process_index, id):
    self.process_index, self.id = process_index, id

  def __repr__(self):
    return f"d{self.process_index}.{self.id}"


def test_device_choice_takes_the_same_count_from_every_process():
  from aptsjax import parallel

  devices = [FakeDevice(p, 10 * p + i) for p in (1, 0) for i in range(2)]  # process 1 listed first
  assert parallel.default_num_devices(4, devices) == 4
  assert parallel.default_num_devices(2, devices) == 2
  assert parallel.default_num_devices(6, devices) == 2   # 3 per process would not fit
  assert [(d.process_index, d.id) for d in parallel.mesh_devices(2, devices)] == [(0, 0), (1, 10)]
  assert [(d.process_index, d.id) for d in parallel.mesh_devices(4, devices)] == [
      (0, 0), (0, 1), (1, 10), (1, 11)]
  with pytest.raises(ValueError, match="not divisible by the 2 processes"):
    parallel.default_num_devices(3, devices)
  with pytest.raises(ValueError, match="not a multiple of the 2 processes"):
    parallel.mesh_devices(3, devices)
  with pytest.raises(ValueError, match="needs 3 devices per process"):
    parallel.mesh_devices(6, devices)


def test_single_process_rows_are_the_whole_layout():
  from aptsjax import data, parallel

  for num_devices in (1, 4):
    trainer = parallel.apts_trainer(worker.mlp_loss, 4, num_devices=num_devices, overlap=0.05)
    np.testing.assert_array_equal(trainer.process_rows(1000), data.overlap_layout(1000, 4, 0.05))
  params, (x, y) = worker.problem(rows=1000)
  rows = trainer.process_rows(1000)
  local = trainer.shard_local_batch((x[rows], y[rows]), 1000)
  whole = trainer.shard_batch((x, y))
  np.testing.assert_array_equal(np.asarray(local[0]), np.asarray(whole[0]))
  assert local[0].sharding == whole[0].sharding and len(local[0].sharding.device_set) == 4
  with pytest.raises(ValueError, match="must supply 1036 rows"):
    trainer.shard_local_batch((x[rows[:-4]], y[rows[:-4]]), 1000)
