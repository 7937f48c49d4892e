"""Smoke test of benchmarks.options.ablation: ``--quick`` end to end (the selection's rules:
tests/benchmarks/test_ablation_rules.py).

Quick mode: MNIST-5k (1,000 of the 3,500 training rows, the 500 validation rows, the 1,000 test
rows), 2 epochs, 1 seed, SAPTS N=2 o1 and APTS N=2 o1 with three variants, Adam and SGD. A
subprocess started beside the in-process tests (tests/background.py).
"""
import math

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("matplotlib")
pytest.importorskip("mlxtend")

from benchmarks.options import ablation  # noqa: E402
from tests import background  # noqa: E402
from tests.helpers import quick_job, read_csv  # noqa: E402

COLUMNS = ["setting", "variant", "kind", "seed", "epoch", "val_acc", "test_acc", "train_loss",
           "local_steps", "apts_accept_rate", "radius_mean", "radius_final", "iterations",
           "passes_per_row", "wall_s", "allreduce_floats", "allreduce_bytes"]


QUICK = quick_job("options.ablation", "--quick")


def test_quick_mode_outputs():
  """CSV columns and configurations, APTS statistics, a chosen variant per setting, figures."""
  run = background.result(QUICK)
  out = run.out
  assert "ablation: 100%" in run.result.stdout
  rows = read_csv(out / "ablation.csv")
  assert list(rows[0]) == COLUMNS
  expected = {(s, v) for s in ablation.QUICK_SETTINGS for v in ablation.QUICK_VARIANTS}
  assert {(r["setting"], r["variant"]) for r in rows} == expected | {("Adam", "lr 0.01"),
                                                                     ("SGD", "lr 0.1")}
  assert len(rows) == 2 * (len(expected) + 2)  # 2 epochs, 1 seed each
  for r in rows:
    for key in ("val_acc", "test_acc", "train_loss", "passes_per_row", "allreduce_bytes"):
      assert math.isfinite(float(r[key])), (key, r)
    assert float(r["allreduce_bytes"]) == 4 * float(r["allreduce_floats"]) > 0
    if r["kind"] == "apts":
      assert 1 <= float(r["local_steps"]) <= 5, r
      assert 0 <= float(r["apts_accept_rate"]) <= 1, r
      assert float(r["radius_final"]) > 0, r
    else:
      assert math.isnan(float(r["radius_final"])), r
    if r["epoch"] == "2" and not r["setting"].startswith("APTS"):  # full batch: 2 iterations
      assert float(r["val_acc"]) > 0.2, r  # above chance
  summary = (out / "summary.md").read_text()
  for setting in ablation.QUICK_SETTINGS:
    assert f"### {setting}" in summary
    assert any(f"- {setting}: **{v}**" in summary for v in ablation.QUICK_VARIANTS), setting
  assert "- overall: **" in summary and "(chosen)" in summary
  for name in ("val_accuracy.png", "radius.png"):
    assert (out / name).stat().st_size > 10_000, name
