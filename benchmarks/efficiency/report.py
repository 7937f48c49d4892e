"""Tables, CSV files, the latency-bandwidth model and the figure of the efficiency benchmark.

Summary per method and W, over the seeds: the best test metric (mean +- std), and, over the seeds
that reached the target, the exchanges and bytes (float32, per device) to the target; the bytes
ratio is the method's mean bytes over DDP-Adam's at the same W.

Modelled time to target (``latency_table``) for 8 and 64 workers at 10 and 100 Gb/s:
exchanges to target x (ring all-reduce time of one exchange + compute per exchange), with the
exchanges to target and the compute per exchange (one worker, measured here) of the largest
measured W not above the modelled one: only the ring factor 2 (W - 1) / W changes with W.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common.output import Row, log, markdown_table, write_csv
from benchmarks.common.style import plot_method
from benchmarks.communication.communication import ALPHA_S, allreduce_seconds
from benchmarks.efficiency import train
from benchmarks.efficiency.methods import APTS, DDP_ADAM, DILOCO
from benchmarks.efficiency.task import Task

CONFIG_KEYS = ("lr", "inner_lr", "H", "outer_lr")
MODEL_WORKERS = (8, 64)
GBPS = (10, 100)
STYLE = {DDP_ADAM: "Adam", DILOCO: "DiLoCo"}   # benchmarks.common.style names; APTS: by W


def flat(config: Row) -> Row:
  """A method's settings under every settings key (None where it has none)."""
  return {k: config.get(k) for k in CONFIG_KEYS}


def rectangular(rows: Sequence[Row]) -> list[Row]:
  """Rows with the union of their keys (first-seen order), None where a row lacks one."""
  keys = list(dict.fromkeys(k for r in rows for k in r))
  return [{k: r.get(k) for k in keys} for r in rows]


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
  """Mean and sample std (0 for one value); (None, None) for none."""
  if not values:
    return None, None
  return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def runs_of(rows: Sequence[Row], name: str, workers: int, config: Row) -> list[list[Row]]:
  """The runs (rows per seed, in exchange order) of one configured method at one W."""
  label = f"{name} {train.settings(config)}"
  sel = [r for r in rows if r["config"] == label and r["W"] == workers]
  return [[r for r in sel if r["seed"] == s] for s in dict.fromkeys(r["seed"] for r in sel)]


def summarize(task: Task, name: str, workers: int, config: Row, runs: list[list[Row]],
              target: float) -> Row:
  """One summary row: the best metric and the cost to target over the seeds."""
  scores = [train.score(r, task, target) for r in runs]
  hits = [s for s in scores if s["exchanges"] is not None]
  best, best_sd = mean_std([s["best"] for s in scores])
  exchanges, exchanges_sd = mean_std([s["exchanges"] for s in hits])
  nbytes, bytes_sd = mean_std([s["bytes"] for s in hits])
  return {"method": name, "W": workers, **flat(config), "settings": train.settings(config),
          "seeds": len(runs), "best": best, "best_sd": best_sd, "target": target,
          "reached": f"{len(hits)}/{len(runs)}",
          "exchanges": exchanges, "exchanges_sd": exchanges_sd, "bytes": nbytes,
          "bytes_sd": bytes_sd, "epoch": mean_std([s["epoch"] for s in hits])[0],
          "mb": None if nbytes is None else nbytes / 1e6,
          "mb_sd": None if bytes_sd is None else bytes_sd / 1e6}


def with_ratios(rows: list[Row], reference: Sequence[Row]) -> list[Row]:
  """Adds each row's mean bytes to target over DDP-Adam's (in ``reference``) at the same W."""
  ref = {r["W"]: r["bytes"] for r in reference if r["method"] == DDP_ADAM}
  for r in rows:
    r["bytes_ratio"] = (r["bytes"] / ref[r["W"]] if r["bytes"] is not None
                        and ref.get(r["W"]) else None)
  return rows


def latency_table(summary: Sequence[Row], counts: Sequence[Row],
                  compute: dict[tuple[str, int], float]) -> list[Row]:
  """Modelled time to target per method, modelled W and bandwidth, and the ratio to DDP-Adam.

  Args:
    summary: the summary rows of the chosen configurations.
    counts: ``programs.exchange_stats`` rows (calls and floats per exchange).
    compute: measured compute seconds per exchange of one worker, by (method, measured W).

  Returns:
    One row per (modelled W, method).
  """
  measured = sorted({r["W"] for r in summary})
  out = []
  for model_w in MODEL_WORKERS:
    source = max([w for w in measured if w <= model_w] or measured[:1])
    for r in (s for s in summary if s["W"] == source):
      hlo = next(c for c in counts if c["method"] == r["method"] and c["W"] == source
                 and c["H"] == (r["H"] or 1))
      row = {"model_W": model_w, "measured_W": source, "method": r["method"], "H": r["H"],
             "exchanges": r["exchanges"], "calls": hlo["calls_per_iter"],
             "floats": hlo["floats_per_iter"], "compute_ms": 1e3 * compute[r["method"], source]}
      for g in GBPS:
        comm = allreduce_seconds(hlo["calls_per_iter"], hlo["floats_per_iter"], model_w, g)
        row[f"comm_ms_{g}G"] = 1e3 * comm
        row[f"time_s_{g}G"] = (None if r["exchanges"] is None
                               else r["exchanges"] * (comm + compute[r["method"], source]))
      out.append(row)
  for r in out:
    ref = next(x for x in out if x["model_W"] == r["model_W"] and x["method"] == DDP_ADAM)
    for g in GBPS:
      t, t_ref = r[f"time_s_{g}G"], ref[f"time_s_{g}G"]
      r[f"ratio_{g}G"] = None if t is None or not t_ref else t / t_ref
  return out


def style_name(name: str, workers: int) -> str:
  """The ``benchmarks.common.style`` name of a method (APTS on minibatches: "SAPTS N=W o1")."""
  return STYLE.get(name, f"SAPTS N={workers} o1")


def mean_curve(runs: list[list[Row]], key: str, metric: str) -> tuple[list[float], list[float]]:
  """The seeds' mean metric at each exchange the seeds share, against ``key``."""
  length = min(len(r) for r in runs)
  xs = [runs[0][k][key] for k in range(length)]
  return xs, [statistics.mean(r[k][metric] for r in runs) for k in range(length)]


def plot(rows: Sequence[Row], chosen: dict[int, dict[str, Row]], targets: dict[int, float], task: Task,
         path: Path) -> None:
  """Test metric vs all-reduced bytes and vs exchanges (log x), one column per W, the mean over
  seeds of each method's chosen configuration."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  workers = sorted(targets)
  fig, axes = plt.subplots(2, len(workers), figsize=(4.5 * len(workers), 7.5), squeeze=False)
  scale = 100.0 if task.metric == "accuracy" else 1.0
  for col, w in enumerate(workers):
    for row, key in enumerate(("bytes", "exchange")):
      ax = axes[row][col]
      for name, config in chosen[w].items():
        runs = runs_of(rows, name, w, config)
        if runs and all(runs):
          xs, ys = mean_curve(runs, key, task.metric)
          label = f"{name} H={config['H']}" if "H" in config else name
          plot_method(ax, xs, [scale * y for y in ys], style_name(name, w), label=label, ms=3)
      ax.axhline(scale * targets[w], color="k", lw=0.8, ls=":", label="target")
      ax.set(xscale="log", xlabel="all-reduced bytes per device" if key == "bytes"
             else "exchanges", ylabel=f"test {task.metric}" + (" (%)" if scale > 1 else ""),
             title=f"{task.name}, W={w}")
      ax.grid(True, which="both", alpha=0.3)
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


UNSET = {**{k: "-" for k in CONFIG_KEYS}, "exchanges_to_val_target": "not reached"}
NOT_REACHED = {"exchanges": "not reached", "mb": "not reached", "bytes_ratio": "n/a"}
SUMMARY_COLS = (("method", "method", ""), ("W", "W", ""), ("settings", "settings", ""),
                ("best test", "best", ".4f"), ("+-", "best_sd", ".4f"),
                ("target", "target", ".4f"), ("reached", "reached", ""),
                ("exchanges to target", "exchanges", ",.1f"), ("+-", "exchanges_sd", ",.1f"),
                ("MB to target", "mb", ",.2f"), ("+-", "mb_sd", ",.2f"),
                ("bytes / DDP-Adam", "bytes_ratio", ".3f"))
SELECTION_COLS = (("method", "method", ""), ("W", "W", ""), ("lr", "lr", ""),
                  ("inner lr", "inner_lr", ""), ("H", "H", ""), ("outer lr", "outer_lr", ""),
                  ("best val", "best_val", ".4f"),
                  ("exchanges to val target", "exchanges_to_val_target", ""),
                  ("chosen", "chosen", ""))
HLO_COLS = (("method", "method", ""), ("W", "W", ""), ("H", "H", ""), ("n", "n", ","),
            ("floats / exchange", "floats_per_iter", ","), ("/ n", "per_n", ".6f"),
            ("by construction", "constructed", ","), ("all-reduces", "calls_per_iter", ""),
            ("in data-dependent loops", "in_local_loop", ""), ("compile s", "compile_s", ".1f"))
LATENCY_COLS = ((("model W", "model_W", ""), ("measured W", "measured_W", ""),
                 ("method", "method", ""), ("exchanges", "exchanges", ",.1f"),
                 ("compute ms / exchange", "compute_ms", ".2f"))
                + tuple((f"comm ms @{g} Gb/s", f"comm_ms_{g}G", ".3f") for g in GBPS)
                + tuple((f"s to target @{g} Gb/s", f"time_s_{g}G", ".2f") for g in GBPS)
                + tuple((f"/ DDP-Adam @{g} Gb/s", f"ratio_{g}G", ".3f") for g in GBPS))


def write(out: Path, task: Task, chosen: dict[int, dict[str, Row]], grid_rows: list[Row],
          val_rows: list[Row], test_rows: list[Row], targets: dict[int, float],
          counts: list[Row], compute: dict[tuple[str, int], float], notes: Sequence[str]
          ) -> list[Row]:
  """Writes the CSV files and the figure, logs the Markdown report; returns the summary rows.

  Args:
    out: the output directory.
    task: the task.
    chosen: the selected settings by W and method.
    grid_rows: the selection grid (one row per configuration).
    val_rows, test_rows: the runs' rows on the validation and test splits.
    targets: the test target by W.
    counts: ``programs.exchange_stats`` rows.
    compute: compute seconds per exchange of one worker, by (method, W).
    notes: lines printed before the tables (the streams' dropped rows).

  Returns:
    The summary rows.
  """
  workers = sorted(targets)
  summary = [summarize(task, name, w, config, runs_of(test_rows, name, w, config), targets[w])
             for w in workers for name, config in chosen[w].items()]
  summary = with_ratios(summary, summary)
  periods = sorted({r["H"] for r in test_rows if r["method"] == APTS})
  by_period = with_ratios([summarize(task, APTS, w, {"H": h},
                                     runs_of(test_rows, APTS, w, {"H": h}), targets[w])
                           for w in workers for h in periods], summary)
  latency = latency_table(summary, counts, compute)
  for name, rows in (("selection", grid_rows), ("selection_runs", val_rows), ("runs", test_rows),
                     ("hlo", counts), ("summary", summary), ("apts_periods", by_period),
                     ("latency", latency)):
    write_csv(rectangular(rows), out / f"{name}.csv")
  plot(test_rows, chosen, targets, task, out / "efficiency.png")
  chosen_text = "; ".join(f"W={w}: " + ", ".join(f"{name} {train.settings(c)}"
                                                 for name, c in chosen[w].items()) for w in workers)
  log("\n".join([
      "", *notes, "", "## Selection on the validation split",
      markdown_table(grid_rows, SELECTION_COLS, UNSET), "", f"Chosen: {chosen_text}.", "",
      "## All-reduced floats per exchange (compiled under shard_map on W devices)",
      markdown_table(counts, HLO_COLS), "",
      f"## Test {task.metric} and communication to target (target per W: DDP-Adam's best "
      f"test {task.metric}, mean over seeds, " + ("- 0.5 points)" if task.higher_is_better
                                                  else "+ 2%)"),
      markdown_table(summary, SUMMARY_COLS, NOT_REACHED), "",
      "## APTS at every exchange period H (test split)",
      markdown_table(by_period, SUMMARY_COLS, NOT_REACHED), "",
      f"## Modelled time to target (ring all-reduce, alpha = {ALPHA_S * 1e6:.0f} us per call; "
      "compute = one worker's exchange measured here, W = 1 on b = B / W rows)",
      markdown_table(latency, LATENCY_COLS, {"exchanges": "not reached"})]))
  return summary
