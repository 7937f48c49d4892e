"""Communication of data-parallel APTS vs data-parallel Adam/SGD, read off compiled HLO.

1. HLO table: all-reduced floats per iteration (``aptsjax.tools.comm.allreduce_stats`` of the compiled
   step; nothing is run) for the MNIST and CIFAR MLPs, APTS on D = N devices (first and second
   order) and data-parallel Adam/SGD under ``jax.shard_map`` on the same mesh, one 660-row
   minibatch per iteration; per epoch = per iteration x minibatches per epoch (or x 1, full batch).
2. Loss/gradient evaluations (forward+backward passes over the batch) per epoch, measured in (3):
   APTS 1 + local steps taken + 1 + global_steps per iteration, Adam/SGD 1.
3. Bytes all-reduced (float32) to reach a target test accuracy on MNIST-5k: target = tuned Adam's
   best test accuracy - 0.5 points; SAPTS with 660-row minibatches and the paper's 5% overlaps.
4. A latency-bandwidth model of the communication time per epoch on N GPUs (ring all-reduce).

Run from the repository root: ``python -m benchmarks.communication [--quick] [--out DIR]``
(8 simulated host devices on a CPU unless ``XLA_FLAGS`` sets a count).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import aptsjax
from aptsjax import data, parallel
from aptsjax.tools import comm
from benchmarks.common import datasets, models
from benchmarks.common.devices import simulate_host_devices
from benchmarks.common.output import Row, log, markdown_table, write_csv
from benchmarks.common.style import plot_method

BATCH = 660            # rows per minibatch (all methods)
OVERLAP = 0.05         # SAPTS: subdomain overlap and overlap between consecutive minibatches
LOCAL_STEPS = 5        # aptsjax.apts default
GLOBAL_STEPS = 1       # aptsjax.apts default
ADAM_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # reduced sweep; 1e-2 as 3e-3 was best in a first run
ALPHA_S = 10e-6        # latency per all-reduce call
GBPS = (10, 100)       # link bandwidths, Gb/s
TARGET_DROP = 0.005    # target = Adam's best test accuracy - 0.5 points
HOST_DEVICES = 8       # simulated host devices when XLA_FLAGS sets no count
NOT_REACHED = {"epoch": "not reached", "bytes": "not reached"}   # cells of a missed target


class Spec(NamedTuple):
  """A model of the table: its Flax module, input width and training rows of its data set."""
  name: str
  module: Any
  input_dim: int
  train_rows: int


class Program(NamedTuple):
  """One compiled train step and what was read off its HLO."""
  method: str                 # "apts-o1", "apts-o2", "adam", "sgd"
  devices: int
  compiled: Any
  fresh: Callable[[int], tuple[Any, Any]]   # seed -> (params, state), placed for ``compiled``
  shard: Callable[[Any], Any]               # minibatch -> placed batch
  stats: Row


def specs(quick: bool) -> list[Spec]:
  """MNIST-5k MLP (4,000 training rows), then CIFAR-10 MLP (50,000) unless quick."""
  out = [Spec("mnist", models.mnist_mlp(), 784, 4_000)]
  return out if quick else out + [Spec("cifar", models.cifar_mlp(), 3_072, 50_000)]


def abstract(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of ``tree`` with the given shardings (compiling allocates nothing)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def hlo_stats(compiled: Any, n: int) -> Row:
  """All-reduced floats and calls of one compiled step, with those inside loops.

  ``aptsjax.tools.comm`` counts each all-reduce's runs per call (``trips``). APTS has two loops: the
  local iterations, whose trip count depends on the data (must communicate nothing: an
  all-reduce there has ``trips`` None), and the global phase, a loop of 1 + ``global_steps``
  known trips (the APTS step and the global steps), whose all-reduces count once per trip.
  """
  records = comm.allreduce_stats(compiled.as_text())
  local = sum(r.trips is None for r in records)
  runs = [r.trips or 0 for r in records]
  floats = sum(r.elements * t for r, t in zip(records, runs))
  return {"n": n, "floats_per_iter": floats, "per_n": floats / n, "calls_per_iter": sum(runs),
          "in_loop": sum(r.in_loop for r in records), "in_local_loop": local,
          "dtypes": "/".join(sorted({d for r in records for d in r.dtypes}))}


def apts_program(spec: Spec, devices: int, second_order: bool) -> Program:
  """Compiles one APTS step on ``devices`` devices for a 660-row minibatch (SAPTS layout)."""
  loss = models.cross_entropy_loss(spec.module)
  trainer = parallel.apts_trainer(loss, devices, num_devices=devices, overlap=OVERLAP,
                                  second_order=second_order, local_steps=LOCAL_STEPS,
                                  global_steps=GLOBAL_STEPS)
  rep = NamedSharding(trainer.mesh, P())
  params = jax.eval_shape(lambda: models.init_params(spec.module, spec.input_dim))
  state = jax.eval_shape(trainer.init, params)
  state_sh = jax.tree.map(lambda s: NamedSharding(trainer.mesh, s),
                          aptsjax.state_specs(state, "data"))
  rows = len(data.overlap_layout(BATCH, devices, OVERLAP))
  batch = (jax.ShapeDtypeStruct((rows, spec.input_dim), np.float32,
                                sharding=NamedSharding(trainer.mesh, P("data"))),
           jax.ShapeDtypeStruct((rows,), np.int32, sharding=NamedSharding(trainer.mesh, P("data"))))
  start = time.perf_counter()
  compiled = trainer.lower(abstract(params, jax.tree.map(lambda _: rep, params)),
                           abstract(state, state_sh), batch).compile()
  stats = hlo_stats(compiled, models.count_params(params))
  stats["compile_s"] = time.perf_counter() - start

  def fresh(seed: int) -> tuple[Any, Any]:
    p = jax.device_put(models.init_params(spec.module, spec.input_dim, seed=seed), rep)
    return p, trainer.init(p)

  method = "apts-o2" if second_order else "apts-o1"
  return Program(method, devices, compiled, fresh, trainer.shard_batch, stats)


def dp_program(spec: Spec, devices: int, name: str) -> Program:
  """Compiles one data-parallel ``optax.<name>`` step (learning rate in the state) on a mesh."""
  loss = models.cross_entropy_loss(spec.module)
  mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
  rep, rows_sh = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  tx = optax.inject_hyperparams(getattr(optax, name))(learning_rate=1e-3)

  def local(params, opt_state, shard):
    grads = jax.grad(lambda p: jax.lax.pmean(loss(p, shard), "data"))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("data")),
                               out_specs=(P(), P())))
  params = jax.eval_shape(lambda: models.init_params(spec.module, spec.input_dim))
  state = jax.eval_shape(tx.init, params)
  rows = BATCH - BATCH % devices
  batch = (jax.ShapeDtypeStruct((rows, spec.input_dim), np.float32, sharding=rows_sh),
           jax.ShapeDtypeStruct((rows,), np.int32, sharding=rows_sh))
  start = time.perf_counter()
  compiled = step.lower(abstract(params, jax.tree.map(lambda _: rep, params)),
                        abstract(state, jax.tree.map(lambda _: rep, state)), batch).compile()
  stats = hlo_stats(compiled, models.count_params(params))
  stats["compile_s"] = time.perf_counter() - start

  def fresh(seed: int, lr: float = 1e-3) -> tuple[Any, Any]:
    p = jax.device_put(models.init_params(spec.module, spec.input_dim, seed=seed), rep)
    s = optax.inject_hyperparams(getattr(optax, name))(learning_rate=lr).init(p)
    return p, jax.device_put(s, rep)

  shard = lambda b: jax.device_put(data.trim_rows(b, devices), rows_sh)
  return Program(name, devices, compiled, fresh, shard, stats)


def iters_per_epoch(method: str, train_rows: int) -> int:
  """Minibatches per epoch (SAPTS carries 5% of each minibatch over to the next)."""
  return data.num_minibatches(train_rows, BATCH, OVERLAP if method.startswith("apts") else 0.0)


def hlo_table(quick: bool) -> tuple[list[Row], dict[tuple, Program]]:
  """Compiles every configuration; returns the table rows and the MNIST programs (for training)."""
  ns, orders = ((2,), (False,)) if quick else ((2, 4, 8), (False, True))
  rows, keep = [], {}
  for spec in specs(quick):
    for n_dev in ns:
      builders = [(lambda o=o: apts_program(spec, n_dev, o)) for o in orders]
      builders += [(lambda m=m: dp_program(spec, n_dev, m)) for m in ("adam", "sgd")]
      for build in builders:
        prog = build()
        per_epoch = iters_per_epoch(prog.method, spec.train_rows)
        row = {"model": spec.name, "method": prog.method, "N": n_dev, **prog.stats,
               "iters_per_epoch": per_epoch,
               "floats_per_epoch": per_epoch * prog.stats["floats_per_iter"],
               "floats_per_epoch_full_batch": prog.stats["floats_per_iter"]}
        rows.append(row)
        log(f"[hlo] {spec.name} {prog.method} N={n_dev}: {row['floats_per_iter']:,} floats/iter "
            f"({row['per_n']:.4f} n), {row['calls_per_iter']} all-reduces, {row['in_loop']} in "
            f"loops ({row['in_local_loop']} in the local loop), compiled in "
            f"{prog.stats['compile_s']:.1f} s")
        if row["in_local_loop"] or (row["in_loop"] and not prog.method.startswith("apts")):
          log(f"[hlo] ANOMALY: all-reduce inside a loop for {prog.method} N={n_dev}")
        if spec.name == "mnist" and prog.method != "sgd":
          keep[(prog.method, n_dev)] = prog
  return rows, keep


def run_epochs(prog: Program, fresh: tuple[Any, Any], ds: datasets.Dataset, spec: Spec,
               epochs: int, label: str, overlap: float) -> list[Row]:
  """Trains with one compiled step; one row per epoch (test accuracy, cumulative floats, passes)."""
  params, state = fresh
  floats, iters, passes_mean, passes_max, out = 0, 0, 0.0, 0.0, []
  is_apts = prog.method.startswith("apts")
  for epoch in range(epochs):
    start, local = time.perf_counter(), []
    for mb in data.iterate_minibatches((ds.x_train, ds.y_train), BATCH, overlap=overlap,
                                       epoch=epoch):
      params, state = prog.compiled(params, state, prog.shard(mb))
      # a copy: the next step donates (deletes) this state
      local.append(jnp.copy(state.local_steps) if is_apts else None)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    iters += len(local)
    floats += len(local) * prog.stats["floats_per_iter"]
    if is_apts:
      steps = np.stack([np.asarray(jax.device_get(s)) for s in local])
      passes_mean += float(np.sum(2 + GLOBAL_STEPS + steps.mean(axis=1)))
      passes_max += float(np.sum(2 + GLOBAL_STEPS + steps.max(axis=1)))
    else:
      passes_mean, passes_max = passes_mean + len(local), passes_max + len(local)
    acc = models.accuracy(spec.module, jax.device_get(params), ds.x_test, ds.y_test)
    out.append({"run": label, "method": prog.method, "N": prog.devices, "epoch": epoch + 1,
                "iterations": iters, "floats": floats, "bytes": 4 * floats, "test_acc": acc,
                "passes_mean_local": passes_mean, "passes_max_local": passes_max,
                "epoch_s": seconds})
    log(f"[train] {label} epoch {epoch + 1}: test acc {100 * acc:.2f}%, "
        f"{4 * floats / 1e6:.1f} MB all-reduced, {seconds:.1f} s")
  return out


def train_all(progs: dict[tuple, Program], quick: bool, epochs: int, budget_s: float
              ) -> tuple[list[Row], list[str]]:
  """Adam sweep, then APTS runs in priority order while the time budget lasts."""
  spec, ds = specs(True)[0], datasets.load_mnist5k()
  adam = progs[("adam", 2)]
  lrs = (1e-3,) if quick else ADAM_LRS
  runs: list[tuple[str, Program, Callable[[], Any], float]] = [
      (f"adam lr={lr:g}", adam, (lambda lr=lr: adam.fresh(0, lr)), 0.0) for lr in lrs]
  order = [("apts-o1", 2), ("apts-o1", 4), ("apts-o2", 2), ("apts-o2", 4), ("apts-o1", 8),
           ("apts-o2", 8)]
  runs += [(f"{m} N={n}", progs[(m, n)], (lambda p=progs[(m, n)]: p.fresh(0)), OVERLAP)
           for m, n in order if (m, n) in progs]
  rows, skipped, start = [], [], time.perf_counter()
  for label, prog, fresh, overlap in runs:
    if time.perf_counter() - start > budget_s and not label.startswith("adam"):
      skipped.append(label)
      log(f"[train] {label}: skipped (time budget of {budget_s / 60:.0f} min spent)")
      continue
    rows += run_epochs(prog, fresh(), ds, spec, epochs, label, overlap)
  return rows, skipped


def target_table(rows: list[Row]) -> tuple[list[Row], float, Row]:
  """Bytes to first reach the target for each run; the target and the best Adam run."""
  runs = list(dict.fromkeys(r["run"] for r in rows))
  best = {run: max((r for r in rows if r["run"] == run), key=lambda r: r["test_acc"])
          for run in runs}
  adam_best = max((best[r] for r in runs if r.startswith("adam")), key=lambda r: r["test_acc"])
  target = adam_best["test_acc"] - TARGET_DROP
  out = []
  for run in runs:
    hit = next((r for r in rows if r["run"] == run and r["test_acc"] >= target - 1e-12), None)
    last = [r for r in rows if r["run"] == run][-1]
    out.append({"run": run, "best_acc": best[run]["test_acc"], "target": target,
                "epoch": hit["epoch"] if hit else None, "bytes": hit["bytes"] if hit else None,
                "passes": hit["passes_mean_local"] if hit else None,
                "passes_per_epoch": last["passes_mean_local"] / last["epoch"],
                "passes_max_per_epoch": last["passes_max_local"] / last["epoch"],
                "epoch_s": sum(r["epoch_s"] for r in rows if r["run"] == run) / last["epoch"]})
  ref = next(r for r in out if r["run"] == adam_best["run"])
  for r in out:
    r["adam_over_this"] = (ref["bytes"] / r["bytes"]) if r["bytes"] and ref["bytes"] else None
  return out, target, ref


def allreduce_seconds(calls: int, floats: float, devices: int, gbps: float,
                      alpha_s: float = ALPHA_S) -> float:
  """Ring all-reduce time of one iteration: ``calls`` x alpha + 2 (N-1)/N x bytes / bandwidth.

  Args:
    calls: all-reduce calls per iteration (each pays the latency alpha).
    floats: float32 elements all-reduced per iteration, over all calls.
    devices: N, the devices in the ring.
    gbps: the link bandwidth in Gb/s.
    alpha_s: the latency per call in seconds.

  Returns:
    Seconds per iteration.
  """
  return calls * alpha_s + 2 * (devices - 1) / devices * 4 * floats / (gbps * 1e9 / 8)


def model_table(hlo: list[Row], targets: list[Row], adam_run: str) -> list[Row]:
  """Ring all-reduce time per epoch: sum over calls of alpha + 2 (N-1)/N bytes / B.

  The CPU compute column is the measured training time per epoch (MNIST only; Adam's from its
  run on 2 devices, used for every N since its total work does not depend on N).
  """
  out = []
  for h in hlo:
    if h["method"] == "sgd":
      continue
    calls, floats, n_dev = h["calls_per_iter"], h["floats_per_iter"], h["N"]
    comm_s = {g: h["iters_per_epoch"] * allreduce_seconds(calls, floats, n_dev, g) for g in GBPS}
    run = f"{h['method']} N={n_dev}" if h["method"].startswith("apts") else adam_run
    cpu = next((t["epoch_s"] for t in targets if t["run"] == run and h["model"] == "mnist"), None)
    row = {"model": h["model"], "method": h["method"], "N": n_dev,
           "iters_per_epoch": h["iters_per_epoch"], "calls_per_epoch": calls * h["iters_per_epoch"],
           "cpu_compute_s": cpu}
    for g in GBPS:
      row[f"comm_ms_{g}G"] = 1e3 * comm_s[g]
      row[f"total_s_{g}G"] = None if cpu is None else cpu + comm_s[g]
    out.append(row)
  return out


def paper_name(row: Row) -> str:
  """The paper benchmark's name of a run's method (its style in the figures): "Adam", or
  "SAPTS N=2 o1" for "apts-o1" on 2 devices (minibatches with overlap)."""
  if row["method"] == "adam":
    return "Adam"
  return f"SAPTS N={row['N']} {row['method'].split('-')[-1]}"


def plot(rows: list[Row], target: float, path: Path) -> None:
  """Test accuracy vs cumulative all-reduced bytes (log x), one line per run, each method in
  its colour and marker of every benchmark figure (``benchmarks.common.style``)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(8, 5.5))
  adam_runs = sorted({r["run"] for r in rows if r["method"] == "adam"})
  for run in dict.fromkeys(r["run"] for r in rows):
    sel = [r for r in rows if r["run"] == run]
    extra = {"linestyle": ("--", ":", "-.", (0, (5, 1)))[adam_runs.index(run) % 4]
             } if run in adam_runs else {}  # the learning rates of one method, by line style
    plot_method(ax, [r["bytes"] for r in sel], [100 * r["test_acc"] for r in sel],
                paper_name(sel[0]), label=run, ms=3, **extra)
  ax.axhline(100 * target, color="k", lw=0.8, ls=":", label=f"target {100 * target:.2f}%")
  ax.set(xscale="log", xlabel="cumulative all-reduced bytes (float32, per device's view)",
         ylabel="test accuracy (%)", title=f"MNIST-5k, {BATCH}-row minibatches")
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


HLO_COLS = (("model", "model", ""), ("n", "n", ","), ("method", "method", ""), ("N", "N", ""),
            ("floats/iter", "floats_per_iter", ","), ("/ n", "per_n", ".4f"),
            ("calls/iter", "calls_per_iter", ""), ("in loop", "in_loop", ""),
            ("in local loop", "in_local_loop", ""),
            ("iters/epoch", "iters_per_epoch", ""), ("floats/epoch", "floats_per_epoch", ","),
            ("floats/epoch full batch", "floats_per_epoch_full_batch", ","),
            ("compile s", "compile_s", ".1f"))
TARGET_COLS = (("run", "run", ""), ("best test acc", "best_acc", ".4f"),
               ("epoch reached", "epoch", ""), ("bytes to target", "bytes", ",.0f"),
               ("Adam-best bytes / this", "adam_over_this", ".2f"),
               ("passes/epoch (mean local)", "passes_per_epoch", ".1f"),
               ("passes/epoch (max local)", "passes_max_per_epoch", ".1f"),
               ("CPU s/epoch", "epoch_s", ".2f"))


def report(hlo: list[Row], train: list[Row], skipped: list[str], out: Path) -> str:
  """Writes the CSVs and the plot; returns the Markdown report."""
  targets, target, ref = target_table(train)
  lat = model_table(hlo, targets, ref["run"])
  for name, rows in (("hlo", hlo), ("training", train), ("target", targets), ("latency", lat)):
    write_csv(rows, out / f"{name}.csv")
  plot(train, target, out / "accuracy_vs_bytes.png")
  lat_cols = (("model", "model", ""), ("method", "method", ""), ("N", "N", ""),
              ("iters/epoch", "iters_per_epoch", ""), ("all-reduces/epoch", "calls_per_epoch", ""))
  lat_cols += tuple((f"comm ms @{g} Gb/s", f"comm_ms_{g}G", ".3f") for g in GBPS)
  lat_cols += (("CPU compute s", "cpu_compute_s", ".2f"),)
  lat_cols += tuple((f"total s @{g} Gb/s", f"total_s_{g}G", ".2f") for g in GBPS)
  apts = [t for t in targets if t["run"].startswith("apts")]
  met = [t["run"] for t in apts if t["adam_over_this"] and t["adam_over_this"] >= 3]
  lines = ["## All-reduced floats per iteration (compiled HLO)", markdown_table(hlo, HLO_COLS),
           "", f"## Bytes to target on MNIST-5k (target {100 * target:.2f}% = best Adam "
           f"({ref['run']}, {100 * ref['best_acc']:.2f}%) - 0.5 points)",
           markdown_table(targets, TARGET_COLS, NOT_REACHED), "",
           f"## Latency-bandwidth model (ring all-reduce, alpha = {ALPHA_S * 1e6:.0f} us per "
           "call; CPU compute = measured here, all N simulated devices on 2 cores)",
           markdown_table(lat, lat_cols), "",
           "Goal (APTS >= 3x fewer bytes than Adam at its best learning rate): "
           + (f"MET by {', '.join(met)}." if met else "NOT MET by any APTS run.")]
  if skipped:
    lines.append(f"Skipped for the time budget: {', '.join(skipped)}.")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Row]:
  """Runs the benchmark; returns the per-epoch training rows."""
  simulate_host_devices(HOST_DEVICES)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny smoke version")
  parser.add_argument("--out", default="results/communication", help="output directory")
  parser.add_argument("--epochs", type=int, help="training epochs (default 15, quick 1)")
  parser.add_argument("--budget-min", type=float, default=12.0,
                      help="APTS runs start only within this many minutes of training")
  args = parser.parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  epochs = args.epochs or (1 if args.quick else 15)
  log(f"communication on {len(jax.devices())} {jax.devices()[0].platform} devices, "
      f"jax {jax.__version__}")
  hlo, progs = hlo_table(args.quick)
  train, skipped = train_all(progs, args.quick, epochs, 60 * args.budget_min)
  log("\n" + report(hlo, train, skipped, out))
  log(f"\nWrote {out}/{{hlo,training,target,latency}}.csv and accuracy_vs_bytes.png")
  return train


if __name__ == "__main__":
  main()
