"""Smoke test of benchmarks.communication.mesh: the quick mode runs on the 4 test devices end to end, in a
subprocess started beside the in-process tests (tests/background.py)."""
import jax
import pytest

from benchmarks.communication import mesh
from tests import background
from tests.helpers import quick_job, read_csv

pytestmark = pytest.mark.slow


QUICK = quick_job("communication.mesh", "--quick")


def test_quick_mode_memory_falls_with_m_and_counts_per_axis():
  run = background.result(QUICK)
  out, tables = run.out, run.record["returned"]
  # The tests' device count is kept (no 8-device override), here and in the run.
  assert len(jax.devices()) == 4 and run.record["devices"] == 4
  assert all(r["D"] * r["M"] <= 4 for r in tables["memory"] + tables["collectives"])

  memory = read_csv(out / "memory.csv")
  by_m = {int(r["M"]): float(r["ratio"]) for r in memory if r["variant"] != "replicated"
          or r["M"] == "1"}
  assert by_m[1] == 1.0 and by_m[4] < by_m[2] < 1.0, by_m
  assert by_m[2] < 0.6 and by_m[4] < 0.35, by_m   # about 1/M plus the replicated head

  rows = {int(r["M"]): r for r in read_csv(out / "collectives.csv")}
  assert set(rows) == {1, 2}
  for r in rows.values():   # the data axis carries 4 n/M (+ a few scalars) per replica
    assert 4.0 <= float(r["data_per_n"]) < 4.01, r
    assert int(r["data_in_local_loop"]) == 0
  tp = rows[2]
  # The model's collectives: one evaluation per local step, three outside the local loop
  # (g^k and the two trial evaluations of the global phase); the optimizer's are scalars.
  assert float(tp["evals_local"]) == 1.0 and float(tp["evals_iter"]) == 3.0, tp
  assert 0 < int(tp["opt_max_part"]) <= 16 * mesh.MEMORY ** 2
  assert int(tp["large_from_library"]) == 0

  latency = read_csv(out / "latency.csv")
  assert all(float(r["total_ms_10G"]) > 0 for r in latency)
  assert (out / "flagged.csv").is_file()
  assert (out / "memory_vs_M.png").stat().st_size > 0
