"""Ablation of the APTS / SAPTS options against the paper's table, chosen on a validation split.

Run from the repository root::

    python -m benchmarks.options                   # 6 settings x 9 variants, 3 seeds, 30 epochs
    python -m benchmarks.options --epochs 12       # the run that chose the defaults (about 30 min)
    python -m benchmarks.options --quick           # smoke run: 2 settings, 2 variants (21 s)
    python -m benchmarks.options --dataset mnist1d --epochs 12 --variants paper mean mean+adam-local
    python -m benchmarks.options --settings "SAPTS N=2 o1" --variants paper boundary rms+split

Time on a 2-core CPU (measured): ``--quick`` about 21 s when the CPU is otherwise idle;
``--epochs 12`` with the default variants about 30 minutes (26 min for eight of them), so the
30-epoch default about 75 minutes. The progress bar's ETA adapts to the speed observed.

Protocol:

* Data: MNIST-5k (``benchmarks.common.datasets``; ``--dataset mnist1d``: MNIST-1D, generated, with
  its 40-100-100-10 MLP, to check a choice on a second problem). Every run trains on the
  first 3,500 of its 4,000 training rows; the last 500 training rows are the validation split
  (the split on which ``benchmarks.paper`` chooses Adam's learning rate); the 1,000 test rows
  are evaluated after
  every epoch, reported, and never used to choose anything.
* Settings (``benchmarks.paper.methods.Method``): SAPTS N=2 and N=4 (660-row minibatches, 5%
  overlap) and full-batch APTS N=2, each with first-order (o1) and L-SR1 (o2) models.
* Variants: changes to the paper's method ``aptsjax.APTSConfig.paper()``, which every variant
  passes as ``base=`` so that the library defaults never enter. The single options (``OPTIONS``)
  are ``boundary`` (radius_growth="boundary": grow the radius only after a step that reached the
  boundary), ``split`` (local_radius="split": local radius from Delta / (N nu)), ``rms``
  (norm="rms": the region ||D s|| <= Delta with D from an RMS of past gradients),
  ``adam-local`` (nu Adam steps, learning rate 1e-3, as the local solver) and ``mean``
  (combine="mean": s~ is the mean of the local steps, each bounded by Delta); a variant joins
  options with "+" (``boundary+rms``), and ``paper`` is the table unchanged. A variant whose
  option the installed aptsjax lacks stops the run before anything is trained.
* Selection, per setting: the variant with the highest final-epoch validation accuracy (mean
  over seeds); ties go to fewer all-reduced bytes, then to the variant run first. Overall: the
  variant with the best mean rank over the settings (among the variants run in all of them).
* Reference: Adam (``--adam-lr``, default 0.01, the rate ``benchmarks.paper`` chose on this
  validation split) and SGD (``--sgd-lr``, 0.1) on the same minibatches, epochs and seeds.

Reported per setting, variant and seed, after every epoch (``ablation.csv``): validation and
test accuracy, train loss (the 3,500 training rows), local steps per iteration (max over the
subdomains), the fraction of accepted APTS steps, the global radius (mean over the epoch's
iterations and after its last one), and cumulative iterations, forward/backward passes per
training row, training wall seconds (evaluation and compilation excluded) and all-reduced floats
and bytes (float32: 4 bytes each; conventions in ``benchmarks.paper.methods``). ``summary.md``
(also printed) gives per setting each variant's final and best test accuracy, epochs and bytes
to 93.47% test accuracy (over the seeds that reach it) and the chosen variant;
``val_accuracy.png`` and ``radius.png`` show the mean curves per setting.
"""
from __future__ import annotations

import argparse
import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

import aptsjax
from benchmarks.common import datasets, models
from benchmarks.common.output import log, write_csv
from benchmarks.common.progress import Progress
from benchmarks.options import report
from benchmarks.paper import methods as pm
from benchmarks.paper.eta import compile_weight, epoch_weight

SETTINGS = tuple(pm.Method("apts", n, order, minibatch)
                 for minibatch, n in ((True, 2), (True, 4), (False, 2)) for order in (False, True))
QUICK_SETTINGS = ("SAPTS N=2 o1", "APTS N=2 o1")
QUICK_ROWS = 1000
NAMES = {"mnist5k": "MNIST-5k", "mnist1d": "MNIST-1D"}
BYTES_PER_FLOAT = 4
TARGET_ACC = 93.47  # test accuracy (%) at which epochs and bytes are counted
Row = dict[str, Any]


class Variant(NamedTuple):
  """APTS options relative to the paper's table.

  Attributes:
    name: "paper" or single options joined by "+", e.g. "boundary+rms".
    overrides: ``aptsjax.APTSConfig`` options (or its region's fields) changed from
      ``APTSConfig.paper()``.
    local_solver: a key of ``LOCAL_SOLVERS``, or None for the trust-region local solver.
  """
  name: str
  overrides: Mapping[str, Any] = MappingProxyType({})
  local_solver: str | None = None


LOCAL_SOLVERS: dict[str, Callable[[], Any]] = {
    "adam": lambda: aptsjax.optax_local_solver(optax.adam(1e-3)),
    # Learning rate 1: every step is longer than the region and is projected onto it, so the
    # region, not the rate, sets the step length (Adam's direction at the local bound).
    "adam-region": lambda: aptsjax.optax_local_solver(optax.adam(1.0)),
}
OPTIONS = {  # add a single option here; any "+" combination of them is then a variant
    "boundary": Variant("boundary", {"radius_growth": "boundary"}),
    "split": Variant("split", {"local_radius": "split"}),
    "rms": Variant("rms", {"norm": "rms"}),
    "adam-local": Variant("adam-local", local_solver="adam"),
    "mean": Variant("mean", {"combine": "mean"}),
    "adam-region": Variant("adam-region", local_solver="adam-region"),
    "adam-tr": Variant("adam-tr", {"local_solver": "adam_tr"}),
    "carry": Variant("carry", {"local_radius": "carry"}),
    "per-param": Variant("per-param", {"radius_units": "per_parameter", "min_radius": 1e-6}),
    "g0": Variant("g0", {"global_steps": 0}),
}
DEFAULT_VARIANTS = ("paper", "boundary", "split", "rms", "adam-local", "mean", "mean+adam-local",
                    "mean+adam-local+rms", "boundary+mean+adam-local")
QUICK_VARIANTS = ("paper", "boundary+split+rms+mean+adam-local")  # every option


def variant(name: str) -> Variant:
  """The variant named ``name``: "paper" or options of ``OPTIONS`` joined by "+".

  Raises:
    ValueError: an unknown option, or two options setting the same field differently.
  """
  if name == "paper":
    return Variant("paper")
  overrides: dict[str, Any] = {}
  solvers = set()
  for part in name.split("+"):
    if part not in OPTIONS:
      raise ValueError(f"unknown option {part!r} in variant {name!r}: a variant is 'paper' or "
                       f"options joined by '+', from {sorted(OPTIONS)}.")
    option = OPTIONS[part]
    clash = [k for k, v in option.overrides.items() if overrides.get(k, v) != v]
    if clash or (option.local_solver and solvers - {option.local_solver}):
      raise ValueError(f"variant {name!r} sets {clash or 'the local solver'} twice differently; "
                       "combine options that change different things.")
    overrides.update(option.overrides)
    solvers |= {option.local_solver} - {None}
  return Variant(name, overrides, next(iter(solvers), None))


def check_available(v: Variant) -> None:
  """Raises ValueError naming what ``v`` needs and the installed aptsjax lacks."""
  missing = []
  if not hasattr(aptsjax, "APTSConfig"):
    missing.append("aptsjax.APTSConfig")
  if "base" not in inspect.signature(aptsjax.apts).parameters:
    missing.append("the base= keyword of aptsjax.apts")
  if hasattr(aptsjax, "APTSConfig"):
    known = set(aptsjax.APTSConfig._fields) | set(aptsjax.TrustRegionConfig._fields)
    missing += [f"the aptsjax.APTSConfig option {k!r}" for k in v.overrides if k not in known]
  if v.local_solver is not None and not hasattr(aptsjax, "optax_local_solver"):
    missing.append("aptsjax.optax_local_solver")
  if missing:
    raise ValueError(f"variant {v.name!r} needs {', '.join(missing)}, which the installed "
                     f"aptsjax ({Path(aptsjax.__file__).parent}) lacks: update aptsjax or "
                     "leave the variant out of --variants.")


def apts_options(v: Variant) -> dict[str, Any]:
  """The keywords of ``aptsjax.apts`` for ``v``: the paper's table as base, then the changes."""
  check_available(v)
  options = {"base": aptsjax.APTSConfig.paper(), **v.overrides}
  if v.local_solver is not None:
    options["local_solver"] = LOCAL_SOLVERS[v.local_solver]()
  return options


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """The command line (see the module docstring); names are checked here."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true",
                 help=f"smoke run: 2 epochs, 1 seed, {QUICK_ROWS:,} training rows, "
                 f"settings {list(QUICK_SETTINGS)} and variants {list(QUICK_VARIANTS)} unless "
                 "chosen")
  p.add_argument("--epochs", type=int, default=30)
  p.add_argument("--seeds", type=int, default=3, help="seeds 0..SEEDS-1 per configuration")
  p.add_argument("--settings", nargs="+", default=None,
                 help=f"subset by name, from {[m.name for m in SETTINGS]}")
  p.add_argument("--variants", nargs="+", default=None,
                 help=f"'paper' or options joined by '+', from {sorted(OPTIONS)} (default "
                 f"{list(DEFAULT_VARIANTS)})")
  p.add_argument("--dataset", default="mnist5k", choices=tuple(NAMES),
                 help="the data set (its last 500 training rows are the validation split)")
  p.add_argument("--adam-lr", type=float, default=0.01)
  p.add_argument("--sgd-lr", type=float, default=0.1)
  p.add_argument("--target", type=float, default=TARGET_ACC, help="test accuracy (%%) target")
  p.add_argument("--out", default="results/ablation", help="output directory")
  args = p.parse_args(argv)
  if args.quick:
    args.epochs, args.seeds = 2, 1
  if args.epochs < 1 or args.seeds < 1:
    p.error("--epochs and --seeds must be at least 1")
  known = {m.name: m for m in SETTINGS}
  names = args.settings or (QUICK_SETTINGS if args.quick else list(known))
  unknown = [n for n in names if n not in known]
  if unknown:
    p.error(f"unknown settings {unknown}; choose from {list(known)}")
  args.settings = [known[n] for n in names]
  try:
    names = args.variants or (QUICK_VARIANTS if args.quick else DEFAULT_VARIANTS)
    args.variants = [variant(n) for n in dict.fromkeys(names)]
    for v in args.variants:
      check_available(v)
  except ValueError as e:
    p.error(str(e))
  return args


def load_split(quick: bool, name: str = "mnist5k") -> datasets.Dataset:
  """The first training rows (3,500 of MNIST-5k's and MNIST-1D's 4,000; 1,000 with ``quick``)
  and the last 500 as test rows (the validation split)."""
  split = datasets.validation_split(datasets.load(name), datasets.MNIST5K_NUM_VAL)
  if quick:
    split = split._replace(x_train=split.x_train[:QUICK_ROWS], y_train=split.y_train[:QUICK_ROWS])
  return split


def evaluator(module: Any, split: datasets.Dataset, test: datasets.Dataset
              ) -> Callable[[Any], tuple[float, float, float]]:
  """``params -> (train loss, validation accuracy, test accuracy)``, untimed."""
  on_split = pm.evaluator(module, split)

  def evaluate(params: Any) -> tuple[float, float, float]:
    params = jax.device_get(params)
    loss, val = on_split(params)
    return loss, val, models.accuracy(module, params, test.x_test, test.y_test)

  return evaluate


def train(runner: pm.Runner, evaluate: Callable[[Any], tuple[float, float, float]],
          variant_name: str, seed: int, lr: float, epochs: int, num_rows: int,
          bars: Progress) -> list[Row]:
  """One run from seed ``seed``: one row per epoch, with cumulative counts."""
  m = runner.method
  label = f"{m.name} | {variant_name} | seed {seed}"
  carry, totals = runner.init(seed, lr), np.zeros(5)
  rows, bar = [], bars.run(epochs, label)
  for ep in range(epochs):
    carry, work = runner.epoch(carry, ep, seed)
    totals += np.asarray([work.iterations, work.forward_rows, work.backward_rows,
                          work.allreduce_floats, work.seconds], dtype=float)
    loss, val, test = evaluate(carry[0])
    rows.append({"setting": m.name, "variant": variant_name, "kind": m.kind, "seed": seed,
                 "epoch": ep + 1, "val_acc": val, "test_acc": test, "train_loss": loss,
                 "local_steps": work.local_steps, "apts_accept_rate": work.apts_accepted,
                 "radius_mean": work.radius_mean, "radius_final": work.radius_final,
                 "iterations": int(totals[0]), "passes_per_row": totals[2] / num_rows,
                 "wall_s": totals[4], "allreduce_floats": totals[3],
                 "allreduce_bytes": BYTES_PER_FLOAT * totals[3]})
    bar.set_postfix_str(f"val {100 * val:.2f}% loss {loss:.4f}")
    bar.update(1)
    bars.advance(epoch_weight(m, num_rows))
  bar.close()
  last = rows[-1]
  radius = f"radius {last['radius_final']:.3g}, " if m.kind == "apts" else ""
  log(f"{label}: val {100 * last['val_acc']:.2f}%, test {100 * last['test_acc']:.2f}%, "
      f"loss {last['train_loss']:.4f}, {radius}{last['wall_s']:.1f} s")
  return rows


def configurations(args: argparse.Namespace
                   ) -> list[tuple[pm.Method, str, float, Variant | None]]:
  """(method, variant name, learning rate, variant) of every configuration, in run order.

  The variants run in every setting; Adam and SGD (variant None) close the list.
  """
  out = [(m, v.name, 0.0, v) for m in args.settings for v in args.variants]
  return out + [(pm.Method("adam", minibatch=True), f"lr {args.adam_lr:g}", args.adam_lr, None),
                (pm.Method("sgd", minibatch=True), f"lr {args.sgd_lr:g}", args.sgd_lr, None)]


def run_all(args: argparse.Namespace, csv_path: Path) -> tuple[list[Row], int]:
  """Every configuration with every seed (each runner compiled once and reused across seeds).

  ``csv_path`` is rewritten after every configuration, so a stopped run keeps what it did.

  Returns:
    The rows and the number of training rows.
  """
  split = load_split(args.quick, args.dataset)
  test = datasets.load(args.dataset)
  module = models.for_dataset(args.dataset)
  evaluate = evaluator(module, split, test)
  num_rows = len(split.y_train)
  batch_size = pm.minibatch_size(num_rows + len(split.y_test))
  configs = configurations(args)
  bars = Progress(sum(compile_weight(m) + args.seeds * args.epochs * epoch_weight(m, num_rows)
                      for m, *_ in configs), desc="ablation")
  rows: list[Row] = []
  for method, name, lr, v in configs:
    options = apts_options(v) if v is not None else {}
    runner = pm.build(method, module, split, batch_size, **options)
    start = time.perf_counter()
    runner.warmup()
    bars.advance(compile_weight(method))
    log(f"[compile] {method.name} | {name}: {time.perf_counter() - start:.1f} s "
        f"(first step, untimed, {runner.devices} device(s))")
    for seed in range(args.seeds):
      rows += train(runner, evaluate, name, seed, lr, args.epochs, num_rows, bars)
    write_csv(rows, csv_path)
  bars.close()
  return rows, num_rows


def main(argv: Sequence[str] | None = None) -> list[Row]:
  """Runs the study and writes ``ablation.csv``, ``summary.md`` and the figures; returns rows."""
  args = parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  rows, num_rows = run_all(args, out / "ablation.csv")
  report.plot(rows, out)
  text = report.summarize(rows, args.target, time.perf_counter() - start,
                          f"{NAMES[args.dataset]}: {args.epochs} epochs, {args.seeds} seed(s), "
                          f"{num_rows:,} training rows")
  (out / "summary.md").write_text(text + "\n")
  print(text, flush=True)
  return rows


if __name__ == "__main__":
  main()
