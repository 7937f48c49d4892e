"""Timing helpers of the benchmarks: compile, time a jitted call, memory statistics, CSV."""

from __future__ import annotations

import csv
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

Row = dict[str, Any]
MEMORY_KEYS = ("argument", "output", "alias", "temp", "peak", "xla_peak")


def memory_stats(compiled: Any) -> dict[str, float | None]:
  """Sizes in MiB from `compiled.memory_analysis()` (None where unavailable).

  ``peak`` = argument + output + temp - alias: every buffer the executable holds, live at once
  (an upper bound). ``xla_peak`` is XLA's own ``peak_memory_in_bytes``; on CPU it leaves temps
  out (it equals argument + output), so it is kept in the CSV only.
  """
  try:
    ma = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (backends may not implement it)
    ma = None
  out = {name: getattr(ma, f"{name}_size_in_bytes", None)
         for name in ("argument", "output", "alias", "temp")}
  out["xla_peak"] = getattr(ma, "peak_memory_in_bytes", None)
  parts = [out[k] for k in ("argument", "output", "temp", "alias")]
  out["peak"] = None if None in parts else parts[0] + parts[1] + parts[2] - parts[3]
  return {k: (None if v is None else v / 2**20) for k, v in out.items()}


def compile_jitted(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[Any, float]:
  """Returns ``(compiled, seconds)``: ``jax.jit(fn).lower(*args).compile()`` and its wall time."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def time_compiled(compiled: Any, args: Sequence[Any], budget_s: float,
                  max_repeats: int) -> tuple[Row, Any]:
  """Times a compiled executable (median of repeats after one warm-up call).

  Args:
    compiled: the executable (``jax.jit(fn).lower(...).compile()``).
    args: its arguments.
    budget_s: rough time budget for the timed repeats.
    max_repeats: the most repeats; at least 3 are always run.

  Returns:
    A dict with ``ms`` (median), ``first_s`` (the warm-up call) and ``repeats``, and the output
    of the last call.
  """
  start = time.perf_counter()
  out = jax.block_until_ready(compiled(*args))
  warm = time.perf_counter() - start
  repeats = int(min(max_repeats, max(3, budget_s / max(warm, 1e-6))))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return {"ms": 1e3 * statistics.median(times), "first_s": warm, "repeats": repeats}, out


def time_jitted(fn: Callable[..., Any], args: Sequence[Any], budget_s: float,
                max_repeats: int) -> tuple[Row, Any]:
  """Compiles ``fn`` for ``args`` and times it (median of repeats, warm-up excluded).

  Args:
    fn: the function to jit.
    args: its arguments.
    budget_s: rough time budget for the timed repeats.
    max_repeats: the most repeats; at least 3 are always run.

  Returns:
    A dict with ``ms`` (median), ``compile_s``, ``first_s``, ``repeats`` and the memory
    statistics (MiB), and the output of the last call.
  """
  compiled, compile_s = compile_jitted(fn, args)
  timing, out = time_compiled(compiled, args, budget_s, max_repeats)
  return {**timing, "compile_s": compile_s, **memory_stats(compiled)}, out


def write_csv(rows: list[Row], path: Path) -> None:
  """Writes rows (dicts with the same keys) as CSV."""
  with path.open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
