"""Timing helpers of the cost benchmarks: compile, time a jitted call, memory statistics.

``time_donated`` times a state update as it runs in use: jitted with the state donated, each
call fed the previous call's output, so that XLA can update the state's buffers in place.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from benchmarks.common.output import Row

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


def compile_jitted(fn: Callable[..., Any], args: Sequence[Any],
                   donate_argnums: tuple[int, ...] = (),
                   compiler_options: dict[str, Any] | None = None) -> tuple[Any, float]:
  """Returns ``(compiled, seconds)``: ``jax.jit(fn).lower(*args).compile()`` and its wall time.

  ``donate_argnums`` and ``compiler_options`` are passed to ``jax.jit``: with donation the
  compiled call consumes those arguments.
  """
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate_argnums,
                     compiler_options=compiler_options).lower(*args).compile()
  return compiled, time.perf_counter() - start


def bytes_accessed(compiled: Any) -> float | None:
  """XLA's estimate of the bytes an executable reads and writes (``cost_analysis()``), or None.

  It counts every operand and result of the compiled program's operations; note that XLA's CPU
  cost model counts a fused in-place scatter as a full read and a full write of its operand.
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (backends may not implement it)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  value = None if cost is None else cost.get("bytes accessed")
  return None if value is None else float(value)


def _repeat(call: Callable[[], Any], budget_s: float, max_repeats: int) -> tuple[Row, Any]:
  """Median time of ``call()`` over repeats after one warm-up call (see ``time_compiled``)."""
  start = time.perf_counter()
  out = jax.block_until_ready(call())
  warm = time.perf_counter() - start
  repeats = int(min(max_repeats, max(3, budget_s / max(warm, 1e-6))))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return {"ms": 1e3 * statistics.median(times), "first_s": warm, "repeats": repeats}, out


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
  return _repeat(lambda: compiled(*args), budget_s, max_repeats)


def time_jitted(fn: Callable[..., Any], args: Sequence[Any], budget_s: float,
                max_repeats: int, compiler_options: dict[str, Any] | None = None
                ) -> tuple[Row, Any]:
  """Compiles ``fn`` for ``args`` and times it (median of repeats, warm-up excluded).

  Args:
    fn: the function to jit.
    args: its arguments.
    budget_s: rough time budget for the timed repeats.
    max_repeats: the most repeats; at least 3 are always run.
    compiler_options: passed to ``jax.jit``.

  Returns:
    A dict with ``ms`` (median), ``compile_s``, ``first_s``, ``repeats`` and the memory
    statistics (MiB), and the output of the last call.
  """
  compiled, compile_s = compile_jitted(fn, args, compiler_options=compiler_options)
  timing, out = time_compiled(compiled, args, budget_s, max_repeats)
  return {**timing, "compile_s": compile_s, **memory_stats(compiled)}, out


def time_donated(fn: Callable[..., Any], args: Sequence[Any], budget_s: float,
                 max_repeats: int, compiler_options: dict[str, Any] | None = None
                 ) -> tuple[Row, Any, Any]:
  """Times ``state = fn(state, *rest)`` jitted with ``state`` donated, as a loop carries it.

  Each call consumes the previous call's output, so XLA may write the result into the donated
  buffers (an in-place ring insert instead of a copy of the whole state). ``args[0]`` is
  consumed: the caller must not use it afterwards.

  Args:
    fn: a function whose output has the structure, shapes and dtypes of its first argument.
    args: ``(state, *rest)``.
    budget_s: rough time budget for the timed repeats.
    max_repeats: the most repeats; at least 3 are always run.

  Returns:
    ``(row, compiled, state)``: the dict of ``time_jitted`` (its memory statistics count the
    donated buffers as aliased), the executable, and the state after the last call.
  """
  compiled, compile_s = compile_jitted(fn, args, donate_argnums=(0,),
                                       compiler_options=compiler_options)
  carried = [args[0]]

  def call() -> Any:
    carried[0] = compiled(carried[0], *args[1:])
    return carried[0]

  timing, out = _repeat(call, budget_s, max_repeats)
  return {**timing, "compile_s": compile_s, **memory_stats(compiled)}, compiled, out
