"""Smoke test of benchmarks.communication.hosts: the quick mode across 2 processes x 2 devices,
launched beside the in-process tests (tests/background.py)."""
import math
import sys

import pytest

from tests import background
from tests.helpers import launch, printed, read_csv

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

TIMEOUT = 240.0


@background.job("benchmarks.communication.hosts --quick",
                "tests/benchmarks/test_communication_hosts.py::")
def quick_run():
  out = background.scratch("communication_hosts")
  return out, launch(sys.executable, "-m", "benchmarks.communication.hosts", "--quick", "--out",
                     str(out), timeout=TIMEOUT)


def test_quick_mode_across_two_processes():
  """HLO (APTS 4n+4 floats, Adam n, nothing in the local loop), timings and the model table."""
  out, result = background.result("benchmarks.communication.hosts --quick")
  output = "\n".join(l for l in result.stdout.splitlines() if "Gloo" not in l)
  assert result.returncode == 0, output[-4000:] + result.stderr[-2000:]
  assert printed(output, 0, "Verdict:")
  report = ("Verdict", "[hlo]", "[measured]", "|", "communication_hosts:")
  chatter = [l for l in output.splitlines()
             if l.startswith("[process 1]") and any(r in l for r in report)]
  assert not chatter, chatter[:5]  # only process 0 prints the report (gloo's C++ log aside)
  assert {p.name for p in out.iterdir()} == {"hlo.csv", "measured.csv", "model.csv",
                                                  "summary.md"}

  hlo = read_csv(out / "hlo.csv")
  measured = read_csv(out / "measured.csv")
  model = read_csv(out / "model.csv")
  for row in hlo + measured + model:
    assert (int(row["processes"]), int(row["devices"])) == (2, 4), row

  by_method = {r["method"]: r for r in hlo}
  assert set(by_method) == {"apts-o1", "adam"}
  n = int(by_method["adam"]["n"])
  assert n == 535_818
  assert int(by_method["apts-o1"]["floats_per_iter"]) == 4 * n + 4
  assert int(by_method["apts-o1"]["calls_per_iter"]) == 4
  assert int(by_method["adam"]["floats_per_iter"]) == n
  for row in hlo:
    assert int(row["in_local_loop"]) == 0
    assert int(row["bytes_per_iter_per_process"]) == 4 * int(row["floats_per_iter"])
    assert row["all_devices_in_group"] == "True" and row["group_processes"] == "0+1", row

  assert {r["method"] for r in measured} == {"apts-o1", "adam"}
  for row in measured:
    assert int(row["iterations"]) == 3 and 0 < float(row["median_s"]) < 60

  keys = {(r["model"], int(r["H"]), int(r["gbps"])) for r in model}
  assert keys == {(m, h, g) for m in ("mnist", "cifar") for h in (2, 8, 64) for g in (10, 100)}
  for row in model:
    for key in ("adam_comm_ms", "apts_comm_ms", "comm_ratio", "adam_total_s",
                "apts_o1_total_s", "breakeven_apts_o1"):
      assert math.isfinite(float(row[key])) and float(row[key]) > 0, (key, row)
    assert float(row["apts_comm_ms"]) > float(row["adam_comm_ms"])
