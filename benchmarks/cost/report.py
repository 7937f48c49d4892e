"""Markdown tables, verdicts and the figure of `benchmarks.cost.core_cost`.

Pass columns (see `benchmarks.cost.core_cost`): ``passes`` is a time in units of the floor (one read
of the stored pairs); ``HLO passes`` counts the full reads and writes of the stacks in the
optimized HLO (`aptsjax.tools.traffic`); ``XLA bytes passes`` is XLA's ``bytes accessed``
over the stored bytes (every operand, n-vectors included). The update is timed donated; the
``not donated`` column lets XLA copy both stacks on each call.
"""

from __future__ import annotations

from pathlib import Path

import jax

from benchmarks.common import output
from benchmarks.common.output import Row, table_head


def fmt(x: float | None, digits: int = 2) -> str:
  """Formats a number for a Markdown table ('n/a' for None) with ``digits`` decimals."""
  return output.fmt(x, f".{digits}f")


def _pair(r: Row, key: str, digits: int = 1) -> str:
  return f"{fmt(r[f'update_{key}'], digits)}/{fmt(r[f'solve_{key}'], digits)}"


def _table(head: list[str], lines: list[str]) -> list[str]:
  """A Markdown table from its headers and its row lines."""
  return table_head(head) + lines


def markdown(rows: list[Row], refs: list[Row]) -> str:
  """The single-memory results as Markdown tables (cost per configuration, then references)."""
  head = (["n", "k", "update ms", "update ms, not donated", "solve ms", "sum ms", "floor ms",
           "update passes", "solve passes", "sum passes", "HLO passes (upd/solve)",
           "XLA bytes passes (upd/solve)"]
          + [f"solve % {r['model'].split()[0]} {r['samples']}" for r in refs]
          + ["update peak MiB", "solve peak MiB", "solve temp MiB", "compile s (upd/solve)"])
  lines = []
  for r in rows:
    pct = " | ".join(fmt(100 * r["solve_ms"] / ref["ms"], 1) for ref in refs)
    lines.append(
        f"| {r['n']:,} | {r['memory']} | {fmt(r['update_ms'])} | "
        f"{fmt(r['update_undonated_ms'])} | {fmt(r['solve_ms'])} | {fmt(r['sum_ms'])} | "
        f"{fmt(r['floor_ms'], 3)} | {fmt(r['update_passes'], 1)} | "
        f"{fmt(r['solve_passes'], 1)} | {fmt(r['sum_passes'], 1)} | {_pair(r, 'hlo_passes')} | "
        f"{_pair(r, 'bytes_passes')} | {pct} | {fmt(r['update_peak_mib'], 1)} | "
        f"{fmt(r['solve_peak_mib'], 1)} | {fmt(r['solve_temp_mib'], 1)} | "
        f"{_pair(r, 'compile_s')} |")
  out = _table(head, lines) + [""]
  out += _table(["reference fwd+bwd", "n", "samples", "ms", "peak MiB"], [
      f"| {r['model']} | {r['n']:,} | {r['samples']:,} | {fmt(r['ms'])} | "
      f"{fmt(r['peak_mib'], 1)} |" for r in refs])
  return "\n".join(out)


def markdown_stacked(rows: list[Row]) -> str:
  """The vmapped (N stacked memories) measurements as a Markdown table."""
  head = ["N", "n", "k", "stored MiB", "update ms", "update ms, not donated", "solve ms",
          "floor ms", "update passes", "update passes, not donated", "solve passes",
          "HLO passes (upd/solve)", "XLA bytes passes (upd/solve)", "update copies stack",
          "update peak MiB", "solve peak MiB", "compile s (upd/solve)"]
  return "\n".join(_table(head, [
      f"| {r['N']} | {r['n']:,} | {r['memory']} | {r['stored_mib']:.0f} | "
      f"{fmt(r['update_ms'])} | {fmt(r['update_undonated_ms'])} | {fmt(r['solve_ms'])} | "
      f"{fmt(r['floor_ms'], 3)} | {fmt(r['update_passes'], 1)} | "
      f"{fmt(r['update_undonated_passes'], 1)} | {fmt(r['solve_passes'], 1)} | "
      f"{_pair(r, 'hlo_passes')} | {_pair(r, 'bytes_passes')} | {r['update_copies_stack']} | "
      f"{fmt(r['update_peak_mib'], 0)} | {fmt(r['solve_peak_mib'], 0)} | "
      f"{_pair(r, 'compile_s')} |" for r in rows]))


def markdown_breakdown(parts: list[tuple[str, float]], n: int, memory: int) -> str:
  """The pieces of update and solve, in ms and in units of the last piece (the floor)."""
  return (f"Where the time goes at n={n:,}, k={memory} (passes: of the last line):\n"
          + "\n".join(_table(["piece", "ms", "passes"], [
              f"| {p} | {ms:.2f} | {ms / parts[-1][1]:.1f} |" for p, ms in parts])))


def _ok(condition: bool) -> str:
  return "MET" if condition else "MISSED"


def verdict(rows: list[Row], refs: list[Row], target: tuple[int, int]) -> str:
  """The targets at (n, k) = ``target``, against the measured floor and references."""
  hits = [r for r in rows if (r["n"], r["memory"]) == target]
  if not hits:
    return f"Verdict: target configuration n={target[0]:,}, k={target[1]} not measured."
  r = hits[0]
  lines = [f"Verdict at n = {r['n']:,}, memory = {r['memory']} (float32, jitted):",
           f"- obs.solve = {r['solve_ms']:.2f} ms = {r['solve_passes']:.1f} memory passes "
           f"(floor {r['floor_ms']:.3f} ms): <= 10 passes (target) "
           f"{_ok(r['solve_passes'] <= 10)}; <= 5 passes (stretch) "
           f"{_ok(r['solve_passes'] <= 5)}."]
  for ref in refs:
    if ref["samples"] >= 10_000:
      pct = 100 * r["solve_ms"] / ref["ms"]
      lines.append(f"- obs.solve = {pct:.1f}% of {ref['model']} fwd+bwd on {ref['samples']:,} "
                   f"samples ({ref['ms']:.1f} ms): < 10% {_ok(pct < 10)}.")
  lines.append(f"- update (donated) + solve = {r['sum_ms']:.2f} ms ({r['sum_passes']:.1f} "
               "passes).")
  return "\n".join(lines)


def verdict_stacked(rows: list[Row], max_passes: float = 3.0) -> str:
  """update and solve <= ``max_passes`` over the N stacks (HLO count; time in parentheses)."""
  lines = [f"Passes over the stored pairs, <= {max_passes:g} each (HLO count; time-based in "
           "parentheses):"]
  for r in rows:
    met = r["update_hlo_passes"] <= max_passes and r["solve_hlo_passes"] <= max_passes
    lines.append(
        f"- N={r['N']}, n={r['n']:,}, k={r['memory']}: update {r['update_hlo_passes']:g} "
        f"({r['update_passes']:.1f}), solve {r['solve_hlo_passes']:g} "
        f"({r['solve_passes']:.1f}), update copies a stack: {r['update_copies_stack']}: "
        f"{_ok(met and not r['update_copies_stack'])}.")
  return "\n".join(lines)


def plot(rows: list[Row], refs: list[Row], path: Path) -> None:
  """Log-log time vs n per memory: solve (solid), update donated (dashed), floor (dotted)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(8, 5.5))
  for i, k in enumerate(sorted({r["memory"] for r in rows})):
    sel = sorted((r for r in rows if r["memory"] == k), key=lambda r: r["n"])
    ns, color = [r["n"] for r in sel], f"C{i}"
    ax.plot(ns, [r["solve_ms"] for r in sel], "o-", color=color, label=f"obs.solve, k={k}")
    ax.plot(ns, [r["update_ms"] for r in sel], "s--", color=color, alpha=0.6,
            label=f"lsr1.update (donated), k={k}")
    ax.plot(ns, [r["floor_ms"] for r in sel], ":", color=color, label=f"1 pass floor, k={k}")
  for j, ref in enumerate(refs):
    ax.axhline(ref["ms"], color="0.5", lw=0.8, ls=("-", "--", "-.")[j % 3],
               label=f"{ref['model']} fwd+bwd, {ref['samples']:,} samples")
  ax.set(xscale="log", yscale="log", xlabel="n (parameters)", ylabel="time (ms, median)",
         title=f"L-SR1 update / OBS solve cost, float32, {jax.devices()[0].platform}")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
