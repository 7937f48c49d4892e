"""Tables, the latency-bandwidth model and the plot of ``benchmarks.communication.mesh``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aptsjax.tools import comm
from benchmarks.common.output import Row
from benchmarks.communication.communication import ALPHA_S, GBPS

_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
             "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}

MEMORY_COLS = (("variant", "variant", ""), ("order", "order", ""), ("D", "D", ""),
               ("M", "M", ""), ("n", "n", ","), ("params B/device", "param_bytes", ","),
               ("state B/device", "state_bytes", ","), ("total B/device", "total_bytes", ","),
               ("replicated (M=1) B", "replicated_bytes", ","), ("ratio", "ratio", ".3f"),
               ("ideal 1/M", "ideal", ".3f"))
COMM_COLS = (("variant", "variant", ""), ("order", "order", ""), ("D", "D", ""), ("M", "M", ""),
             ("n/device", "n_per_device", ","), ("data floats/iter", "data_floats", ","),
             ("data / (n/M)", "data_per_n", ".4f"),
             ("data in local loop", "data_in_local_loop", ""),
             ("both axes floats", "both_axes_floats", ","),
             ("model fwd/bwd floats/iter", "model_iter", ","),
             ("+ per local step", "model_local", ","), ("ref floats/eval", "ref_per_eval", ","),
             ("evals/iter", "evals_iter", ".1f"), ("evals/local step", "evals_local", ".1f"),
             ("optimizer model-axis floats/iter", "opt_iter", ","),
             ("+ per local step", "opt_local", ","),
             ("largest optimizer part", "opt_max_part", ","),
             ("optimizer calls/iter", "opt_calls", ","), ("large gathers", "large_gathers", ""),
             ("from library", "large_from_library", ""), ("compile s", "compile_s", ".1f"))
FLAG_COLS = (("variant", "variant", ""), ("order", "order", ""), ("M", "M", ""),
             ("kind", "kind", ""), ("elements", "elements", ","), ("trips", "trips", ""),
             ("from", "from", ""), ("op_name", "op_name", ""), ("source (innermost first)",
                                                             "source", ""))


def wire_bytes(r: comm.Collective) -> float:
  """Bytes one device sends for a collective (ring algorithms; g devices per group)."""
  size = sum(int(np.prod(s)) * _ITEMSIZE.get(d, 4) for s, d in zip(r.shapes, r.dtypes))
  g = r.group_size
  factor = {"all-reduce": 2 * (g - 1) / g, "all-gather": (g - 1) / g,
            "reduce-scatter": g - 1, "all-to-all": (g - 1) / g,
            "collective-permute": 1.0 if g > 1 else 0.0}[r.kind]
  return factor * size


def latency_row(row: Row, records: list[comm.Collective], local_steps: int,
                model_gbytes: float) -> Row:
  """Communication time per iteration: sum over calls of alpha + wire bytes / bandwidth.

  The data axis at each of ``GBPS`` (Gb/s, inter-node), the model axis at ``model_gbytes``
  GB/s (intra-node); a collective over both axes goes at the data axis's bandwidth. The local
  loop (unknown trip count) is counted at ``local_steps`` runs.
  """
  calls = {"data": 0, "model": 0}
  volume = {"data": 0.0, "model": 0.0}
  for r in records:
    if not r.axes:
      continue
    axis = "model" if r.axes == ("model",) else "data"
    runs = local_steps if r.trips is None else r.trips
    calls[axis] += runs
    volume[axis] += runs * wire_bytes(r)
  out = {k: row[k] for k in ("variant", "order", "D", "M")}
  out.update(data_calls=calls["data"], data_mb=volume["data"] / 1e6, model_calls=calls["model"],
             model_mb=volume["model"] / 1e6)
  model_s = calls["model"] * ALPHA_S + volume["model"] / (model_gbytes * 1e9)
  out["model_ms"] = 1e3 * model_s
  for g in GBPS:
    data_s = calls["data"] * ALPHA_S + volume["data"] / (g * 1e9 / 8)
    out[f"data_ms_{g}G"] = 1e3 * data_s
    out[f"total_ms_{g}G"] = 1e3 * (data_s + model_s)
  return out


def latency_cols() -> tuple:
  """Columns of the latency table."""
  cols = (("variant", "variant", ""), ("order", "order", ""), ("D", "D", ""), ("M", "M", ""),
          ("data calls", "data_calls", ""), ("data MB sent", "data_mb", ".3f"),
          ("model calls", "model_calls", ""), ("model MB sent", "model_mb", ".3f"))
  cols += tuple((f"data ms @{g} Gb/s", f"data_ms_{g}G", ".3f") for g in GBPS)
  cols += (("model ms", "model_ms", ".3f"),)
  cols += tuple((f"total ms @{g} Gb/s", f"total_ms_{g}G", ".3f") for g in GBPS)
  return cols


def plot_memory(rows: list[Row], path: Path) -> None:
  """Bars of per-device MiB against M, one group per (variant, order); the ideal 1/M dashed."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = [r for r in rows if r["D"] == max(x["D"] for x in rows)]
  ms = sorted({r["M"] for r in rows})
  series = sorted({(r["variant"], r["order"]) for r in rows if r["M"] > 1})
  fig, ax = plt.subplots(figsize=(7, 4.5))
  width = 0.8 / max(len(series), 1)
  for i, (variant, order) in enumerate(series):
    sel = {r["M"]: r for r in rows if r["order"] == order and r["variant"] in (variant,
                                                                               "replicated")}
    xs = [j + i * width for j, m in enumerate(ms) if m in sel]
    ax.bar(xs, [sel[m]["total_bytes"] / 2**20 for m in ms if m in sel], width,
           label=f"{variant}, order {order}", color=f"C{i}")
    base = sel[1]["total_bytes"] / 2**20 if 1 in sel else None
    if base:
      ax.plot(xs, [base / m for m in ms if m in sel], "k_", ms=14, mew=2)
  ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(ms))],
                [f"M={m}" for m in ms])
  ax.set(ylabel="MiB per device (params + optimizer state)",
         title=f"APTS on a D={rows[0]['D']} x M mesh (black: replicated / M)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
