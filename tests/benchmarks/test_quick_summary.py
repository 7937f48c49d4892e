"""The paper benchmark's ``--quick`` summary says what a 3-epoch run can say: no table of
non-results, the target left to the full run, and a one-line verdict computed from the numbers.
The full run's summary keeps its target verdict and equal-work table. No training: the summary
writer runs on fabricated rows (tests/benchmarks/rows.py)."""
from benchmarks.paper import paper
from tests.benchmarks.rows import QUICK, fabricate


def cheap_sapts() -> dict[str, tuple]:
  """The quick table with SAPTS N=2 o1 cheaper per epoch than Adam (0.9 passes, 0.05 s)."""
  table = dict(QUICK)
  table["SAPTS N=2 o1"] = (*QUICK["SAPTS N=2 o1"][:4], 0.9, 0.05, *QUICK["SAPTS N=2 o1"][6:])
  return table


def test_quick_summary_has_no_table_of_non_results_and_ends_with_a_verdict():
  text = paper.summarize(fabricate(), paper.parse_args(["--quick"]), 30.0)
  assert "not reached" not in text
  assert "meet the target" not in text and "MISSES" not in text
  assert "Equal work: not defined for this run" in text
  assert "30 epochs, 3 trials" in text  # what the full run measures
  assert "APTS N=2 o1, TR o2 run full batch" in text
  last = text.splitlines()[-1]
  assert last.startswith("Verdict (3 epochs, 1 trial(s), 2,000 rows: says little")
  assert "Adam had the best test accuracy (89.40%)" in last
  assert "SAPTS N=2 o1 the lowest train loss (0.1300)" in last
  assert "the best APTS/SAPTS run is SAPTS N=2 o1 at 89.00% (-0.40 points vs Adam)" in last


def test_quick_summary_keeps_the_equal_work_table_where_it_is_defined():
  """Adam's budget covers some APTS/SAPTS epochs: the table is printed, its empty cells named."""
  text = paper.summarize(fabricate(cheap_sapts()), paper.parse_args(["--quick"]), 30.0)
  assert "| SAPTS N=2 o1 | 89.00% (epoch 3) | 89.00% (epoch 3) |" in text
  assert "| APTS N=2 o1 | not reached (epoch 1 costs more) |" in text
  assert "Equal work: not defined" not in text
  assert text.splitlines()[-1].startswith("Verdict (")


def test_full_run_summary_keeps_the_target_verdict_and_equal_work_table():
  text = paper.summarize(fabricate(cheap_sapts()), paper.parse_args([]), 30.0)
  assert "1 of 3 APTS/SAPTS configurations meet the target." in text
  assert "- SAPTS N=2 o1: 89.00% MEETS the target (-0.40 points vs Adam)" in text
  assert "At equal work (APTS/SAPTS mean test accuracy" in text
  assert "| APTS N=2 o1 | not reached (epoch 1 costs more) |" in text
  assert "Quick run" not in text and text.splitlines()[-1].startswith("Total run time")
