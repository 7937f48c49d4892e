"""Smoke test of benchmarks.communication: the quick mode runs end to end (MNIST, N=2, 1 epoch),
in a subprocess started beside the in-process tests (tests/background.py)."""
import math

import pytest

from tests import background
from tests.helpers import quick_job, read_csv

pytestmark = pytest.mark.slow


def assert_finite(rows: list[dict[str, str]], keys: tuple[str, ...]) -> None:
  """Every listed column parses as a finite number."""
  for row in rows:
    for key in keys:
      value = float(row[key])
      assert math.isfinite(value), (key, row)


QUICK = quick_job("communication.communication", "--quick")


def test_quick_mode_writes_finite_counts():
  """HLO counts (APTS 4 n + O(1), Adam/SGD n), per-epoch training rows, target table, plot."""
  run = background.result(QUICK)
  out, train = run.out, run.record["returned"]
  assert train and all(0.0 <= r["test_acc"] <= 1.0 for r in train)

  hlo = read_csv(out / "hlo.csv")
  assert_finite(hlo, ("n", "floats_per_iter", "per_n", "calls_per_iter", "floats_per_epoch"))
  by_method = {r["method"]: r for r in hlo}
  assert set(by_method) == {"apts-o1", "adam", "sgd"}
  n = int(by_method["adam"]["n"])
  assert n == 535_818
  apts_floats = int(by_method["apts-o1"]["floats_per_iter"])
  assert 4 * n <= apts_floats <= 4 * n + 16, apts_floats
  assert int(by_method["apts-o1"]["in_local_loop"]) == 0
  for method in ("adam", "sgd"):
    assert int(by_method[method]["floats_per_iter"]) == n
    assert int(by_method[method]["in_loop"]) == 0

  rows = read_csv(out / "training.csv")
  assert_finite(rows, ("floats", "bytes", "test_acc", "passes_mean_local", "epoch_s"))
  assert {r["method"] for r in rows} == {"adam", "apts-o1"}
  for r in rows:
    iters = int(r["iterations"])
    assert iters == 6  # 4,000 rows, 660-row minibatches (SAPTS: 5% carried over)
    per_iter = apts_floats if r["method"] == "apts-o1" else n
    assert int(r["floats"]) == iters * per_iter and int(r["bytes"]) == 4 * int(r["floats"])
    # APTS: 1 + local steps (1..5) + 1 + 1 passes per iteration; Adam: 1.
    low, high = (4 * iters, 8 * iters) if r["method"] == "apts-o1" else (iters, iters)
    assert low <= float(r["passes_mean_local"]) <= high

  read_csv(out / "target.csv")
  assert_finite(read_csv(out / "latency.csv"), ("comm_ms_10G", "comm_ms_100G"))
  assert (out / "accuracy_vs_bytes.png").stat().st_size > 0
