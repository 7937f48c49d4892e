"""Cost of `lsr1.update` + `obs.solve` against a memory-bandwidth floor and MLP training passes.

For each parameter count n and memory k (float32, params = one flat vector of n), a FULL L-SR1
state is built (k pairs y = A s for a random symmetric A = diag(d) + U diag(w) U^T, every slot in
use), then, jitted, with compile time reported apart from the median of timed repeats:

* `lsr1.update` of one new pair (the ring wraps), and `obs.solve` at a radius that puts the step
  on the boundary, and their sum;
* the floor: one jitted pass that only reads the 2 k n stored floats; the faster of
  sum(S) + sum(Y) and (S v, Y v). obs.solve is reported in units of it ("passes");
* peak memory from the compiled executables' `memory_analysis()`.

References: one jitted forward+backward (`jax.value_and_grad` of the loss) of the MNIST MLP on
1,000 and 10,000 samples and of the CIFAR MLP on 10,000. Targets: at n = 1.8e6,
k = 10, obs.solve <= 10 passes (stretch goal: 5) and < 10% of the CIFAR fwd+bwd (stretch: MNIST).
Outputs: core_cost.csv, reference.csv, core_cost.png.

Vmapped (``--parts stacked``): ``jax.vmap`` of `lsr1.update` and `obs.solve` over N stacked
full memories (N independent problems, built under ``jax.vmap``: the layout ``aptsjax.apts``
keeps its subdomains' memories in), N in {1, 2, 6}, n in {5.4e5, 1.8e6}, k in {5, 10, 20}; one
pass = one read of the N stacks of 2 k n floats, timed in the same process.
Output: core_cost_stacked.csv.

Profile (``--parts profile``, `benchmarks.apts_profile`): the pieces of one APTS iteration of
the paper MLP (N = 2, nu = 5, 1,000 rows, memory 10) for both orders, in ms and in gradient
evaluations, and compile times at the XLA flags of the process (this module sets none).
Outputs: apts_profile.csv, compile_times.csv and, with the vmapped part, core_cost_apts.png.

Run from the repository root:
``python -m benchmarks.core_cost [--quick] [--out DIR] [--parts table stacked profile]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from aptsjax import _stack, lsr1, obs
from benchmarks import apts_profile, models
from benchmarks.timing import MEMORY_KEYS, Row, time_jitted, write_csv

FULL_NS = (10_000, 100_000, 540_000, 1_800_000)
FULL_MEMORIES = (1, 5, 10, 20)
QUICK_NS = (1_000,)
QUICK_MEMORIES = (2,)
STACKED_NS = (540_000, 1_800_000)
STACKED_MEMORIES = (5, 10, 20)
STACKED_SUBDOMAINS = (1, 2, 6)
QUICK_SUBDOMAINS = (2,)
FLOOR_REPEATS = 30
PARTS = ("table", "stacked", "profile")
TARGET = (1_800_000, 10)
RANK = 4  # rank of the low-rank part of A.


def make_problem(n: int, memory: int, seed: int = 0, num: int | None = None
                 ) -> tuple[Any, ...]:
  """Returns ``(state, s_new, y_new, grad, radius)`` with a full state (all k slots in use).

  One jitted build: k pairs y = A s, A = diag(d) + U diag(w) U^T, pushed with `lsr1.update`.
  With ``num`` = N, N independent problems are built under ``jax.vmap`` (every leaf gains a
  leading axis N: the stacked memories of N subdomains, as ``aptsjax.apts`` holds them).
  """
  def build(key: jax.Array) -> tuple[Any, ...]:
    kd, ku, kw, kg, kp = jax.random.split(key, 5)
    d = jax.random.uniform(kd, (n,), jnp.float32, 0.5, 2.0)
    u = jax.random.normal(ku, (n, RANK), jnp.float32) / np.sqrt(n)
    w = jax.random.uniform(kw, (RANK,), jnp.float32, 1.0, 10.0)
    keys = jax.random.split(kp, memory + 1)

    def pair(i: jax.Array) -> tuple[jax.Array, jax.Array]:
      s = jax.random.normal(keys[i], (n,), jnp.float32)
      return s, d * s + u @ (w * (u.T @ s))

    state = jax.lax.fori_loop(0, memory, lambda i, st: lsr1.update(st, *pair(i)),
                              lsr1.init(jnp.zeros((n,), jnp.float32), memory))
    grad = jax.random.normal(kg, (n,), jnp.float32)
    radius = 1e-3 * jnp.linalg.norm(grad)  # far inside |B^-1 g| >= |g| / lam_max: boundary.
    return state, *pair(memory), grad, radius

  key = jax.random.key(seed)
  if num is None:
    state, s_new, y_new, grad, radius = jax.jit(build)(key)
  else:
    state, s_new, y_new, grad, radius = jax.jit(jax.vmap(build))(jax.random.split(key, num))
  if not (bool(jnp.all(state.count == memory)) and bool(jnp.all(state.in_use))):
    print(f"  WARNING: state not full (count {state.count}, in_use {state.in_use})", flush=True)
  return state, s_new, y_new, grad, radius


def floor_sum(s: jax.Array, y: jax.Array) -> jax.Array:
  """One read of both stacks: sum(S) + sum(Y)."""
  return jnp.sum(s) + jnp.sum(y)


def floor_matvec(s: jax.Array, y: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One read of both stacks: (S v, Y v)."""
  return s @ v, y @ v


def measure_config(n: int, memory: int, budget_s: float) -> Row:
  """Times update, solve and the two floors for one (n, memory)."""
  state, s_new, y_new, grad, radius = make_problem(n, memory)
  max_repeats = 50 if n <= 100_000 else 10
  upd, _ = time_jitted(lsr1.update, (state, s_new, y_new), budget_s, max_repeats)
  sol, result = time_jitted(obs.solve, (grad, state, radius), budget_s, max_repeats)
  f_sum, _ = time_jitted(floor_sum, (state.s, state.y), budget_s, 2 * max_repeats)
  f_mv, _ = time_jitted(floor_matvec, (state.s, state.y, grad), budget_s, 2 * max_repeats)
  floor = min(f_sum["ms"], f_mv["ms"])
  return {
      "n": n, "memory": memory, "in_use": int(jnp.sum(state.in_use)),
      "on_boundary": bool(result.on_boundary),
      "update_ms": upd["ms"], "solve_ms": sol["ms"], "sum_ms": upd["ms"] + sol["ms"],
      "floor_sum_ms": f_sum["ms"], "floor_matvec_ms": f_mv["ms"],
      "floor_ms": floor, "solve_passes": sol["ms"] / floor,
      "sum_passes": (upd["ms"] + sol["ms"]) / floor,
      "update_compile_s": upd["compile_s"], "solve_compile_s": sol["compile_s"],
      "update_repeats": upd["repeats"], "solve_repeats": sol["repeats"],
      **{f"update_{k}_mib": upd[k] for k in MEMORY_KEYS},
      **{f"solve_{k}_mib": sol[k] for k in MEMORY_KEYS},
  }


def measure_stacked(num: int, n: int, memory: int, budget_s: float) -> Row:
  """Times ``jax.vmap`` of update and solve over N full memories, in ms and in passes.

  One pass = one read of the N stacks of 2 k n floats (the faster of the two floors, on the
  same stacked arrays, in the same process).
  """
  state, s_new, y_new, grad, radius = make_problem(n, memory, num=num)
  max_repeats = 10 if num * n <= 1_000_000 else 3
  upd, _ = time_jitted(jax.vmap(lsr1.update), (state, s_new, y_new), budget_s, max_repeats)
  sol, result = time_jitted(jax.vmap(obs.solve), (grad, state, radius), budget_s, max_repeats)
  # The floor is cheap and its noise enters every ratio: repeat it more.
  f_sum, _ = time_jitted(floor_sum, (state.s, state.y), budget_s, FLOOR_REPEATS)
  f_mv, _ = time_jitted(jax.vmap(floor_matvec), (state.s, state.y, grad), budget_s,
                        FLOOR_REPEATS)
  floor = min(f_sum["ms"], f_mv["ms"])
  del state, s_new, y_new, grad
  return {
      "N": num, "n": n, "memory": memory, "stored_mib": 2 * num * memory * n * 4 / 2**20,
      "on_boundary": bool(jnp.all(result.on_boundary)),
      "update_ms": upd["ms"], "solve_ms": sol["ms"], "floor_ms": floor,
      "update_passes": upd["ms"] / floor, "solve_passes": sol["ms"] / floor,
      "sum_passes": (upd["ms"] + sol["ms"]) / floor,
      "update_peak_mib": upd["peak"], "solve_peak_mib": sol["peak"],
      "update_temp_mib": upd["temp"], "solve_temp_mib": sol["temp"],
      "update_compile_s": upd["compile_s"], "solve_compile_s": sol["compile_s"],
      "repeats": upd["repeats"],
  }


def markdown_stacked(rows: list[Row]) -> str:
  """The vmapped (N stacked memories) measurements as a Markdown table."""
  lines = ["| N | n | k | stored MiB | update ms | solve ms | floor ms | update passes | "
           "solve passes | update+solve passes | update peak MiB | solve peak MiB | "
           "compile s (upd/solve) |", "|" + "---|" * 13]
  lines += [f"| {r['N']} | {r['n']:,} | {r['memory']} | {r['stored_mib']:.0f} | "
            f"{fmt(r['update_ms'])} | {fmt(r['solve_ms'])} | {fmt(r['floor_ms'], 3)} | "
            f"{fmt(r['update_passes'], 1)} | {fmt(r['solve_passes'], 1)} | "
            f"{fmt(r['sum_passes'], 1)} | {fmt(r['update_peak_mib'], 0)} | "
            f"{fmt(r['solve_peak_mib'], 0)} | {fmt(r['update_compile_s'], 1)}/"
            f"{fmt(r['solve_compile_s'], 1)} |" for r in rows]
  return "\n".join(lines)


def measure_references(rows: tuple[int, int, int], budget_s: float) -> list[Row]:
  """Times one jitted forward+backward of the MNIST and CIFAR MLPs on random inputs.

  Parameters and inputs are numpy random draws of the right shapes (the values do not change
  the cost; this skips Flax's eager init).
  """
  rng = np.random.default_rng(0)
  specs = (("MNIST MLP", models.mnist_mlp(), 784, rows[0]),
           ("MNIST MLP", models.mnist_mlp(), 784, rows[1]),
           ("CIFAR MLP", models.cifar_mlp(), 3072, rows[2]))
  out = []
  for name, model, dim, count in specs:
    shapes = jax.eval_shape(lambda m=model, d=dim: models.init_params(m, d))
    params = jax.tree.map(
        lambda x: jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype), shapes)
    batch = (jnp.asarray(rng.standard_normal((count, dim)), jnp.float32),
             jnp.asarray(rng.integers(0, 10, count), jnp.int32))
    t, _ = time_jitted(jax.value_and_grad(models.cross_entropy_loss(model)), (params, batch),
                       budget_s, 20)
    out.append({"model": name, "n": models.count_params(params), "samples": count,
                "ms": t["ms"], "compile_s": t["compile_s"], "peak_mib": t["peak"]})
    print(f"  reference {name} on {count:,} samples: {t['ms']:.2f} ms", flush=True)
  return out


def breakdown(n: int, memory: int, budget_s: float) -> list[tuple[str, float]]:
  """Times the pieces of obs.solve at one size (where the passes go)."""
  state, _, _, grad, radius = make_problem(n, memory)
  s, y = state.s, state.y
  coef = jnp.eye(memory, dtype=jnp.float32)
  ma = jax.jit(obs.solve).lower(grad, state, radius).compile().memory_analysis()
  print(f"\nobs.solve memory_analysis() at n={n:,}, k={memory}: {ma}", flush=True)
  two_k = jnp.ones((2 * memory,), jnp.float32)
  pieces = (("obs.solve (total)", obs.solve, (grad, state, radius)),
            ("lsr1.spectral (O(k^3), inside solve)", lsr1.spectral, (state,)),
            ("lsr1.pair_dot: [S Y]^T g (one read of S, Y)", lsr1.pair_dot, (state, grad)),
            ("lsr1.pair_combine: [S Y] c (one read, writes n)", lsr1.pair_combine, (state, two_k)),
            ("_stack.gram(S, Y) (re-orthogonalization only)", _stack.gram, (s, y)),
            ("_stack.combine_matrix(S, C) (re-orthogonalization only)", _stack.combine_matrix,
             (s, coef)),
            ("floor: sum(S) + sum(Y)", floor_sum, (s, y)))
  return [(name, time_jitted(fn, args, budget_s, 10)[0]["ms"]) for name, fn, args in pieces]


def fmt(x: float | None, digits: int = 2) -> str:
  """Formats a number for the Markdown table ('n/a' for None)."""
  return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(rows: list[Row], refs: list[Row]) -> str:
  """The results as Markdown tables (cost per configuration, then the references)."""
  ref_ms = [r["ms"] for r in refs]
  head = ("| n | k | update ms | solve ms | sum ms | floor ms | solve passes | "
          "sum passes | solve % " + " | solve % ".join(f"{r['model'].split()[0]} {r['samples']}"
                                                      for r in refs)
          + " | update peak MiB | solve peak MiB | solve temp MiB | compile s (upd/solve) |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    pct = " | ".join(fmt(100 * r["solve_ms"] / m, 1) for m in ref_ms)
    lines.append(
        f"| {r['n']:,} | {r['memory']} | {fmt(r['update_ms'])} | {fmt(r['solve_ms'])} | "
        f"{fmt(r['sum_ms'])} | {fmt(r['floor_ms'], 3)} | "
        f"{fmt(r['solve_passes'], 1)} | {fmt(r['sum_passes'], 1)} | {pct} | "
        f"{fmt(r['update_peak_mib'], 1)} | {fmt(r['solve_peak_mib'], 1)} | "
        f"{fmt(r['solve_temp_mib'], 1)} | {fmt(r['update_compile_s'], 1)}/"
        f"{fmt(r['solve_compile_s'], 1)} |")
  lines += ["", "| reference fwd+bwd | n | samples | ms | peak MiB |", "|---|---|---|---|---|"]
  lines += [f"| {r['model']} | {r['n']:,} | {r['samples']:,} | {fmt(r['ms'])} | "
            f"{fmt(r['peak_mib'], 1)} |" for r in refs]
  return "\n".join(lines)


def verdict(rows: list[Row], refs: list[Row]) -> str:
  """The targets at (n, k) = TARGET, against the measured floor and references."""
  hits = [r for r in rows if (r["n"], r["memory"]) == TARGET]
  if not hits:
    return f"Verdict: target configuration n={TARGET[0]:,}, k={TARGET[1]} not measured."
  r = hits[0]
  ok = lambda c: "MET" if c else "MISSED"
  lines = [f"Verdict at n = {r['n']:,}, memory = {r['memory']} (float32, jitted):",
           f"- obs.solve = {r['solve_ms']:.2f} ms = {r['solve_passes']:.1f} memory passes "
           f"(floor {r['floor_ms']:.3f} ms): <= 10 passes (target) "
           f"{ok(r['solve_passes'] <= 10)}; <= 5 passes (stretch) {ok(r['solve_passes'] <= 5)}."]
  for ref in refs:
    if ref["samples"] >= 10_000:
      pct = 100 * r["solve_ms"] / ref["ms"]
      lines.append(f"- obs.solve = {pct:.1f}% of {ref['model']} fwd+bwd on {ref['samples']:,} "
                   f"samples ({ref['ms']:.1f} ms): < 10% {ok(pct < 10)}.")
  lines.append(f"- update + solve = {r['sum_ms']:.2f} ms ({r['sum_passes']:.1f} passes).")
  return "\n".join(lines)


def plot(rows: list[Row], refs: list[Row], path: Path) -> None:
  """Log-log time vs n per memory: solve (solid), update (dashed), floor (dotted)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(8, 5.5))
  for i, k in enumerate(sorted({r["memory"] for r in rows})):
    sel = sorted((r for r in rows if r["memory"] == k), key=lambda r: r["n"])
    ns, color = [r["n"] for r in sel], f"C{i}"
    ax.plot(ns, [r["solve_ms"] for r in sel], "o-", color=color, label=f"obs.solve, k={k}")
    ax.plot(ns, [r["update_ms"] for r in sel], "s--", color=color, alpha=0.6,
            label=f"lsr1.update, k={k}")
    ax.plot(ns, [r["floor_ms"] for r in sel], ":", color=color, label=f"1 pass floor, k={k}")
  for j, ref in enumerate(refs):
    ax.axhline(ref["ms"], color="0.5", lw=0.8, ls=("-", "--", "-.")[j % 3],
               label=f"{ref['model']} fwd+bwd, {ref['samples']:,} samples")
  ax.set(xscale="log", yscale="log", xlabel="n (parameters)", ylabel="time (ms, median)",
         title=f"L-SR1 update / OBS solve cost, float32, {jax.devices()[0].platform}")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run_table(args: argparse.Namespace, out: Path, budget_s: float) -> list[Row]:
  """The single-memory table, the references and their outputs (core_cost.csv/png)."""
  ns = args.ns or (QUICK_NS if args.quick else FULL_NS)
  memories = args.memories or (QUICK_MEMORIES if args.quick else FULL_MEMORIES)
  rows = [measure_config(n, k, budget_s) for n, k in tqdm(
      [(n, k) for n in ns for k in memories], desc="single memory", file=sys.stdout)]
  refs = measure_references((64, 128, 128) if args.quick else (1_000, 10_000, 10_000), budget_s)
  write_csv(rows, out / "core_cost.csv")
  write_csv(refs, out / "reference.csv")
  plot(rows, refs, out / "core_cost.png")
  print("\n" + markdown(rows, refs) + "\n\n" + verdict(rows, refs), flush=True)
  if not args.quick and not args.no_breakdown:
    parts = breakdown(*TARGET, budget_s)
    print(f"\nWhere obs.solve's time goes at n={TARGET[0]:,}, k={TARGET[1]} (passes: of the "
          "last line):\n| piece | ms | passes |\n|---|---|---|\n"
          + "\n".join(f"| {p} | {ms:.2f} | {ms / parts[-1][1]:.1f} |" for p, ms in parts),
          flush=True)
  return rows


def run_stacked(args: argparse.Namespace, out: Path, budget_s: float) -> list[Row]:
  """update and solve vmapped over N stacked memories (core_cost_stacked.csv)."""
  quick = args.quick
  configs = [(num, n, k) for n in (QUICK_NS if quick else STACKED_NS)
             for k in (QUICK_MEMORIES[:1] if quick else STACKED_MEMORIES)
             for num in (QUICK_SUBDOMAINS if quick else STACKED_SUBDOMAINS)]
  rows = [measure_stacked(*c, budget_s) for c in tqdm(configs, desc="vmapped memories",
                                                       file=sys.stdout)]
  write_csv(rows, out / "core_cost_stacked.csv")
  print("\nupdate and solve vmapped over N full memories (passes: of the N stacks):\n"
        + markdown_stacked(rows), flush=True)
  return rows


def main(argv: Sequence[str] | None = None) -> dict[str, list[Row]]:
  """Runs the benchmark; returns the rows of each part that ran (``table``, ``stacked``, ...)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny smoke version")
  parser.add_argument("--out", default="results/core_cost", help="output directory")
  parser.add_argument("--ns", type=int, nargs="+", help="override the sizes n of the table")
  parser.add_argument("--memories", type=int, nargs="+", help="override the memories k")
  parser.add_argument("--no-breakdown", action="store_true", help="skip the solve breakdown")
  parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                      help="what to run (default: all)")
  args = parser.parse_args(argv)
  budget_s = 0.2 if args.quick else 0.5
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  print(f"core_cost on {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), "
        f"jax {jax.__version__}", flush=True)
  results: dict[str, list[Row]] = {}
  if "table" in args.parts:
    results["table"] = run_table(args, out, budget_s)
  if "stacked" in args.parts:
    results["stacked"] = run_stacked(args, out, budget_s)
  if "profile" in args.parts:
    config = apts_profile.QUICK_PROFILE if args.quick else apts_profile.PROFILE
    # The pieces are differenced: four times the budget of the other parts.
    pieces, compiles, info = apts_profile.run(4 * budget_s, 2 if args.quick else 10, config,
                                              progress=tqdm.write)
    write_csv(pieces, out / "apts_profile.csv")
    write_csv(compiles, out / "compile_times.csv")
    print("\n" + apts_profile.markdown(pieces, compiles, info), flush=True)
    results["profile"], results["compile"] = pieces, compiles
    if "stacked" in results:
      apts_profile.plot(results["stacked"], pieces, out / "core_cost_apts.png")
  print(f"\nWrote {', '.join(sorted(str(p) for p in out.iterdir()))}")
  return results


if __name__ == "__main__":
  main()
