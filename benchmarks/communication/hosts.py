"""Communication of data-parallel APTS vs data-parallel Adam across processes (multi-host).

The multi-process version of ``benchmarks.communication.communication``, on one global mesh over every
process's devices (D = ``jax.device_count()``, N = D subdomains):

1. HLO: all-reduced floats and calls per iteration of the compiled APTS step (first and second
   order, SAPTS layout, 660-row minibatch, 5% overlap) and of data-parallel Adam, the bytes each
   process sends and receives per iteration, and the processes the all-reduce groups span.
2. Measured (MNIST-5k): median seconds per iteration across the processes on real minibatches.
3. A latency-bandwidth model per epoch for H hosts (ring all-reduce), with a compute term scaled
   from (2), and the break-even number of Adam steps one APTS iteration must be worth.

    python -m aptsjax.parallel.launch --num-processes 2 --devices-per-process 2 -- \\
        python -m benchmarks.communication.hosts [--quick] [--out results/communication_hosts]

It also runs as one process (processes = 1). Only process 0 prints and writes files.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from aptsjax import data, distributed
from aptsjax.tools import comm
from benchmarks.common import datasets, models
from benchmarks.common.devices import simulate_host_devices
from benchmarks.common.output import Row, log, markdown_table, write_csv
from benchmarks.communication import communication as cb

HOSTS = (2, 8, 64)


def replica_groups(compiled: Any) -> Row:
  """Which processes every all-reduce group spans (ids index the mesh's devices, in order)."""
  mesh = next(s.mesh for s in jax.tree.leaves(compiled.input_shardings)
              if isinstance(s, NamedSharding))
  devices = list(mesh.devices.flat)
  groups = [g for per_call in comm.device_groups(compiled, ("all-reduce",), len(devices))
            for g in per_call]
  procs = sorted({devices[i].process_index for g in groups for i in g})
  full = bool(groups) and all(sorted(g) == list(range(len(devices))) for g in groups)
  return {"replica_groups": " ".join(sorted({str(g).replace(" ", "") for g in groups})),
          "all_devices_in_group": full, "group_processes": "+".join(map(str, procs))}


def hlo_section(quick: bool, topo: Row) -> tuple[list[Row], dict[str, cb.Program]]:
  """Compiles every program on the global mesh; the rows and the MNIST programs (for timing)."""
  n_dev, rows, keep = topo["devices"], [], {}
  orders = (False,) if quick else (False, True)
  for spec in cb.specs(quick):
    builders = [(lambda o=o, s=spec: cb.apts_program(s, n_dev, o)) for o in orders]
    builders.append(lambda s=spec: cb.dp_program(s, n_dev, "adam"))
    for build in builders:
      prog = build()
      row = {"model": spec.name, "method": prog.method, **topo, "N": n_dev, **prog.stats,
             "bytes_per_iter_per_process": 4 * prog.stats["floats_per_iter"],
             "iters_per_epoch": cb.iters_per_epoch(prog.method, spec.train_rows),
             **replica_groups(prog.compiled)}
      rows.append(row)
      log(f"[hlo] {spec.name} {prog.method} D={n_dev}: {row['floats_per_iter']:,} floats/iter "
          f"({row['per_n']:.6f} n) in {row['calls_per_iter']} all-reduces, "
          f"{row['in_local_loop']} in the local loop, groups {row['replica_groups']} on "
          f"processes {row['group_processes']}, compiled in {row['compile_s']:.1f} s")
      if spec.name == "mnist":
        keep[prog.method] = prog
  return rows, keep


def minibatches(ds: datasets.Dataset, overlap: float) -> Iterator[Any]:
  """Endless SAPTS minibatches of the training set, epoch after epoch."""
  epoch = 0
  while True:
    yield from data.iterate_minibatches((ds.x_train, ds.y_train), cb.BATCH, overlap=overlap,
                                        epoch=epoch)
    epoch += 1


def gather(x: Any) -> np.ndarray:
  """Every process's values (host arrays) or the global value (sharded arrays), flattened."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True)).reshape(-1)


def time_program(prog: cb.Program, ds: datasets.Dataset, iters: int, topo: Row) -> Row:
  """Median seconds per step over ``iters`` steps after one warm-up step, all processes pooled.

  Batches are placed before the clock starts; the clock stops when this process's shards of the
  new parameters and state are ready (the step's all-reduces keep the processes in step).
  """
  is_apts = prog.method.startswith("apts")
  batches = minibatches(ds, cb.OVERLAP if is_apts else 0.0)
  params, state = prog.fresh(0)
  times, steps = [], []
  for i in range(iters + 1):
    batch = jax.block_until_ready(prog.shard(next(batches)))
    start = time.perf_counter()
    params, state = jax.block_until_ready(prog.compiled(params, state, batch))
    if i:
      times.append(time.perf_counter() - start)
      if is_apts:
        steps.append(gather(state.local_steps))
  pooled = gather(np.asarray(times))
  row = {"model": "mnist", "method": prog.method, **topo, "N": prog.devices,
         "iterations": iters, "median_s": float(np.median(pooled)), "min_s": float(pooled.min()),
         "max_s": float(pooled.max()),
         "mean_local_steps": float(np.mean(steps)) if steps else None}
  log(f"[measured] {prog.method}: median {row['median_s'] * 1e3:.1f} ms/iter over {iters} "
      "iterations" + (f", {row['mean_local_steps']:.2f} local steps" if steps else ""))
  return row


def ring_s(hosts: int, gbps: float, calls: float, floats: float) -> float:
  """Ring all-reduce time of ``calls`` calls moving ``floats`` float32 in all across ``hosts``."""
  return (2 * (hosts - 1) * cb.ALPHA_S * calls
          + 2 * (hosts - 1) / hosts * 4 * floats / (gbps * 1e9 / 8))


def volumes(hlo: list[Row], quick: bool) -> list[tuple[cb.Spec, Row, Row, str]]:
  """Per model: (spec, APTS volume, Adam volume, source) from the HLO rows or 4n+4 / n."""
  out = []
  for spec in cb.specs(False):
    rows = {r["method"]: r for r in hlo if r["model"] == spec.name}
    if "apts-o1" in rows and "adam" in rows:
      out.append((spec, rows["apts-o1"], rows["adam"], "compiled HLO"))
      continue
    n = models.count_params(jax.eval_shape(lambda s=spec: models.init_params(s.module,
                                                                             s.input_dim)))
    out.append((spec, {"n": n, "floats_per_iter": 4 * n + 4, "calls_per_iter": 4},
                {"n": n, "floats_per_iter": n, "calls_per_iter": 1},
                "formula 4n+4 in 4 calls / n in 1 (not compiled" + (" in quick mode)" if quick
                                                                     else ")")))
  return out


def model_section(hlo: list[Row], measured: list[Row], topo: Row, quick: bool) -> list[Row]:
  """Time per epoch per (model, H, Gb/s): comm from the volumes, compute scaled from (2)."""
  meas = {r["method"]: r["median_s"] for r in measured}
  out = []
  for spec, apts, adam, source in volumes(hlo, quick):
    it_apts = cb.iters_per_epoch("apts", spec.train_rows)
    it_adam = cb.iters_per_epoch("adam", spec.train_rows)
    for hosts in HOSTS:
      scale = topo["processes"] / hosts

      def compute(method: str) -> float | None:
        return meas[method] * scale if spec.name == "mnist" and method in meas else None

      for gbps in cb.GBPS:
        c_apts = ring_s(hosts, gbps, apts["calls_per_iter"], apts["floats_per_iter"])
        c_adam = ring_s(hosts, gbps, adam["calls_per_iter"], adam["floats_per_iter"])
        t_adam = c_adam + (compute("adam") or 0.0)
        row = {"model": spec.name, "n": apts["n"], **topo, "H": hosts, "gbps": gbps,
               "adam_iters_per_epoch": it_adam, "apts_iters_per_epoch": it_apts,
               "adam_comm_ms": 1e3 * it_adam * c_adam, "apts_comm_ms": 1e3 * it_apts * c_apts,
               "comm_ratio": (it_apts * c_apts) / (it_adam * c_adam),
               "compute_included": compute("adam") is not None, "adam_total_s": it_adam * t_adam}
        for m in ("apts-o1", "apts-o2"):
          k = m.replace("-", "_")
          has = compute(m) is not None or compute("adam") is None
          t_apts = c_apts + (compute(m) or 0.0)
          row[f"{k}_total_s"] = it_apts * t_apts if has else None
          row[f"breakeven_{k}"] = t_apts / t_adam if has else None
        row["volume_source"] = source
        out.append(row)
  return out


def _span(values: list[float]) -> str:
  """'a' or 'a to b' (two decimals)."""
  lo, hi = min(values), max(values)
  return f"{lo:.2f}" if hi - lo < 5e-3 else f"{lo:.2f} to {hi:.2f}"


def verdict(model: list[Row], measured: list[Row]) -> str:
  """The closing sentences, computed from the model table and the measured local steps."""
  wins = [r for r in model if r["apts_comm_ms"] < r["adam_comm_ms"]]
  keys = ("breakeven_apts_o1", "breakeven_apts_o2")
  be = [r[k] for r in model for k in keys if r[k] is not None]
  be_comm = [r["breakeven_apts_o1"] for r in model if not r["compute_included"]]
  text = f"Verdict: at the same {cb.BATCH}-row minibatch APTS's exchanges win "
  if wins:
    text += ("at " + ", ".join(f"{r['model']} H={r['H']} {r['gbps']} Gb/s" for r in wins)
             + f" and lose in the other {len(model) - len(wins)} configurations")
  else:
    text += (f"at no host count and network speed modelled (H = {', '.join(map(str, HOSTS))} "
             f"at {' and '.join(map(str, cb.GBPS))} Gb/s, {len(model)} configurations)")
  text += (f": per epoch they take {_span([r['comm_ratio'] for r in model])}x Adam's "
           "communication time (4n+4 floats in 4 all-reduces per iteration vs n in 1). APTS wins "
           f"at equal time only if one APTS iteration is worth more than {_span(be)} Adam steps "
           "(break-even, all rows" + (f"; {_span(be_comm)} on communication alone" if be_comm
                                      else "") + ").")
  steps = [r for r in measured if r["mean_local_steps"] is not None]
  if not steps:
    return text
  worth = max(r["mean_local_steps"] for r in steps) + cb.GLOBAL_STEPS
  above = [(r, k) for r in model for k in keys if r[k] is not None and worth > r[k]]
  return text + (
      f" Measured here, the local phase stops after {_span([r['mean_local_steps'] for r in steps])}"
      f" local steps on average (of {cb.LOCAL_STEPS} allowed); counting each local and global "
      f"trust-region step as one Adam step (a rough equivalence), an APTS iteration is worth "
      f"about {worth:.2f} steps, above {len(above)} of the {len(be)} break-even values"
      + (" (" + ", ".join(f"{r['model']} H={r['H']} {r['gbps']} Gb/s {k[-2:]}" for r, k in above)
         + ")" if above else "") + ".")


HLO_COLS = (("model", "model", ""), ("method", "method", ""), ("processes", "processes", ""),
            ("D = N", "devices", ""), ("n", "n", ","), ("floats/iter", "floats_per_iter", ","),
            ("/ n", "per_n", ".6f"), ("calls/iter", "calls_per_iter", ""),
            ("in local loop", "in_local_loop", ""),
            ("bytes/iter/process", "bytes_per_iter_per_process", ","),
            ("replica groups", "replica_groups", ""), ("processes in group", "group_processes", ""),
            ("compile s", "compile_s", ".1f"))
MEAS_COLS = (("method", "method", ""), ("processes", "processes", ""), ("D", "devices", ""),
             ("iterations", "iterations", ""), ("median ms/iter", "median_s", ".1f"),
             ("min ms", "min_s", ".1f"), ("max ms", "max_s", ".1f"),
             ("mean local steps", "mean_local_steps", ".2f"))
MODEL_COLS = (("model", "model", ""), ("H", "H", ""), ("Gb/s", "gbps", ""),
              ("Adam comm ms/epoch", "adam_comm_ms", ".2f"),
              ("APTS comm ms/epoch", "apts_comm_ms", ".2f"), ("ratio", "comm_ratio", ".2f"),
              ("Adam total s/epoch", "adam_total_s", ".3f"),
              ("APTS-o1 total s/epoch", "apts_o1_total_s", ".3f"),
              ("APTS-o2 total s/epoch", "apts_o2_total_s", ".3f"),
              ("break-even o1", "breakeven_apts_o1", ".2f"),
              ("break-even o2", "breakeven_apts_o2", ".2f"))


def summary(topo: Row, hlo: list[Row], measured: list[Row], model: list[Row]) -> str:
  """The Markdown report."""
  spans = all(r["all_devices_in_group"] for r in hlo)
  procs = sorted({r["group_processes"] for r in hlo})
  ms = [{**r, **{k: 1e3 * r[k] for k in ("median_s", "min_s", "max_s")}} for r in measured]
  sources = sorted({f"{r['model']}: {r['volume_source']}" for r in model})
  return "\n".join([
      f"# Communication across processes ({topo['processes']} process(es) x "
      f"{topo['local_devices']} devices = {topo['devices']} devices, {topo['platform']}, "
      f"jax {jax.__version__})", "",
      "## All-reduces per iteration (compiled HLO, global mesh, N = D subdomains)",
      markdown_table(hlo, HLO_COLS), "",
      f"Every process contributes and receives the full vector: bytes/iter/process = 4 x floats. "
      f"All-reduce replica groups {'contain all' if spans else 'do NOT all contain all'} "
      f"{topo['devices']} mesh devices and span processes {', '.join(procs)}.", "",
      f"## Measured on MNIST-5k ({cb.BATCH}-row minibatches, after one warm-up step, all "
      "processes' iterations pooled; on localhost this is mostly compute)",
      markdown_table(ms, MEAS_COLS), "",
      f"## Latency-bandwidth model per epoch (ring all-reduce across H hosts: per call "
      f"2(H-1) alpha + 2(H-1)/H bytes / bandwidth, alpha = {cb.ALPHA_S * 1e6:.0f} us)",
      f"Assumption: compute per iteration at H hosts = measured time per iteration at "
      f"{topo['processes']} process(es) x {topo['processes']}/H (each host processes 1/H of the "
      "minibatch); where nothing was measured (CIFAR) totals and break-even are communication "
      "only. Break-even = APTS time per iteration / Adam time per iteration = the Adam steps one "
      "APTS iteration must be worth to win at equal time. Volumes: " + "; ".join(sources) + ".",
      markdown_table(model, MODEL_COLS), "", verdict(model, measured)])


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the benchmark on every process; process 0 writes the CSVs and summary.md."""
  simulate_host_devices(cb.HOST_DEVICES)
  distributed.initialize()
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="MNIST, first order + Adam, 3 iters")
  parser.add_argument("--out", default="results/communication_hosts", help="output directory")
  parser.add_argument("--iters", type=int, help="timed iterations (default 20, quick 3)")
  args = parser.parse_args(argv)
  topo = {"processes": jax.process_count(), "devices": jax.device_count(),
          "local_devices": jax.local_device_count(), "platform": jax.devices()[0].platform}
  log(f"communication_hosts: {topo['processes']} processes, {topo['devices']} devices "
      f"({topo['local_devices']} per process), jax {jax.__version__}")
  start = time.perf_counter()
  hlo, progs = hlo_section(args.quick, topo)
  ds = datasets.load_mnist5k()
  iters = args.iters or (3 if args.quick else 20)
  measured = [time_program(progs[m], ds, iters, topo) for m in ("apts-o1", "apts-o2", "adam")
              if m in progs]
  model = model_section(hlo, measured, topo, args.quick)
  text = summary(topo, hlo, measured, model)
  if distributed.is_main_process():
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("hlo", hlo), ("measured", measured), ("model", model)):
      write_csv(rows, out / f"{name}.csv")
    (out / "summary.md").write_text(text + "\n")
    log("\n" + text + f"\n\nWrote {out}/{{hlo,measured,model}}.csv and summary.md "
        f"in {time.perf_counter() - start:.0f} s")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
