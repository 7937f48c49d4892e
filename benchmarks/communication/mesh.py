"""APTS on a data x model mesh: per-device memory and the collectives of each axis.

For an MLP whose parameters are sharded over the model axis (tensor parallel: first kernel by
columns, second by rows; FSDP: every kernel by its first dimension), APTS first and second order
with N = D subdomains on a D x M mesh (``aptsjax.parallel.apts_trainer(model_devices=M)``):

1. Per-device bytes of the parameters and the optimizer state (the shards of device 0, the
   largest over devices) for M = 1, 2, 4: about 1/M of the replicated figure.
2. Collectives per iteration per mesh axis, read off the compiled step
   (``aptsjax.tools.comm.collective_stats``; nothing is run): floats all-reduced over the data axis
   (4 n/M per device + O(1)), and over the model axis split into the model's own (matched
   against a plain jitted ``value_and_grad`` of the same loss on the same mesh) and the
   optimizer's rest (inner products: O(k^2) per call, never n-sized). All-gathers and
   all-to-alls above 16 k^2 elements are listed with their JAX operation and source, marked
   "model" when the reference evaluation has one of the same kind and size, else "library"
   (innermost source in aptsjax) or "other".
3. A latency-bandwidth model of the communication time per iteration, with an inter-node
   bandwidth for the data axis and an intra-node one (NVLink) for the model axis.

Run from the repository root: ``python -m benchmarks.communication.mesh [--quick] [--out DIR]``
(8 simulated host devices on a CPU unless ``XLA_FLAGS`` sets a count).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from aptsjax import parallel
from aptsjax.tools import comm
from benchmarks.common import models
from benchmarks.common.devices import simulate_host_devices
from benchmarks.common.output import Row, log, markdown_table, write_csv
from benchmarks.communication.communication import ALPHA_S, GBPS, HOST_DEVICES
from benchmarks.communication.mesh_report import (COMM_COLS, FLAG_COLS, MEMORY_COLS, latency_cols,
                                                  latency_row, plot_memory)

ROWS = 660            # rows of the batch (one minibatch of benchmarks.communication.communication)
MEMORY = 10           # L-SR1 memory k of the second-order runs
LOCAL_STEPS = 5       # aptsjax.apts default: the local loop runs at most this often
MODEL_GBYTES_S = 900  # model-axis (intra-node, NVLink-class) bandwidth, GB/s
LARGE = 16 * MEMORY ** 2   # an all-gather / all-to-all above this many elements is listed
FLAG_KEYS = ("variant", "order", "M", "kind", "elements", "trips", "from", "op_name", "source")


class Setup(NamedTuple):
  """One benchmark configuration."""
  variant: str          # "tp" or "fsdp" ("replicated" at M = 1)
  second_order: bool
  data: int             # D
  model: int            # M


def tp_specs(params: Any, m: int) -> Any:
  """Tensor parallel: kernel 0 by columns (and its bias), kernel 1 by rows, the rest replicated."""
  del m
  specs = jax.tree.map(lambda _: P(), params)
  specs["dense_0"] = {"kernel": P(None, "model"), "bias": P("model")}
  specs["dense_1"] = {"kernel": P("model", None), "bias": P()}
  return specs


def fsdp_specs(params: Any, m: int) -> Any:
  """FSDP: every leaf sharded on its first dimension where M divides it, else replicated."""
  return jax.tree.map(lambda x: P("model") if np.shape(x)[0] % m == 0 else P(), params)


SPECS = {"tp": tp_specs, "fsdp": fsdp_specs}


def trainer_for(setup: Setup, module: Any, params: Any) -> parallel.Trainer:
  """The APTS trainer of a configuration (N = D subdomains)."""
  loss = models.cross_entropy_loss(module)
  specs = SPECS[setup.variant](params, setup.model) if setup.model > 1 else None
  kwargs = {"second_order": True, "memory": MEMORY} if setup.second_order else {}
  return parallel.apts_trainer(loss, setup.data, num_devices=setup.data,
                               model_devices=setup.model, param_specs=specs, **kwargs)


def device_bytes(tree: Any) -> int:
  """The most bytes any one device holds of the arrays of ``tree`` (their shards there)."""
  per: dict[Any, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
  return max(per.values())


def memory_row(setup: Setup, module: Any, input_dim: int, replicated: dict) -> Row:
  """Per-device bytes of the placed parameters and of ``trainer.init``'s state."""
  params = models.init_params(module, input_dim)
  trainer = trainer_for(setup, module, params)
  placed = trainer.replicate(params)
  state = trainer.init(placed)
  p_bytes, s_bytes = device_bytes(placed), device_bytes(state)
  key = (setup.second_order, setup.data)
  if setup.model == 1:
    replicated[key] = p_bytes + s_bytes
  base = replicated.get(key)
  total = p_bytes + s_bytes
  return {"variant": setup.variant, "order": 2 if setup.second_order else 1, "D": setup.data,
          "M": setup.model, "n": models.count_params(params), "param_bytes": p_bytes,
          "state_bytes": s_bytes, "total_bytes": total, "replicated_bytes": base,
          "ratio": total / base if base else None, "ideal": 1 / setup.model}


def placed_batch(trainer: parallel.Trainer, input_dim: int) -> Any:
  """A random ``ROWS``-row batch laid out and sharded by the trainer."""
  rng = np.random.default_rng(0)
  rows = ROWS - ROWS % trainer.num_subdomains
  return trainer.shard_batch((rng.normal(size=(rows, input_dim)).astype(np.float32),
                              rng.integers(0, 10, rows).astype(np.int32)))


def reference(trainer: parallel.Trainer, module: Any, params: Any, rows: int,
              input_dim: int) -> list[comm.Collective]:
  """Model-axis collectives of one loss-and-gradient evaluation on one replica's rows.

  ``jax.value_and_grad`` of the loss, manual over the data axis like the APTS step (each
  replica evaluates its own rows), gradients placed like the parameters.
  """
  mesh, loss = trainer.mesh, models.cross_entropy_loss(module)
  local = lambda p, b: jax.lax.pmean(jax.value_and_grad(loss)(p, b), "data")
  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data")), out_specs=P(),
                     axis_names={"data"})
  shardings = jax.tree.map(lambda x: x.sharding, params)
  step = jax.jit(fn, out_shardings=(NamedSharding(mesh, P()), shardings))
  rows_sh = NamedSharding(mesh, P("data"))
  batch = (jax.ShapeDtypeStruct((rows, input_dim), np.float32, sharding=rows_sh),
           jax.ShapeDtypeStruct((rows,), np.int32, sharding=rows_sh))
  compiled = step.lower(params, batch).compile()
  return [r for r in comm.collective_stats(compiled, mesh) if r.axes == ("model",)]


def _runs(r: comm.Collective) -> int:
  """Runs per iteration, the local loop (unknown trips) counted at its bound."""
  return LOCAL_STEPS if r.trips is None else r.trips


def split_model_axis(records: list[comm.Collective], ref: list[comm.Collective]
                     ) -> tuple[Row, list[tuple[comm.Collective, int, bool]]]:
  """Model-axis floats per iteration: the model's and the optimizer's, outside the local loop
  and per local step.

  XLA combines small all-reduces with large ones, so each array of a collective is judged on
  its own: it is the model's when the reference evaluation has a collective of the same kind
  with an array of as many elements, the optimizer's otherwise.
  """
  sizes = {(r.kind, int(np.prod(s))) for r in ref for s in r.shapes}
  out = {"model_iter": 0, "model_local": 0, "opt_iter": 0, "opt_local": 0, "opt_max_part": 0,
         "opt_calls": 0}
  parts = []
  for r in records:
    if r.axes != ("model",):
      continue
    own = [int(np.prod(s)) for s in r.shapes]
    model = sum(e for e in own if (r.kind, e) in sizes)
    rest = [e for e in own if (r.kind, e) not in sizes]
    where = "local" if r.trips is None else "iter"
    out[f"model_{where}"] += model * (r.trips or 1)
    out[f"opt_{where}"] += sum(rest) * (r.trips or 1)
    out["opt_max_part"] = max([out["opt_max_part"]] + rest)
    out["opt_calls"] += bool(rest) * _runs(r)
    parts.append((r, sum(rest), model > 0 and not rest))
  return out, parts


def relative(path: str) -> str:
  """A source location relative to the repository (or site-packages)."""
  for marker in ("/aptsjax/", "/benchmarks/", "/site-packages/"):
    if marker in path:
      return path[path.index(marker) + 1:].replace("site-packages/", "")
  return path


def comm_row(setup: Setup, module: Any, input_dim: int) -> tuple[Row, list[Row], list]:
  """Compiles one configuration's step; its per-axis counts and its large gathers."""
  params = models.init_params(module, input_dim)
  trainer = trainer_for(setup, module, params)
  placed = trainer.replicate(params)
  batch = placed_batch(trainer, input_dim)
  start = time.perf_counter()
  compiled = trainer.lower(placed, trainer.init(placed), batch).compile()
  seconds = time.perf_counter() - start
  mesh = trainer.mesh
  records = comm.collective_stats(compiled, mesh)
  local_n = sum(int(np.prod(x.sharding.shard_shape(x.shape))) for x in jax.tree.leaves(placed))
  data = [r for r in records if r.axes == ("data",)]
  row = {"variant": setup.variant, "order": 2 if setup.second_order else 1, "D": setup.data,
         "M": setup.model, "n": models.count_params(params), "n_per_device": local_n,
         "data_floats": sum(r.elements * _runs(r) for r in data),
         "data_in_local_loop": sum(r.trips is None for r in data),
         "both_axes_floats": sum(r.elements * _runs(r) for r in records
                                 if r.axes and len(r.axes) > 1),
         "compile_s": seconds}
  row["data_per_n"] = row["data_floats"] / local_n
  ref = reference(trainer, module, placed, batch[0].shape[0], input_dim) if setup.model > 1 else []
  split, parts = split_model_axis(records, ref)
  per_eval = sum(r.elements for r in ref)
  row.update(split, ref_per_eval=per_eval,
             evals_iter=split["model_iter"] / per_eval if per_eval else None,
             evals_local=split["model_local"] / per_eval if per_eval else None)
  flagged = []
  for r, rest, is_model in parts:
    if r.kind in ("all-gather", "all-to-all") and r.elements > LARGE:
      src = [relative(s) for s in r.source]
      library = bool(src) and src[0].startswith("aptsjax/")
      flagged.append({"variant": setup.variant, "order": row["order"], "M": setup.model,
                      "kind": r.kind, "elements": r.elements, "trips": r.trips,
                      "from": "model" if is_model else "library" if library else "other",
                      "op_name": r.op_name, "source": " < ".join(src[:4])})
  row["large_gathers"] = len(flagged)
  row["large_from_library"] = sum(f["from"] == "library" for f in flagged)
  return row, flagged, records


def setups(quick: bool, devices: int) -> tuple[list[Setup], list[Setup]]:
  """(memory configurations, compiled configurations) that fit ``devices`` devices."""
  variants, orders = (("tp",), (False,)) if quick else (("tp", "fsdp"), (False, True))
  memory, compiled = [], []
  for order in orders:
    for d, ms in ((2, (1, 2, 4)), (1, (1, 4))):
      for m in ms:
        for v in (("replicated",) if m == 1 else variants):
          if d * m <= devices:
            memory.append(Setup(v, order, d, m))
            if d == 2 and (m < 4 or not quick):
              compiled.append(Setup(v, order, d, m))
  return memory, compiled


def main(argv: Sequence[str] | None = None) -> dict[str, list[Row]]:
  """Runs the benchmark; returns its tables (lists of rows) by name."""
  simulate_host_devices(HOST_DEVICES)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="small model, TP, first order")
  parser.add_argument("--out", default="benchmarks/results/mesh", help="output directory")
  parser.add_argument("--model-gbytes", type=float, default=MODEL_GBYTES_S,
                      help="model-axis bandwidth in GB/s (default NVLink-class 900)")
  args = parser.parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  devices = len(jax.devices())
  features, input_dim = ((64, 64, 10), 32) if args.quick else ((512, 512, 10), 784)
  module = models.MLP(features=features)
  log(f"mesh benchmark on {devices} {jax.devices()[0].platform} devices, jax {jax.__version__}; "
      f"MLP {input_dim}-{'-'.join(map(str, features))}, "
      f"n = {models.count_params(models.init_params(module, input_dim)):,}")
  mem_setups, comm_setups = setups(args.quick, devices)
  memory, replicated = [], {}
  for i, s in enumerate(mem_setups, 1):
    memory.append(memory_row(s, module, input_dim, replicated))
    log(f"[memory {i}/{len(mem_setups)}] {s.variant} o{memory[-1]['order']} D={s.data} "
        f"M={s.model}: {memory[-1]['total_bytes'] / 2**20:.2f} MiB per device "
        f"(x{memory[-1]['ratio']:.3f} of replicated)")
  rows, flagged, latency = [], [], []
  for i, s in enumerate(comm_setups, 1):
    row, flags, records = comm_row(s, module, input_dim)
    rows.append(row)
    flagged += flags
    latency.append(latency_row(row, records, LOCAL_STEPS, args.model_gbytes))
    log(f"[collectives {i}/{len(comm_setups)}] {s.variant} o{row['order']} D={s.data} "
        f"M={s.model}: data {row['data_per_n']:.4f} n/M, model-axis optimizer floats "
        f"{row['opt_iter']:,} + {row['opt_local']:,}/local step, compiled in "
        f"{row['compile_s']:.1f} s")
  tables = {"memory": memory, "collectives": rows, "latency": latency, "flagged": flagged}
  for name, table in tables.items():
    if table:
      write_csv(table, out / f"{name}.csv")
  if not flagged:   # a header only: no large gathers found
    (out / "flagged.csv").write_text(",".join(FLAG_KEYS) + "\n")
  plot_memory(memory, out / "memory_vs_M.png")
  text = ["## Per-device bytes of parameters + optimizer state",
          markdown_table(memory, MEMORY_COLS),
          "", "## Collectives per iteration per axis (compiled HLO; local loop at "
          f"{LOCAL_STEPS} steps where a count says 'per local step')",
          markdown_table(rows, COMM_COLS), "",
          f"## All-gathers / all-to-alls above {LARGE} elements (16 k^2, k = {MEMORY})",
          markdown_table(flagged, FLAG_COLS) if flagged else "none", "",
          f"## Latency-bandwidth model per iteration (alpha = {ALPHA_S * 1e6:.0f} us per call; "
          f"data axis {', '.join(f'{g} Gb/s' for g in GBPS)}; model axis "
          f"{args.model_gbytes:g} GB/s)", markdown_table(latency, latency_cols())]
  log("\n" + "\n".join(text))
  log(f"\nWrote {out}/{{{','.join(tables)}}}.csv and memory_vs_M.png")
  return tables


if __name__ == "__main__":
  main()
