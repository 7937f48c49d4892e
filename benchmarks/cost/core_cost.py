"""Cost of `lsr1.update` + `obs.solve` against a memory-bandwidth floor and MLP training passes.

For each parameter count n and memory k (float32, params = one flat vector of n), a FULL L-SR1
state is built (k pairs y = A s for a random symmetric A = diag(d) + U diag(w) U^T, every slot in
use), then, jitted, with compile time reported apart from the median of timed repeats:

* `lsr1.update` of one new pair (the ring wraps) as it runs in use: jitted with the state
  donated, each call fed the previous call's output, so that the new pair is written into its
  ring slot in place (in a training loop the state is a carried buffer), compiled with the
  options ``apts_trainer`` uses on CPU (``parallel.CPU_COMPILER_OPTIONS``); and, as an extra
  column (``not donated``), without donation, where XLA copies both stacks on every call;
* `obs.solve` at a radius that puts the step on the boundary, and update + solve;
* the floor: one jitted pass that only reads the 2 k n stored floats; the faster of
  sum(S) + sum(Y) and (S v, Y v);
* peak memory from the compiled executables' `memory_analysis()`.

"Passes" are counted three ways, each over the stored 2 k n floats (the N stacks when vmapped):

* ``passes``: the time in units of the floor (what it costs here, timing noise included);
* ``HLO passes``: the full reads and full-size writes of S and Y in the optimized HLO of the
  executable, over two (`aptsjax.tools.traffic`; a deterministic count: the update reads
  the pairs twice, the solve three times), with ``update_copies_stack`` True where the donated
  update writes a full copy of a stack instead of updating its ring slot in place;
* ``XLA bytes passes``: XLA's ``cost_analysis()["bytes accessed"]`` over the stored bytes
  (deterministic too; it also counts every n-vector the executable reads and writes, and, on
  CPU, a fused in-place scatter as a full read and write of its stack).

References: one jitted forward+backward (`jax.value_and_grad` of the loss) of the MNIST MLP on
1,000 and 10,000 samples and of the CIFAR MLP on 10,000. Targets: at n = 1.8e6,
k = 10, obs.solve <= 10 passes (stretch goal: 5) and < 10% of the CIFAR fwd+bwd (stretch: MNIST).
Outside ``--quick``, a breakdown times the passes update and solve are built of (`pair_dots` of
1 and 2 vectors, `pair_combine` of 1 and 2 columns) against the floor.
Outputs: core_cost.csv, reference.csv, core_cost.png (tables: `benchmarks.cost.report`).

Vmapped (``--parts stacked``): ``jax.vmap`` of `lsr1.update` and `obs.solve` over N stacked
full memories (N independent problems, built under ``jax.vmap``: the layout ``aptsjax.apts``
keeps its subdomains' memories in), N in {1, 2, 6}, n in {535,818 (the paper's MNIST MLP),
1.8e6}, k in {5, 10, 20}, the same columns; the floor is timed on the same stacked arrays in
the same process. Output: core_cost_stacked.csv, and a verdict on update and solve <= 3 HLO
passes with no copy of a stack.

Profile (``--parts profile``, `benchmarks.cost.apts_profile`): the pieces of one APTS iteration of
the paper MLP (N = 2, nu = 5, 1,000 rows, memory 10) for both orders, in ms and in gradient
evaluations, and compile times at the XLA flags of the process (this module sets none).
Outputs: apts_profile.csv, compile_times.csv and, with the vmapped part, core_cost_apts.png.

Run from the repository root: ``python -m benchmarks.cost [--quick] [--out DIR]
[--parts table stacked profile] [--ns N ...] [--memories K ...] [--subdomains N ...]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aptsjax import lsr1, obs
from aptsjax.tools import traffic
from benchmarks.common import models
from benchmarks.common.output import Row, log, write_csv
from benchmarks.common.progress import track
from benchmarks.cost import apts_profile
from benchmarks.cost import report
from benchmarks.cost.timing import (MEMORY_KEYS, bytes_accessed, compile_jitted, memory_stats,
                                    time_compiled, time_donated, time_jitted)

FULL_NS = (10_000, 100_000, 535_818, 1_800_000)
FULL_MEMORIES = (1, 5, 10, 20)
QUICK_NS = (1_000,)
QUICK_MEMORIES = (3,)  # not 1 or 2: see aptsjax.tools.traffic
STACKED_NS = (535_818, 1_800_000)  # 535,818: the paper's MNIST MLP
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


def time_core(problem: tuple[Any, ...], batched: bool, budget_s: float, max_repeats: int,
              floor_repeats: int) -> tuple[Row, Any]:
  """Times update, solve and the floor on one problem and counts their passes; consumes it.

  ``lsr1.update`` is timed jitted with its state donated, each call fed the previous output (as
  a training loop carries it, so the ring insert is in place), and, as an extra column, without
  donation (XLA then copies both stacks). The passes are the time over the floor's, XLA's
  ``bytes accessed`` over the stored bytes, and the full reads and writes of the stacks in the
  optimized HLO (``aptsjax.tools.traffic``); ``update_copies_stack`` is True where the donated update's
  HLO writes a full-size array from a stack other than in place.

  Args:
    problem: ``make_problem``'s output; its state's buffers are donated (unusable afterwards).
    batched: whether the problem is N stacked memories (``jax.vmap`` of everything).
    budget_s: rough time budget per timed function.
    max_repeats: the most repeats of update and solve.
    floor_repeats: the most repeats of each floor (cheap, and its noise enters every ratio).

  Returns:
    The measurements, and the ``obs.OBSResult`` of the solve.
  """
  state, s_new, y_new, grad, radius = problem
  wrap = jax.vmap if batched else (lambda fn: fn)
  shape = tuple(state.s.shape)
  stored = 2 * float(np.prod(shape)) * state.s.dtype.itemsize
  undonated, _ = time_jitted(wrap(lsr1.update), (state, s_new, y_new), budget_s, max_repeats)
  solve_args = (grad, state, radius)
  solve_c, solve_compile_s = compile_jitted(wrap(obs.solve), solve_args)
  sol, result = time_compiled(solve_c, solve_args, budget_s, max_repeats)
  f_sum, _ = time_jitted(floor_sum, (state.s, state.y), budget_s, floor_repeats)
  f_mv, _ = time_jitted(wrap(floor_matvec), (state.s, state.y, grad), budget_s, floor_repeats)
  floor = min(f_sum["ms"], f_mv["ms"])
  # With the state donated, XLA's CPU fusion emitters were seen to hang in the vmapped update at
  # N = 6, memory 20 (jax 0.10.2): it is compiled with the options the trainer uses on CPU.
  upd, upd_c, _ = time_donated(wrap(lsr1.update), (state, s_new, y_new), budget_s, max_repeats,
                               apts_profile.trainer_options())
  upd_hlo = traffic.stack_traffic(upd_c, shape)
  sol_hlo = traffic.stack_traffic(solve_c, shape)
  per_stored = lambda b: None if b is None else b / stored
  sol.update(compile_s=solve_compile_s, **memory_stats(solve_c))
  return {
      "update_ms": upd["ms"], "update_undonated_ms": undonated["ms"], "solve_ms": sol["ms"],
      "sum_ms": upd["ms"] + sol["ms"], "floor_sum_ms": f_sum["ms"],
      "floor_matvec_ms": f_mv["ms"], "floor_ms": floor,
      "update_passes": upd["ms"] / floor, "update_undonated_passes": undonated["ms"] / floor,
      "solve_passes": sol["ms"] / floor, "sum_passes": (upd["ms"] + sol["ms"]) / floor,
      "update_bytes_passes": per_stored(bytes_accessed(upd_c)),
      "solve_bytes_passes": per_stored(bytes_accessed(solve_c)),
      "update_hlo_passes": upd_hlo.passes, "solve_hlo_passes": sol_hlo.passes,
      "update_copies_stack": upd_hlo.copies > 0,
      "update_compile_s": upd["compile_s"], "update_undonated_compile_s": undonated["compile_s"],
      "solve_compile_s": sol["compile_s"], "update_repeats": upd["repeats"],
      "solve_repeats": sol["repeats"],
      **{f"update_{k}_mib": upd[k] for k in MEMORY_KEYS},
      **{f"solve_{k}_mib": sol[k] for k in MEMORY_KEYS},
  }, result


def measure_config(n: int, memory: int, budget_s: float) -> Row:
  """Times update, solve and the two floors for one (n, memory)."""
  problem = make_problem(n, memory)
  in_use = int(jnp.sum(problem[0].in_use))
  max_repeats = 50 if n <= 100_000 else 10
  row, result = time_core(problem, False, budget_s, max_repeats, 2 * max_repeats)
  return {"n": n, "memory": memory, "in_use": in_use,
          "on_boundary": bool(result.on_boundary), **row}


def measure_stacked(num: int, n: int, memory: int, budget_s: float) -> Row:
  """Times ``jax.vmap`` of update and solve over N full memories, in ms and in passes.

  One pass = one read of the N stacks of 2 k n floats (the faster of the two floors, on the
  same stacked arrays, in the same process).
  """
  problem = make_problem(n, memory, num=num)
  max_repeats = 10 if num * n <= 1_000_000 else 3
  row, result = time_core(problem, True, budget_s, max_repeats, FLOOR_REPEATS)
  del problem
  return {"N": num, "n": n, "memory": memory, "stored_mib": 2 * num * memory * n * 4 / 2**20,
          "on_boundary": bool(jnp.all(result.on_boundary)), **row}


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
  """Times update, solve and the passes over the pairs they are built of, at one size.

  The last piece is the floor (one read of the stored pairs); the update is timed donated.
  """
  state, s_new, y_new, grad, radius = make_problem(n, memory)
  ma = jax.jit(obs.solve).lower(grad, state, radius).compile().memory_analysis()
  print(f"\nobs.solve memory_analysis() at n={n:,}, k={memory}: {ma}", flush=True)
  one, two = jnp.ones((2 * memory, 1), jnp.float32), jnp.ones((2 * memory, 2), jnp.float32)
  dots = lambda st, *v: lsr1.pair_dots(st, list(v))
  pieces = (("obs.solve (total; reads the pairs 3 times)", obs.solve, (grad, state, radius)),
            ("lsr1.pair_dots: [S Y]^T g (1 vector; solve pass 1)", dots, (state, grad)),
            ("lsr1.pair_dots: [S Y]^T [s y] (2 vectors; the update's reads)", dots,
             (state, grad, s_new)),
            ("lsr1.pair_combine: [S Y] c (1 column; solve passes 2 and 3)", lsr1.pair_combine,
             (state, one)),
            ("lsr1.pair_combine: [S Y] C (2 columns)", lsr1.pair_combine, (state, two)),
            ("floor: sum(S) + sum(Y)", floor_sum, (state.s, state.y)))
  times = [(name, time_jitted(fn, args, budget_s, 10)[0]["ms"]) for name, fn, args in pieces]
  update, _, _ = time_donated(lsr1.update, (state, s_new, y_new), budget_s, 10,
                              apts_profile.trainer_options())  # consumes state
  return [("lsr1.update, donated (reads the pairs twice)", update["ms"])] + times


def run_table(args: argparse.Namespace, out: Path, budget_s: float) -> list[Row]:
  """The single-memory table, the references and their outputs (core_cost.csv/png)."""
  ns = args.ns or (QUICK_NS if args.quick else FULL_NS)
  memories = args.memories or (QUICK_MEMORIES if args.quick else FULL_MEMORIES)
  rows = [measure_config(n, k, budget_s) for n, k in track(
      [(n, k) for n in ns for k in memories], "single memory")]
  refs = measure_references((64, 128, 128) if args.quick else (1_000, 10_000, 10_000), budget_s)
  write_csv(rows, out / "core_cost.csv")
  write_csv(refs, out / "reference.csv")
  report.plot(rows, refs, out / "core_cost.png")
  print("\n" + report.markdown(rows, refs) + "\n\n" + report.verdict(rows, refs, TARGET),
        flush=True)
  if not args.quick and not args.no_breakdown:
    print("\n" + report.markdown_breakdown(breakdown(*TARGET, budget_s), *TARGET), flush=True)
  return rows


def run_stacked(args: argparse.Namespace, out: Path, budget_s: float) -> list[Row]:
  """update and solve vmapped over N stacked memories (core_cost_stacked.csv)."""
  quick = args.quick
  configs = [(num, n, k) for n in args.ns or (QUICK_NS if quick else STACKED_NS)
             for k in args.memories or (QUICK_MEMORIES if quick else STACKED_MEMORIES)
             for num in args.subdomains or (QUICK_SUBDOMAINS if quick else STACKED_SUBDOMAINS)]
  rows = [measure_stacked(*c, budget_s) for c in track(configs, "vmapped memories")]
  write_csv(rows, out / "core_cost_stacked.csv")
  print("\nupdate and solve vmapped over N full memories (passes: of the N stacks):\n"
        + report.markdown_stacked(rows) + "\n\n" + report.verdict_stacked(rows), flush=True)
  return rows


def main(argv: Sequence[str] | None = None) -> dict[str, list[Row]]:
  """Runs the benchmark; returns the rows of each part that ran (``table``, ``stacked``, ...)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny smoke version")
  parser.add_argument("--out", default="results/core_cost", help="output directory")
  parser.add_argument("--ns", type=int, nargs="+", help="override the sizes n (both parts)")
  parser.add_argument("--memories", type=int, nargs="+",
                      help="override the memories k (both parts)")
  parser.add_argument("--subdomains", type=int, nargs="+",
                      help="override the numbers N of vmapped memories")
  parser.add_argument("--no-breakdown", action="store_true",
                      help="skip the update and solve breakdown")
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
                                              progress=log)
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
