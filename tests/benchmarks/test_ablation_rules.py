"""benchmarks.options.ablation and benchmarks.options.report without a run: the selection's rules and
the variants' composition (the quick run: tests/benchmarks/test_ablation.py)."""
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("mlxtend")

from benchmarks.options import ablation  # noqa: E402
from benchmarks.options import report as ablation_report  # noqa: E402


def _row(setting, variant, seed, val, test, nbytes=1e6, epoch=2, kind="apts"):
  return {"setting": setting, "variant": variant, "kind": kind, "seed": seed, "epoch": epoch,
          "val_acc": val, "test_acc": test, "allreduce_bytes": nbytes}


def test_selection_reads_validation_not_test():
  """Validation and test disagree: the choice follows validation (final epoch, mean over
  seeds); equal validation goes to fewer bytes; Adam/SGD never compete."""
  rows = [
      _row("S1", "a", 0, 0.50, 0.99, epoch=1),  # a's best epoch, but not its last
      _row("S1", "a", 0, 0.90, 0.80), _row("S1", "a", 1, 0.92, 0.80),
      _row("S1", "b", 0, 0.88, 0.99), _row("S1", "b", 1, 0.89, 0.99),
      _row("S2", "a", 0, 0.80, 0.99, nbytes=2e6), _row("S2", "b", 0, 0.80, 0.50),
      _row("Adam", "lr 0.01", 0, 0.99, 0.99, kind="adam"),
  ]
  assert ablation_report.choose(rows) == {"S1": "a", "S2": "b"}
  assert ablation_report.ranking(rows) == {"S1": ["a", "b"], "S2": ["b", "a"]}
  # Mean rank 1.5 each: the tie goes to a's higher mean validation accuracy (0.855 vs 0.8425).
  assert ablation_report.overall_choice(rows) == ("a", 1.5)
  swapped = [dict(r, val_acc=r["test_acc"], test_acc=r["val_acc"]) for r in rows]
  assert ablation_report.choose(swapped)["S1"] == "b"  # the same code reads val_acc
  # Equal validation and bytes: the variant run first (the paper's table comes first).
  tied = [_row("S", "paper", 0, 0.8, 0.1), _row("S", "boundary", 0, 0.8, 0.9)]
  assert ablation_report.choose(tied) == {"S": "paper"}
  assert ablation_report.choose(tied[::-1]) == {"S": "boundary"}


def test_target_counts_only_reaching_seeds():
  """Epochs and bytes to the target are means over the seeds that reach it."""
  runs = {0: [_row("S", "a", 0, 0.9, 0.90, 1e6, 1), _row("S", "a", 0, 0.9, 0.95, 2e6, 2)],
          1: [_row("S", "a", 1, 0.9, 0.94, 1e6, 1), _row("S", "a", 1, 0.9, 0.96, 2e6, 2)],
          2: [_row("S", "a", 2, 0.9, 0.50, 1e6, 1), _row("S", "a", 2, 0.9, 0.60, 2e6, 2)]}
  assert ablation_report.to_target(runs, 93.47) == (2, 1.5, 1.5e6)
  assert ablation_report.to_target(runs, 99.0)[0] == 0


def test_variants_compose_and_fail_clearly(monkeypatch):
  """Options join with "+"; unknown, clashing or unavailable options raise ValueError."""
  v = ablation.variant("boundary+rms+split")
  assert dict(v.overrides) == {"radius_growth": "boundary", "norm": "rms", "local_radius": "split"}
  assert v.local_solver is None
  assert ablation.variant("adam-local+rms").local_solver == "adam"
  with pytest.raises(ValueError, match="unknown option 'nope'"):
    ablation.variant("rms+nope")
  monkeypatch.setitem(ablation.OPTIONS, "l2", ablation.Variant("l2", {"norm": "l2"}))
  with pytest.raises(ValueError, match="twice"):
    ablation.variant("rms+l2")
  monkeypatch.setitem(ablation.OPTIONS, "future", ablation.Variant("future", {"no_such": 1}))
  with pytest.raises(ValueError, match="'no_such', which the installed aptsjax"):
    ablation.check_available(ablation.variant("future"))
  with pytest.raises(SystemExit):
    ablation.parse_args(["--variants", "future"])
