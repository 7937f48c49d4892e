"""Smoke test of benchmarks.core_cost: the quick mode runs end to end at a tiny size."""
import csv
import math

from benchmarks import core_cost


def test_quick_mode_writes_finite_positive_times(tmp_path):
  """One tiny configuration: the CSV, the reference CSV and the plot are written."""
  rows = core_cost.main(["--quick", "--ns", "1000", "--memories", "2", "--out", str(tmp_path)])
  assert len(rows) == 1
  with (tmp_path / "core_cost.csv").open() as f:
    written = list(csv.DictReader(f))
  assert len(written) == 1
  for key in ("update_ms", "solve_ms", "sum_ms", "floor_ms", "solve_passes"):
    value = float(written[0][key])
    assert math.isfinite(value) and value > 0, (key, value)
  assert int(written[0]["in_use"]) == 2
  assert written[0]["on_boundary"] == "True"
  with (tmp_path / "reference.csv").open() as f:
    assert all(float(r["ms"]) > 0 for r in csv.DictReader(f))
  assert (tmp_path / "core_cost.png").stat().st_size > 0
