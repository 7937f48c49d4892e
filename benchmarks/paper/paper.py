"""The paper's experiments (section 3): APTS and SAPTS vs plain TR and tuned Adam and SGD.

Run from the repository root::

    python -m benchmarks.paper                 # MNIST-5k, 30 epochs, 3 trials, every method
    python -m benchmarks.paper --quick         # smoke run: 3 epochs, 1 trial, 6 methods
    python -m benchmarks.paper --full          # the paper's protocol: 100 epochs, 10 trials
    python -m benchmarks.paper --dataset mnist --data-dir ~/data/mnist
    python -m benchmarks.paper --methods "APTS N=2 o2" Adam
    python -m benchmarks.paper --methods "APTS N=2 x layers o1" "APTS N=2 o1" Adam  # param blocks
    python -m benchmarks.paper --preset paper  # the paper's method (aptsjax.APTSConfig.paper())
    python -m aptsjax.parallel.launch --num-processes 2 --devices-per-process 2 -- python -m benchmarks.paper
    srun python -m benchmarks.paper --distributed      # one process per host/GPU under SLURM

Run times measured on a 2-core CPU (x86-64, one device, compilation included): the default run
1,675 s (28 min, before the L-SR1/OBS cost work, which shortens it); ``--quick`` 28 s.
``--full`` was not timed; from the default run's per-epoch times it takes about 4.5 hours. An
overall progress bar shows the estimated time left.

Across processes (started by ``aptsjax.launch``, or by SLURM / Open MPI / a TPU pod with
``--distributed``) the APTS and SAPTS variants run on one mesh over every process's devices, each
process loading only its subdomains' rows; Adam, SGD and TR are single-process baselines and are
left out (run them without the launcher). Only process 0 prints and writes files; the CSV records
the process and device counts.

Protocol (docs/benchmarks.md): Adam and SGD learning rates are
chosen on a validation split (the last 500 training rows held out) over 13 rates log-spaced in
1e-5..1e-1, one seed each, by the final validation accuracy; the chosen rate then runs with every
seed on the whole training set. APTS runs full batch without overlap; SAPTS, Adam and SGD use
minibatches of 1/6 of the training rows rounded down to a multiple of 12 (660 rows on MNIST-5k;
SAPTS with 5% overlap between subdomains and between consecutive minibatches). An epoch is one pass over the training rows. Train loss (plain training set) and
test accuracy are measured after every epoch outside the timed region. Forward and backward
passes are samples processed / training rows (conventions in ``benchmarks.paper.methods``).

Outputs under ``--out``: ``results.csv`` (per method, seed, epoch), ``lr_search.csv``,
``figure_full.png`` and ``figure_minibatch.png`` (loss and accuracy vs epoch, mean and min-max
band over trials, one column per model order) and ``summary.md`` (also printed): the final test
accuracy per method (mean ± std over trials), the verdict against the target (APTS/SAPTS with
default parameters >= tuned Adam - 0.5 points at the same epochs), and APTS/SAPTS accuracy at
Adam's final backward passes and wall time (one line instead of the table where no APTS/SAPTS
epoch fits Adam's budget). ``--quick`` judges no target: its summary says what the full run
measures and ends with a one-line verdict at equal epochs. Each method has one colour and
marker in every figure (``benchmarks.common.style``); progress bars appear only on a terminal.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

import aptsjax
from aptsjax import distributed
from benchmarks.common import datasets, models
from benchmarks.common.output import log, table_head, write_csv
from benchmarks.common.progress import Progress
from benchmarks.common.style import epoch_axis, method_style, plot_method
from benchmarks.paper import methods as pm
from benchmarks.paper.eta import compile_weight, epoch_weight

LRS = tuple(float(x) for x in np.logspace(-5, -1, 13))
QUICK_LRS = {"adam": (1e-3, 1e-2), "sgd": (1e-2, 1e-1)}
QUICK_METHODS = ("APTS N=2 o1", "SAPTS N=2 o1", "SAPTS N=2 o2", "TR o2", "Adam", "SGD")
TARGET_POINTS = 0.5
QUICK_ROWS = 2000
Row = dict[str, Any]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """The command line (see the module docstring)."""
  p = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      epilog="Measured on a 2-core CPU: the default run takes 28 min, --quick 1-2 min "
      "(compilation included); --full about 4.5 h (estimated). The overall progress bar shows "
      "the time left.")
  p.add_argument("--dataset", default="mnist5k", choices=datasets.NAMES)
  p.add_argument("--data-dir", default=None, help="directory of the mnist / cifar10 files")
  p.add_argument("--epochs", type=int, default=30)
  p.add_argument("--trials", type=int, default=3, help="seeds per method")
  p.add_argument("--quick", action="store_true",
                 help="smoke run: 3 epochs, 1 trial, 2,000 rows, 6 methods (1-2 min)")
  p.add_argument("--full", action="store_true",
                 help="the paper's 100 epochs and 10 trials (about 4.5 h)")
  p.add_argument("--out", default="results/paper", help="output directory")
  p.add_argument("--distributed", action="store_true",
                 help="join a multi-process run that JAX detects (SLURM, Open MPI, TPU pods)")
  p.add_argument("--preset", choices=("defaults", "paper"), default="defaults",
                 help="APTS/SAPTS/TR table: the library's defaults, or the paper's method "
                 "exactly (aptsjax.APTSConfig.paper())")
  p.add_argument("--methods", nargs="+", default=None,
                 help='subset by name, e.g. "APTS N=2 o2" "SAPTS N=4 o1" "TR o2" Adam SGD')
  args = p.parse_args(argv)
  if args.quick and args.full:
    p.error("--quick and --full exclude each other")
  if args.full:
    args.epochs, args.trials = 100, 10
  if args.quick:
    args.epochs, args.trials = 3, 1
  return args


def select_methods(args: argparse.Namespace) -> list[pm.Method]:
  """The methods to run: the default set, the quick set, or the ``--methods`` subset."""
  methods = pm.all_methods()
  names = args.methods or (QUICK_METHODS if args.quick else None)
  if names is not None:
    known = {m.name: m for m in methods + pm.extra_methods()}
    unknown = [n for n in names if n not in known]
    if unknown:
      raise SystemExit(f"unknown methods {unknown}; choose from {sorted(known)}")
    methods = [known[n] for n in names]
  procs = jax.process_count()
  if procs == 1:
    return methods
  single = [m.name for m in methods if m.kind != "apts"]
  if args.methods and single:
    raise SystemExit(f"{single} run in a single process only; across {procs} processes choose "
                     "APTS/SAPTS methods")
  split = [m.name for m in methods if m.kind == "apts" and m.num_subdomains % procs]
  if split:
    log(f"[processes] skipping {split}: N is not divisible by the {procs} processes")
  return [m for m in methods if m.kind == "apts" and not m.num_subdomains % procs]


def load_data(args: argparse.Namespace) -> datasets.Dataset:
  """The data set; ``--quick`` keeps the first 2,000 training rows."""
  ds = datasets.load(args.dataset, data_dir=args.data_dir)
  if args.quick:
    ds = ds._replace(x_train=ds.x_train[:QUICK_ROWS], y_train=ds.y_train[:QUICK_ROWS])
  return ds


def planned_seconds(methods: Sequence[pm.Method], args: argparse.Namespace, num_rows: int,
                    num_val_rows: int) -> float:
  """The overall progress bar's total: estimated seconds of the whole run."""
  total = 0.0
  for m in methods:
    total += compile_weight(m) + args.trials * args.epochs * epoch_weight(m, num_rows)
    if m.kind in ("adam", "sgd"):
      lrs = QUICK_LRS[m.kind] if args.quick else LRS
      total += compile_weight(m) + len(lrs) * args.epochs * epoch_weight(m, num_val_rows)
  return total


def train(runner: pm.Runner, evaluate: Any, seed: int, lr: float, epochs: int,
          num_rows: int, label: str, bars: Progress) -> list[Row]:
  """One run: ``epochs`` epochs from seed ``seed``; one row per epoch (cumulative counts)."""
  carry = runner.init(seed, lr)
  totals = np.zeros(5)
  rows, bar = [], bars.run(epochs, label)
  for ep in range(epochs):
    carry, work = runner.epoch(carry, ep, seed)
    totals += np.asarray([work.iterations, work.forward_rows, work.backward_rows,
                          work.allreduce_floats, work.seconds], dtype=float)
    loss, acc = evaluate(carry[0])
    m = runner.method
    rows.append({"method": m.name, "kind": m.kind, "batching": m.batching, "order": m.order,
                 "N": m.num_subdomains, "param_blocks": m.param_blocks or "", "lr": lr,
                 "seed": seed, "epoch": ep + 1,
                 "train_loss": loss, "test_acc": acc, "wall_s": totals[4],
                 "iterations": int(totals[0]), "forward_passes": totals[1] / num_rows,
                 "backward_passes": totals[2] / num_rows, "allreduce_floats": totals[3],
                 "processes": jax.process_count(), "devices": runner.devices})
    bar.set_postfix_str(f"loss {loss:.4f} acc {100 * acc:.2f}%")
    bar.update(1)
    bars.advance(epoch_weight(m, num_rows))
  bar.close()
  log(f"{label}: train loss {rows[-1]['train_loss']:.4f}, test acc "
      f"{100 * rows[-1]['test_acc']:.2f}% after {epochs} epochs")
  return rows


def tune_lr(runner: pm.Runner, val_ds: datasets.Dataset, module: Any, lrs: Sequence[float],
            epochs: int, bars: Progress) -> tuple[float, list[Row]]:
  """Learning rate with the best final validation accuracy (seed 0), and every rate's rows."""
  evaluate = pm.evaluator(module, val_ds)
  out = []
  for lr in lrs:
    rows = train(runner, evaluate, 0, lr, epochs, len(val_ds.y_train),
                 f"{runner.method.name} lr={lr:.2g} (val)", bars)
    out.append({"method": runner.method.name, "lr": lr, "val_acc": rows[-1]["test_acc"],
                "val_train_loss": rows[-1]["train_loss"]})
  finite = [r for r in out if np.isfinite(r["val_train_loss"])] or out
  return max(finite, key=lambda r: r["val_acc"])["lr"], out


def run_all(args: argparse.Namespace) -> tuple[list[Row], list[Row], datasets.Dataset]:
  """Runs every selected method with ``args.trials`` seeds; returns result and LR rows."""
  ds = load_data(args)
  module = models.for_dataset(args.dataset)
  evaluate = pm.evaluator(module, ds)
  val_ds = datasets.validation_split(ds, min(datasets.MNIST5K_NUM_VAL, len(ds.y_train) // 8))
  results, lr_rows = [], []
  methods = select_methods(args)
  bars = Progress(planned_seconds(methods, args, len(ds.y_train), len(val_ds.y_train)))
  for method in methods:
    lr = 0.0
    if method.kind in ("adam", "sgd"):
      lrs = QUICK_LRS[method.kind] if args.quick else LRS
      tuner = pm.build(method, module, val_ds, pm.minibatch_size(len(ds.y_train)))
      tuner.warmup()
      bars.advance(compile_weight(method))
      lr, rows = tune_lr(tuner, val_ds, module, lrs, args.epochs, bars)
      lr_rows += rows
      log(f"[lr] {method.name}: chosen {lr:.3g} on the validation split")
    preset = {"base": aptsjax.APTSConfig.paper()} if args.preset == "paper" else {}
    runner = pm.build(method, module, ds, **(preset if method.kind in ("apts", "tr") else {}))
    compile_s = time.perf_counter()
    runner.warmup()
    bars.advance(compile_weight(method))
    log(f"[compile] {method.name}: {time.perf_counter() - compile_s:.1f} s "
        f"(first step, untimed, {runner.devices} device(s), {jax.process_count()} process(es))")
    table = args.preset if method.kind in ("apts", "tr") else "-"
    for seed in range(args.trials):
      rows = train(runner, evaluate, seed, lr, args.epochs, len(ds.y_train),
                   f"{method.name} seed {seed}", bars)
      results += [{**row, "preset": table} for row in rows]
  bars.close()
  return results, lr_rows, ds


def by_method(rows: list[Row]) -> dict[str, dict[int, list[Row]]]:
  """Groups rows as method -> seed -> rows in epoch order."""
  out: dict[str, dict[int, list[Row]]] = {}
  for r in rows:
    out.setdefault(r["method"], {}).setdefault(r["seed"], []).append(r)
  return out


def curves(runs: dict[int, list[Row]], key: str) -> np.ndarray:
  """(trials, epochs) array of one column."""
  return np.asarray([[r[key] for r in rows] for rows in runs.values()], dtype=float)


def plot(rows: list[Row], batching: str, path: Path, title: str) -> bool:
  """Figure in the style of the paper's Figures 1-2: loss and accuracy vs epoch, one column
  per model order, mean line and min-max band over trials; Adam/SGD appear in both columns.
  Each method keeps its colour and marker in every figure (``benchmarks.common.style``)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  groups = by_method(rows)
  shown = {name: runs for name, runs in groups.items()
           if next(iter(runs.values()))[0]["batching"] == batching
           or next(iter(runs.values()))[0]["kind"] in ("adam", "sgd")}
  if not any(next(iter(r.values()))[0]["kind"] in ("apts", "tr") for r in shown.values()):
    return False
  fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
  for col, order in enumerate(("o1", "o2")):
    for name, runs in sorted(shown.items()):
      first = next(iter(runs.values()))[0]
      if first["kind"] not in ("adam", "sgd") and first["order"] != order:
        continue
      epochs = np.arange(1, curves(runs, "epoch").shape[1] + 1)
      for row, (key, scale) in enumerate((("train_loss", 1.0), ("test_acc", 100.0))):
        values = curves(runs, key) * scale
        plot_method(axes[row, col], epochs, values.mean(0), name)
        axes[row, col].fill_between(epochs, values.min(0), values.max(0),
                                    color=method_style(name)["color"], alpha=0.2)
    axes[0, col].set_title(f"{'first' if order == 'o1' else 'second'}-order models")
    axes[0, col].set_yscale("log")
    axes[0, col].set_ylabel("train loss")
    axes[1, col].set_ylabel("test accuracy (%)")
    epoch_axis(axes[1, col])
    if axes[1, col].get_legend_handles_labels()[0]:
      axes[1, col].legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def summarize(rows: list[Row], args: argparse.Namespace, seconds: float) -> str:
  """Markdown table (final epoch, mean ± std over trials) and the verdict vs tuned Adam; under
  ``--quick``, what the run cannot judge and a one-line verdict at equal epochs instead."""
  devices = sorted({r["devices"] for r in rows})
  lines = [f"## {args.dataset}: {args.epochs} epochs, {args.trials} trial(s), "
           f"{jax.process_count()} process(es), {'/'.join(map(str, devices))} device(s)", "",
           *table_head(["method", "lr", "test acc (%)", "train loss", "epochs", "fwd passes",
                        "bwd passes", "wall (s)", "all-reduced floats"])]
  final: dict[str, np.ndarray] = {}
  for name, runs in by_method(rows).items():
    last = [r[-1] for r in runs.values()]
    mean = lambda k: float(np.mean([r[k] for r in last]))
    acc = np.asarray([100 * r["test_acc"] for r in last])
    final[name] = acc
    lr = f"{last[0]['lr']:.2g}" if last[0]["kind"] in ("adam", "sgd") else "-"
    lines.append(f"| {name} | {lr} | {acc.mean():.2f} ± {acc.std():.2f} | "
                 f"{mean('train_loss'):.4f} | {last[0]['epoch']} | {mean('forward_passes'):.1f} | "
                 f"{mean('backward_passes'):.1f} | {mean('wall_s'):.1f} | "
                 f"{mean('allreduce_floats'):.3g} |")
  total = (f"Total run time {seconds:.0f} s (including compilation, evaluation and "
           "learning-rate search).")
  if args.quick:
    lines += ["", *quick_notes(rows, args), "", *equal_work(rows), "", total, "",
              quick_verdict(rows, args)]
  else:
    lines += ["", *verdict(final), "", *equal_work(rows), "", total]
  return "\n".join(lines)


def finals(rows: list[Row], key: str) -> dict[str, float]:
  """Each method's final-epoch ``key``, mean over trials."""
  return {name: float(curves(runs, key).mean(0)[-1]) for name, runs in by_method(rows).items()}


def quick_notes(rows: list[Row], args: argparse.Namespace) -> list[str]:
  """What a ``--quick`` run can and cannot say: its size, the target it does not judge, and
  the full-batch methods' few iterations."""
  default = parse_args([])
  out = [f"Quick run: {args.epochs} epochs on the first {QUICK_ROWS:,} training rows, "
         f"{args.trials} trial(s), learning rates from two candidates: a smoke test. The target "
         f"(APTS/SAPTS within {TARGET_POINTS} points of tuned Adam) is judged by the full run "
         f"(`python -m benchmarks.paper`: {default.epochs} epochs, {default.trials} trials), "
         "not here."]
  iters = finals(rows, "iterations")
  full = [n for n, runs in by_method(rows).items() if next(iter(runs.values()))[0]["batching"]
          == "full" and next(iter(runs.values()))[0]["kind"] in ("apts", "tr")]
  if full:
    most = max(iters.values())
    out.append("")
    out.append(f"{', '.join(full)} run full batch, one iteration per epoch: "
               f"{min(iters[n] for n in full):.0f} iterations here (the most any method made: "
               f"{most:.0f}); their accuracy after so few steps says little about where they end.")
  return out


def quick_verdict(rows: list[Row], args: argparse.Namespace) -> str:
  """One line from the numbers: the best test accuracy and train loss at equal epochs, and the
  best APTS/SAPTS run against Adam, with the run's size as the caveat."""
  acc, loss = finals(rows, "test_acc"), finals(rows, "train_loss")
  best, lowest = max(acc, key=acc.get), min(loss, key=loss.get)
  text = (f"Verdict ({args.epochs} epochs, {args.trials} trial(s), {QUICK_ROWS:,} rows: says "
          f"little about the full run): at equal epochs {best} had the best test accuracy "
          f"({100 * acc[best]:.2f}%) and {lowest} the lowest train loss ({loss[lowest]:.4f})")
  apts = [n for n in acc if "APTS" in n]
  if apts:
    top = max(apts, key=acc.get)
    text += f"; the best APTS/SAPTS run is {top} at {100 * acc[top]:.2f}%"
    if "Adam" in acc:
      text += f" ({100 * (acc[top] - acc['Adam']):+.2f} points vs Adam)"
  return text + "."


def verdict(final: dict[str, np.ndarray]) -> list[str]:
  """Target: APTS (default parameters) >= tuned Adam - 0.5 points at the same epochs."""
  if "Adam" not in final:
    return ["Verdict: Adam was not run, no comparison."]
  target = final["Adam"].mean() - TARGET_POINTS
  out = [f"Verdict (target: mean test accuracy >= tuned Adam {final['Adam'].mean():.2f} - "
         f"{TARGET_POINTS} = {target:.2f}% at the same epochs):"]
  apts = [n for n in final if "APTS" in n]
  for name in apts:
    acc = final[name].mean()
    out.append(f"- {name}: {acc:.2f}% {'MEETS' if acc >= target else 'MISSES'} the target "
               f"({acc - final['Adam'].mean():+.2f} points vs Adam)")
  met = sum(final[n].mean() >= target for n in apts)
  out.append(f"{met} of {len(apts)} APTS/SAPTS configurations meet the target.")
  return out


def at_budget(runs: dict[int, list[Row]], key: str, budget: float) -> tuple[float, int] | None:
  """Mean test accuracy (%) at the last epoch whose mean ``key`` is within ``budget``."""
  spent, acc = curves(runs, key).mean(0), curves(runs, "test_acc").mean(0)
  within = np.nonzero(spent <= budget * (1 + 1e-9))[0]
  return None if not len(within) else (100 * float(acc[within[-1]]), int(within[-1]) + 1)


def equal_work(rows: list[Row]) -> list[str]:
  """APTS/SAPTS accuracy at tuned Adam's final backward passes and final wall time; one line
  saying why instead when no APTS/SAPTS epoch fits Adam's budget."""
  groups = by_method(rows)
  if "Adam" not in groups:
    return []
  adam = groups["Adam"]
  budget = {key: float(curves(adam, key).mean(0)[-1]) for key in ("backward_passes", "wall_s")}
  hits = {name: [at_budget(runs, key, budget[key]) for key in budget]
          for name, runs in groups.items() if "APTS" in name}
  if hits and not any(h for cells in hits.values() for h in cells):
    first = {key: min(float(curves(groups[n], key).mean(0)[0]) for n in hits) for key in budget}
    return ["Equal work: not defined for this run. Adam's whole run "
            f"({budget['backward_passes']:.1f} backward passes, {budget['wall_s']:.1f} s) "
            "costs less than the first epoch of "
            f"every APTS/SAPTS run (at least {first['backward_passes']:.1f} passes and "
            f"{first['wall_s']:.1f} s); a longer run (the default {parse_args([]).epochs} epochs) "
            "reports APTS/SAPTS accuracy at Adam's final passes and wall time."]
  out = ["At equal work (APTS/SAPTS mean test accuracy at the last epoch within Adam's final "
         "budget; Adam's own final accuracy "
         f"{100 * curves(adam, 'test_acc').mean(0)[-1]:.2f}%):", "",
         *table_head(["method", "at Adam's backward passes", "at Adam's wall time"])]
  for name, found in hits.items():
    cells = ["not reached (epoch 1 costs more)" if hit is None
             else f"{hit[0]:.2f}% (epoch {hit[1]})" for hit in found]
    out.append(f"| {name} | {cells[0]} | {cells[1]} |")
  return out


def main(argv: Sequence[str] | None = None) -> list[Row]:
  """Runs the benchmark; returns the result rows."""
  args = parse_args(argv)
  distributed.initialize(auto=args.distributed)
  out = Path(args.out)
  start = time.perf_counter()
  rows, lr_rows, _ = run_all(args)
  if not distributed.is_main_process():
    return rows
  out.mkdir(parents=True, exist_ok=True)
  write_csv(rows, out / "results.csv")
  write_csv(lr_rows, out / "lr_search.csv")
  for batching in ("full", "minibatch"):
    plot(rows, batching, out / f"figure_{batching}.png",
         f"{args.dataset}, {'full-batch APTS' if batching == 'full' else 'SAPTS (minibatches)'}"
         " (Adam/SGD: minibatches, dashed)")
  text = summarize(rows, args, time.perf_counter() - start)
  (out / "summary.md").write_text(text + "\n")
  print(text, flush=True)
  return rows


if __name__ == "__main__":
  main()
