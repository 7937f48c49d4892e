"""APTS across real OS processes (jax.distributed over gloo on CPU), launched by
aptsjax.parallel.launch; and the launcher's and the coordinator's behaviour with real processes.

Two processes with 2 host CPU devices each form one 4-device mesh; they must give the same
parameters, losses and radii as one process with 4 devices and as one device with N = 4
(float32, 3 iterations, within rounding), resume from a checkpoint onto the same trajectory,
and reject mismatched configurations at start-up. One launch does all three (each test reads its
part): a launch pays a JAX start-up and a compilation per process, which dominate these runs.
In-process tests of the start-up code: tests/parallel/test_distributed.py.
"""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from aptsjax.parallel import distributed
from aptsjax.parallel import launch as launcher
from tests import background
from tests import rounding
from tests.helpers import ROOT, launch, printed, show
from tests.parallel import multiprocess_worker as worker

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

ITERS = 3


def run_launch(*worker_args: str, timeout: float = 240.0) -> subprocess.CompletedProcess:
  return launch(sys.executable, os.path.join(ROOT, "tests", "parallel", "multiprocess_worker.py"),
                *worker_args, timeout=timeout)


@background.job("tests/parallel/multiprocess_worker.py, 2 processes",
                *(f"tests/parallel/test_multiprocess.py::{name}" for name in (
                    "test_two_processes", "test_resume", "test_only_process_zero",
                    "test_configuration_mismatch")))
def launch_worker() -> tuple:
  """One launch: the mismatch checks, 3 iterations per order saving a checkpoint after the first,
  then a resume of each order from that checkpoint (fresh state, restored from disk)."""
  out = background.scratch("multiprocess")
  result = run_launch("--mismatch", "--out", str(out), "--iters", str(ITERS), "--ckpt",
                      str(out / "ckpt"), "--save-at", "1", "--resume-out", str(out / "resumed"))
  return out, result


@pytest.fixture(scope="module")
def two_process_run() -> tuple:
  """The launch's output folder and process (started beside the in-process tests)."""
  return background.result("tests/parallel/multiprocess_worker.py, 2 processes")


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


@background.job("a coordinator without peers",
                "tests/parallel/test_multiprocess.py::test_coordinator_without_peers")
def coordinator_alone() -> tuple:
  """A process 0 of 2 that no process 1 joins (timeout 2 s); returns (process, seconds)."""
  code = ("import aptsjax; aptsjax.distributed.initialize("
          f"'127.0.0.1:{launcher.free_port()}', num_processes=2, process_id=0, timeout=2)")
  start = time.monotonic()
  result = background.run([sys.executable, "-c", code], cwd=ROOT, timeout=60)
  return result, time.monotonic() - start


def test_coordinator_without_peers_stops_within_the_timeout():
  result, seconds = background.result("a coordinator without peers")
  assert result.returncode != 0
  assert seconds < 30.0
  assert "waiting up to 2 s for all 2 processes" in result.stderr
  assert "DEADLINE_EXCEEDED" in result.stderr


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
