"""Selection, summary and figures of the APTS ablation (``benchmarks.options.ablation``).

The selection reads validation accuracy and all-reduced bytes only: test accuracy appears in
the tables and figures but never in ``ranking``, ``choose`` or ``overall_choice``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common.output import table_head
from benchmarks.common.style import epoch_axis, plot_method
from benchmarks.paper.paper import curves

Row = dict[str, Any]
Runs = dict[Any, list[Row]]  # seed -> that run's rows in epoch order


def group(rows: list[Row]) -> dict[tuple[str, str], Runs]:
  """Groups rows as (setting, variant) -> seed -> rows, in the order they were run."""
  out: dict[tuple[str, str], Runs] = {}
  for r in rows:
    out.setdefault((r["setting"], r["variant"]), {}).setdefault(r["seed"], []).append(r)
  return out


def final(runs: Runs, key: str) -> np.ndarray:
  """``key`` at each seed's last epoch."""
  return np.asarray([float(seed_rows[-1][key]) for seed_rows in runs.values()])


def ranking(rows: list[Row]) -> dict[str, list[str]]:
  """Per APTS setting, its variants best first.

  Best: the highest final-epoch validation accuracy, mean over seeds; ties (to 1e-9) go to the
  fewer all-reduced bytes (mean over seeds), then to the variant run first (the paper's table
  before its changes). Test accuracy is not read.
  """
  scores: dict[str, list[tuple[float, float, int, str]]] = {}
  for order, ((setting, name), runs) in enumerate(
      group([r for r in rows if r["kind"] == "apts"]).items()):
    val = round(float(final(runs, "val_acc").mean()), 9)
    scores.setdefault(setting, []).append((-val, float(final(runs, "allreduce_bytes").mean()),
                                           order, name))
  return {setting: [name for *_, name in sorted(s)] for setting, s in scores.items()}


def choose(rows: list[Row]) -> dict[str, str]:
  """The chosen variant per APTS setting (the first of ``ranking``)."""
  return {setting: names[0] for setting, names in ranking(rows).items()}


def overall_choice(rows: list[Row]) -> tuple[str, float] | None:
  """The variant with the best mean rank (1 = best) over the settings, and that mean rank.

  Only variants run in every setting compete; ties go to the higher mean validation accuracy,
  then to the variant run first. None when no variant ran in every setting.
  """
  ranks = ranking(rows)
  common = set.intersection(*(set(names) for names in ranks.values())) if ranks else set()
  if not common:
    return None
  runs = group(rows)
  mean_val = lambda name: np.mean([final(runs[s, name], "val_acc").mean() for s in ranks])
  mean_rank = {name: float(np.mean([names.index(name) + 1 for names in ranks.values()]))
               for name in common}
  order = list(dict.fromkeys(name for _, name in runs))
  best = min(common, key=lambda name: (mean_rank[name], -mean_val(name), order.index(name)))
  return best, mean_rank[best]


def to_target(runs: Runs, target: float) -> tuple[int, float, float]:
  """Seeds whose test accuracy reaches ``target`` (%), and their mean epochs and bytes to it."""
  epochs, spent = [], []
  for seed_rows in runs.values():
    hit = next((r for r in seed_rows if 100 * float(r["test_acc"]) >= target - 1e-9), None)
    if hit is not None:
      epochs.append(int(hit["epoch"]))
      spent.append(float(hit["allreduce_bytes"]))
  if not epochs:
    return 0, float("nan"), float("nan")
  return len(epochs), float(np.mean(epochs)), float(np.mean(spent))


def human_bytes(x: float) -> str:
  """``x`` bytes as "512 B", "3.21 MB", "1.07 GB"; "-" for NaN."""
  if not np.isfinite(x):
    return "-"
  units = ("B", "kB", "MB", "GB", "TB")
  power = min(len(units) - 1, int(np.log10(max(abs(x), 1.0)) // 3))
  value = x / 1000.0 ** power
  return f"{value:.0f} B" if power == 0 else f"{value:.3g} {units[power]}"


def _num(x: float, fmt: str) -> str:
  return "-" if not np.isfinite(x) else format(x, fmt)


COLUMNS = ("variant", "val acc (%)", "test acc (%)", "best test (%)", "train loss",
           "local steps/iter", "APTS accepted", "final radius", "passes/row", "wall (s)",
           "epochs to {t}%", "bytes to {t}%")


def table_row(name: str, runs: Runs, target: float, chosen: bool = False) -> str:
  """One Markdown row: means over seeds (the reaching seeds for the target columns)."""
  mean = lambda key: float(final(runs, key).mean())
  val = 100 * final(runs, "val_acc")
  best = 100 * curves(runs, "test_acc").max(axis=1).mean()
  reached, epochs, spent = to_target(runs, target)
  count = f"{reached}/{len(runs)} reached"
  label = f"**{name}** (chosen)" if chosen else name
  return (f"| {label} | {val.mean():.2f} ± {val.std():.2f} | {100 * mean('test_acc'):.2f} | "
          f"{best:.2f} | {mean('train_loss'):.4f} | {_num(mean('local_steps'), '.2f')} | "
          f"{_num(mean('apts_accept_rate'), '.2f')} | {_num(mean('radius_final'), '.3g')} | "
          f"{mean('passes_per_row'):.1f} | {mean('wall_s'):.1f} | "
          f"{_num(epochs, '.1f')} ({count}) | {human_bytes(spent)} |")


def summarize(rows: list[Row], target: float, seconds: float, header: str) -> str:
  """The Markdown summary: one table per setting, the choices, then Adam and SGD."""
  groups, chosen, ranks = group(rows), choose(rows), ranking(rows)
  head = table_head([c.format(t=target) for c in COLUMNS])
  lines = [f"## APTS ablation on {header}", "",
           "Selection on the validation split only (final-epoch validation accuracy, mean over "
           "seeds; ties: fewer all-reduced bytes, then the variant run first). Test accuracy is "
           "reported, never used to "
           f"choose. Target columns: mean over the seeds whose test accuracy reaches {target}%. "
           "Radius: the global Delta after the last iteration (with norm=\"rms\" it bounds "
           "|D s|, not |s|).",
           ""]
  for setting, names in ranks.items():
    lines += [f"### {setting}", "", *head]
    lines += [table_row(n, groups[setting, n], target, n == chosen[setting])
              for n in dict.fromkeys(n for s, n in groups if s == setting)]
    lines.append("")
  lines += ["### Chosen (validation accuracy only)", ""]
  lines += [f"- {s}: **{n}**" for s, n in chosen.items()]
  overall = overall_choice(rows)
  lines.append("- overall: " + ("no variant ran in every setting" if overall is None else
                                f"**{overall[0]}** (mean validation rank {overall[1]:.2f} over "
                                f"{len(ranks)} setting(s))"))
  reference = [(s, n) for (s, n), runs in groups.items()
               if next(iter(runs.values()))[0]["kind"] != "apts"]
  if reference:
    lines += ["", "### Reference: Adam and SGD (minibatches)", "", *head]
    lines += [table_row(f"{s} {n}", groups[s, n], target) for s, n in reference]
  lines += ["", f"Total run time {seconds:.0f} s (compilation and evaluation included)."]
  return "\n".join(lines)


def _panels(settings: list[str]) -> tuple[Any, Any]:
  """A figure with one panel per setting (at most 3 per row)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cols = min(3, len(settings))
  nrows = -(-len(settings) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
  for ax in axes.ravel()[len(settings):]:
    ax.set_visible(False)
  return fig, axes.ravel()


def plot(rows: list[Row], out: Path) -> list[Path]:
  """``val_accuracy.png`` (Adam and SGD dashed) and ``radius.png`` (the global radius, mean
  over each epoch's iterations; with norm="rms" it bounds |D s|, not |s|): means over seeds,
  one line per variant, one panel per setting, the chosen variant drawn thicker; each variant
  and method in its own colour and marker (``benchmarks.common.style``). Returns the paths."""
  import matplotlib.pyplot as plt
  groups, chosen = group(rows), choose(rows)
  settings = list(chosen)
  if not settings:
    return []
  names = list(dict.fromkeys(n for s, n in groups if s in chosen))
  reference = [(s, n) for s, n in groups if s not in chosen]
  paths = []
  for key, scale, ylabel, fname in (("val_acc", 100.0, "validation accuracy (%)",
                                     "val_accuracy.png"),
                                    ("radius_mean", 1.0, "global radius (epoch mean)",
                                     "radius.png")):
    fig, axes = _panels(settings)
    for ax, setting in zip(axes, settings):
      for name in names:
        if (setting, name) in groups:
          values = scale * curves(groups[setting, name], key).mean(axis=0)
          plot_method(ax, np.arange(1, len(values) + 1), values, name,
                      lw=2.5 if name == chosen[setting] else 1.2, ms=4, fillstyle="none")
      for s, n in (reference if key == "val_acc" else ()):
        values = scale * curves(groups[s, n], key).mean(axis=0)
        plot_method(ax, np.arange(1, len(values) + 1), values, s, label=f"{s} {n}", lw=1.2,
                    ms=4)
      ax.set_title(setting)
      epoch_axis(ax)
      ax.set_ylabel(ylabel)
      if key == "radius_mean":
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / fname, dpi=110)
    plt.close(fig)
    paths.append(out / fname)
  return paths
