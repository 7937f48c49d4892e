"""Smoke test of benchmarks.cost.core_cost: the quick mode runs end to end at tiny sizes, in a
subprocess started beside the in-process tests (tests/background.py)."""
import math

import pytest

from benchmarks.cost import core_cost
from tests import background
from tests.helpers import quick_job, read_csv

pytestmark = pytest.mark.slow


def positive(rows, keys):
  """Asserts every value of ``keys`` in ``rows`` is a finite positive number."""
  for row in rows:
    for key in keys:
      value = float(row[key])
      assert math.isfinite(value) and value > 0, (key, value, row)


QUICK = quick_job("cost.core_cost", "--quick", "--ns", "1000", "--memories", "3")


def test_quick_mode_writes_every_output():
  """The quick run writes the single-memory, vmapped, profile and compile outputs and the plots."""
  run = background.result(QUICK)
  out, results = run.out, run.record["returned"]
  assert set(results) == {"table", "stacked", "profile", "compile"}

  written = read_csv(out / "core_cost.csv")
  assert len(written) == 1
  timed = ("update_ms", "update_undonated_ms", "solve_ms", "floor_ms", "update_passes",
           "update_undonated_passes", "solve_passes", "update_bytes_passes", "solve_bytes_passes",
           "update_peak_mib", "solve_peak_mib")
  positive(written, timed + ("sum_ms",))
  assert int(written[0]["in_use"]) == 3
  assert written[0]["on_boundary"] == "True"
  positive(read_csv(out / "reference.csv"), ("ms",))

  stacked = read_csv(out / "core_cost_stacked.csv")
  assert [int(r["N"]) for r in stacked] == list(core_cost.QUICK_SUBDOMAINS)
  positive(stacked, timed + ("stored_mib",))
  assert all(r["on_boundary"] == "True" for r in stacked)
  # The donated update reads the pairs twice ([S Y]^T s, [S Y]^T y) and inserts in place; the
  # solve reads them 3 times.
  for row in written + stacked:
    assert (float(row["update_hlo_passes"]), float(row["solve_hlo_passes"])) == (2.0, 3.0), row
    assert row["update_copies_stack"] == "False", row

  pieces = read_csv(out / "apts_profile.csv")
  for order in ("first order", "second order"):
    mine = {r["piece"]: r for r in pieces if r["order"] == order}
    assert "whole trainer step" in mine and "global TR step" in mine, sorted(mine)
    assert any(p.startswith("overhead") for p in mine)
    positive([r for p, r in mine.items() if not p.startswith("overhead")],
             ("ms", "iteration_ms", "grad_evals"))
    summed = sum(float(r["iteration_ms"]) for r in mine.values() if r["in_sum"] == "True")
    overhead = next(float(r["ms"]) for p, r in mine.items() if p.startswith("overhead"))
    assert math.isclose(summed + overhead, float(mine["whole trainer step"]["ms"]), rel_tol=1e-6)
  assert any("L-SR1 update" in r["piece"] for r in pieces if r["order"] == "second order")
  assert not any("L-SR1" in r["piece"] for r in pieces if r["order"] == "first order")

  compiles = read_csv(out / "compile_times.csv")
  names = [r["what"] for r in compiles]
  for part in ("APTS trainer step, first order", "APTS trainer step, second order",
               "trust_region second order", "lsr1.update alone", "obs.solve alone",
               "optax.adam step, profiled", "tiny 2-16-2"):
    assert any(part in n for n in names), (part, names)
  positive(compiles, ("compile_s", "first_s", "ms"))
  for name in ("core_cost.png", "core_cost_apts.png"):
    assert (out / name).stat().st_size > 0
