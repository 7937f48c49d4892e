"""Communication efficiency of data-parallel training: DDP-Adam vs DiLoCo vs APTS.

W simulated workers on one device read the same streams (``benchmarks.efficiency.streams``):
worker i owns the i-th of W equal contiguous shares of the training rows and reads it as
minibatches of B / W rows, reshuffled every epoch with a fixed seed. DDP-Adam all-reduces the
gradient every minibatch; DiLoCo takes H inner Adam steps per worker and all-reduces the
pseudo-gradient once per round (outer Nesterov SGD); APTS (``aptsjax.apts``, library defaults,
W subdomains) exchanges once per H minibatches (``benchmarks.efficiency.methods``).

Communication: floats all-reduced per device per exchange, read off each method's exchange
compiled under ``jax.shard_map`` on W simulated host devices (``benchmarks.efficiency.programs``;
DDP-Adam and DiLoCo cross-checked against n, the parameter count), summed until the test metric
first reaches the target: tuned DDP-Adam's best test accuracy (mean over seeds, per W) - 0.5
points (a loss: + 2%).

Selection, on the validation split at every W (``--tune-once``: at the first W only, reused at
the others): DDP-Adam's learning rate by the best validation metric; DiLoCo's (inner lr, H, outer
lr) and APTS's period H by the fewest exchanges to DDP-Adam's best validation metric - 0.5 points
(ties, or nobody reaching it: the best validation metric). APTS is reported at every H of the grid
on the test split.

Compute time per exchange: the median wall time of one exchange of the same method built for ONE
worker (W = 1) on worker 0's b-row minibatches (what one device computes between two all-reduces),
measured in this process after compilation. With the latency-bandwidth model of the ring
all-reduce (``benchmarks.communication.communication.allreduce_seconds``) it gives a modelled
time to target for 8 and 64 workers at 10 and 100 Gb/s (``benchmarks.efficiency.report``).

Run from the repository root: ``python -m benchmarks.efficiency [--quick] [--out DIR]
[--task mnist_mlp] [--workers 2 4 8] [--seeds 0 1 2] [--epochs 30] [--batch 1000] [--tune-once]
[--grid full|small]``
(8 simulated host devices unless ``XLA_FLAGS`` sets a count). ``--quick``: 2,000 training rows,
200-row minibatches, 3 epochs, W = 2, seed 0, tiny grids. On a 2-core CPU (mnist_mlp, compilation
included): ``--quick`` 40-50 s; the full run 22 min (selection at every W; ``--tune-once`` 11 min);
``--workers 2 --seeds 0`` about 4.5 min.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax

from benchmarks.common.devices import simulate_host_devices
from benchmarks.common.output import Row, log
from benchmarks.common.progress import Progress
from benchmarks.efficiency import methods, programs, report, streams, tasks, train
from benchmarks.efficiency.methods import APTS, DDP_ADAM, DILOCO
from benchmarks.efficiency.task import Task

HOST_DEVICES = 8
QUICK_ROWS = 2_000
TIMING_REPEATS = 5
WORK = {DDP_ADAM: 1.0, DILOCO: 1.1, APTS: 5.0}   # progress weights: rough cost per minibatch


class Grids(NamedTuple):
  """The selection grids."""
  ddp_lrs: tuple[float, ...]
  inner_lrs: tuple[float, ...]
  periods: tuple[int, ...]
  outer_lrs: tuple[float, ...]


FULL = Grids((1e-4, 3e-4, 1e-3, 3e-3, 1e-2), (1e-3, 3e-3, 1e-2), (5, 10, 20, 40), (0.3, 0.7, 1.0))
QUICK = Grids((1e-3, 3e-3), (1e-3, 3e-3), (2, 5), (0.7,))
SMALL = Grids((1e-3, 3e-3, 1e-2), (3e-3, 1e-2), (5, 10), (0.7,))  # --grid small: larger models
GRIDS = {"full": FULL, "small": SMALL}


class Context(NamedTuple):
  """What every run of one benchmark shares."""
  task: Task
  batch: int
  epochs: int
  grids: Grids
  bars: Progress
  counts: dict      # (method, W, H) -> the row of programs.exchange_stats


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
  """The command line."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny smoke version (about 1 min)")
  parser.add_argument("--out", default="results/efficiency", help="output directory")
  parser.add_argument("--task", default="mnist_mlp", help=f"one of {', '.join(tasks.TASKS)}")
  parser.add_argument("--workers", type=int, nargs="+", help="W values (default 2 4 8; quick 2)")
  parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2; quick 0)")
  parser.add_argument("--epochs", type=int, help="epochs per run (default 30; quick 3)")
  parser.add_argument("--batch", type=int, help="global minibatch rows B (default 1000; quick 200)")
  parser.add_argument("--tune-once", action="store_true",
                      help="select the settings at the first W only and reuse them at the others")
  parser.add_argument("--grid", choices=tuple(GRIDS), default="full",
                      help="the selection grids: full, or small (3 DDP-Adam rates, 2 inner rates x "
                      "H in {5, 10} x outer rate 0.7 for DiLoCo) for the larger models")
  args = parser.parse_args(argv)
  defaults = ((2,), (0,), 3, 200) if args.quick else ((2, 4, 8), (0, 1, 2), 30, 1000)
  for key, value in zip(("workers", "seeds", "epochs", "batch"), defaults):
    if getattr(args, key) is None:
      setattr(args, key, value)
  return args


def exchange_floats(ctx: Context, name: str, workers: int, period: int) -> int:
  """Floats all-reduced per exchange, read off the compiled program (compiled once per key)."""
  key = (name, workers, 1 if name == DDP_ADAM else period)
  if key not in ctx.counts:
    row = programs.exchange_stats(ctx.task, name, workers, ctx.batch, key[2])
    ctx.counts[key] = row
    check = "" if row["constructed"] is None else (
        ", = n by construction" if row["floats_per_iter"] == row["constructed"]
        else f", MISMATCH with {row['constructed']:,} by construction")
    log(f"[hlo] {name} W={workers} H={key[2]}: {row['floats_per_iter']:,} floats "
        f"({row['per_n']:.4f} n) in {row['calls_per_iter']} all-reduces{check}; "
        f"{row['in_local_loop']} in data-dependent loops")
  return ctx.counts[key]["floats_per_iter"]


def configs(ctx: Context, name: str, minibatches: int) -> list[Row]:
  """The grid of a method; periods capped by the budget of ``minibatches`` minibatches."""
  periods = train.periods_within(ctx.grids.periods, minibatches)
  if name == DDP_ADAM:
    return [{"lr": lr} for lr in ctx.grids.ddp_lrs]
  if name == DILOCO:
    grid = itertools.product(ctx.grids.inner_lrs, periods, ctx.grids.outer_lrs)
    return [{"inner_lr": i, "H": h, "outer_lr": o} for i, h, o in grid]
  return [{"H": h} for h in periods]


def run(ctx: Context, name: str, config: Row, workers: int, split: train.Split,
        seed: int) -> list[Row]:
  """One run of a configured method (its exchange count compiled first when new)."""
  method = methods.build(name, ctx.task, workers, config)
  floats = exchange_floats(ctx, name, workers, method.period)
  weight = WORK[name] * ctx.epochs
  return train.run(method, ctx.task, split, seed, ctx.batch, ctx.epochs, floats, ctx.bars,
                   weight)


def sweep(ctx: Context, name: str, grid: list[Row], workers: int, split: train.Split
          ) -> list[list[Row]]:
  """Runs every configuration of ``grid`` with seed 0; their rows, in grid order."""
  return [run(ctx, name, config, workers, split, 0) for config in grid]


def tune(ctx: Context, workers: int) -> tuple[dict[str, Row], list[Row], list[Row]]:
  """Selects every method's settings on the validation split at W = ``workers``.

  Returns:
    (chosen settings by method, one grid row per configuration, every run's rows).
  """
  task, split = ctx.task, train.make_split(ctx.task, validation=True)
  minibatches = len(streams.make_stream(task.rows(split.train), workers, ctx.batch, 0,
                                        ctx.epochs).indices)
  chosen, grid_rows, all_rows, target = {}, [], [], None
  for name in (DDP_ADAM, DILOCO, APTS):
    grid = configs(ctx, name, minibatches)
    runs = sweep(ctx, name, grid, workers, split)
    if target is None:   # DDP-Adam's best run fixes the validation target
      bests = [train.best_metric(r, task) for r in runs]
      best = bests[train.choose([{"best": b} for b in bests], task.higher_is_better, False)]
      target = train.target_of(best, task.higher_is_better)
    scores = [train.score(r, task, target) for r in runs]
    pick = train.choose(scores, task.higher_is_better, by_exchanges=name != DDP_ADAM)
    chosen[name] = grid[pick]
    grid_rows += [{"method": name, "W": workers, **report.flat(config), "best_val": s["best"],
                   "val_target": target, "exchanges_to_val_target": s["exchanges"],
                   "chosen": i == pick} for i, (config, s) in enumerate(zip(grid, scores))]
    all_rows += [row for r in runs for row in r]
    log(f"[select] {name} at W={workers}: {chosen[name]} (validation target {target:.4f})")
  return chosen, grid_rows, all_rows


def tune_all(ctx: Context, workers: Sequence[int], once: bool
             ) -> tuple[dict[int, dict[str, Row]], list[Row], list[Row]]:
  """Selects the settings at every W, or at the first W only (``once``) for every W.

  Returns:
    (the settings by W and method, the selection grids' rows, the selection runs' rows).
  """
  chosen, grid_rows, val_rows = {}, [], []
  for w in workers[:1] if once else workers:
    chosen[w], grid, rows = tune(ctx, w)
    grid_rows, val_rows = grid_rows + grid, val_rows + rows
  return {w: chosen.get(w, chosen[workers[0]]) for w in workers}, grid_rows, val_rows


def test_runs(ctx: Context, chosen: dict[int, dict[str, Row]], seeds: Sequence[int]
              ) -> tuple[list[Row], dict[int, float]]:
  """The reported runs on the test split: every W (the keys of ``chosen``, the settings by W
  and method) and seed, DDP-Adam first (it fixes the target of its W), then DiLoCo, then APTS at
  every period of the grid.

  Returns:
    (every run's rows, the target per W).
  """
  split, task = train.make_split(ctx.task, validation=False), ctx.task
  rows, targets = [], {}
  for w in chosen:
    minibatches = len(streams.make_stream(task.rows(split.train), w, ctx.batch, 0,
                                          ctx.epochs).indices)
    ddp = [run(ctx, DDP_ADAM, chosen[w][DDP_ADAM], w, split, s) for s in seeds]
    targets[w] = train.target_of(statistics.mean(train.best_metric(r, task) for r in ddp),
                                 task.higher_is_better)
    log(f"[target] W={w}: {task.metric} {targets[w]:.4f}")
    rows += [row for r in ddp for row in r]
    rows += [row for s in seeds for row in run(ctx, DILOCO, chosen[w][DILOCO], w, split, s)]
    for config in configs(ctx, APTS, minibatches):
      rows += [row for s in seeds for row in run(ctx, APTS, config, w, split, s)]
  return rows, targets


def worker_seconds(ctx: Context, name: str, config: Row, workers: int) -> float:
  """Compute per exchange of one worker: the median wall time of an exchange of the method
  built for one worker (W = 1) on worker 0's b = B / W rows, after compilation.

  Args:
    ctx: the context.
    name: the method.
    config: its settings.
    workers: W (sets b).

  Returns:
    Seconds per exchange.
  """
  method = methods.build(name, ctx.task, 1, config)
  rows = ctx.task.train
  stream = streams.make_stream(ctx.task.rows(rows), workers, ctx.batch, 0, ctx.epochs)
  groups = streams.exchanges(stream, method.period)
  local = [streams.take(rows, g[:, :ctx.batch // workers]) for g in groups[:TIMING_REPEATS + 1]]
  state = method.exchange(method.init(ctx.task.init(0)), local[0])   # compiles
  jax.block_until_ready(method.params(state))
  times = []
  for minibatches in local[1:] or local:
    start = time.perf_counter()
    state = method.exchange(state, minibatches)
    jax.block_until_ready(method.params(state))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def stream_notes(ctx: Context, workers: Sequence[int]) -> list[str]:
  """One line per split and W: shares, minibatch rows, and the rows the streams drop."""
  lines = []
  for validation in (True, False):
    rows = ctx.task.rows(ctx.task.split(validation)[0])
    for w in workers:
      s = streams.make_stream(rows, w, ctx.batch, 0, 1)
      lines.append(f"{'validation' if validation else 'test'} runs, W={w}: {rows} training rows, "
                   f"shares of {rows // w} rows, b={ctx.batch // w}, "
                   f"{streams.steps_per_epoch(s)} minibatches per epoch; dropped: {s.dropped} "
                   f"rows (remainder of the split), {s.unread} rows of each share per epoch "
                   "(last partial minibatch)")
  return lines


def planned(args: argparse.Namespace) -> float:
  """The overall bar's total: the runs' weights (selection and test runs)."""
  grid = QUICK if args.quick else GRIDS[args.grid]
  tuning = (len(grid.ddp_lrs) * WORK[DDP_ADAM] + len(grid.inner_lrs) * len(grid.periods)
            * len(grid.outer_lrs) * WORK[DILOCO] + len(grid.periods)
            * WORK[APTS])
  testing = len(args.workers) * len(args.seeds) * (
      WORK[DDP_ADAM] + WORK[DILOCO] + len(grid.periods) * WORK[APTS])
  return args.epochs * (tuning * (1 if args.tune_once else len(args.workers)) + testing)


def main(argv: Sequence[str] | None = None) -> list[Row]:
  """Runs the benchmark; returns the summary rows (per method and W)."""
  simulate_host_devices(HOST_DEVICES)
  args = parse(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  task = tasks.get(args.task)
  if args.quick:
    task = tasks.first_rows(task, QUICK_ROWS)
  log(f"efficiency: {task.name}, {task.rows(task.train)} training rows ({task.num_val} "
      f"validate), W={args.workers}, seeds {args.seeds}, {args.epochs} epochs, B={args.batch}, "
      f"{len(jax.devices())} {jax.devices()[0].platform} devices, jax {jax.__version__}")
  start = time.perf_counter()
  ctx = Context(task, args.batch, args.epochs, QUICK if args.quick else GRIDS[args.grid],
                Progress(planned(args)), {})
  chosen, grid_rows, val_rows = tune_all(ctx, args.workers, args.tune_once)
  test_rows, targets = test_runs(ctx, chosen, args.seeds)
  ctx.bars.close()
  compute = {(name, w): worker_seconds(ctx, name, config, w)
             for w in args.workers for name, config in chosen[w].items()}
  summary = report.write(out, task, chosen, grid_rows, val_rows, test_rows, targets,
                         list(ctx.counts.values()), compute, stream_notes(ctx, args.workers))
  log(f"\nefficiency: done in {time.perf_counter() - start:.0f} s; wrote {out}/")
  return summary
