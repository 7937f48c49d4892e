"""Per-piece profile of one APTS iteration and compile times, for `benchmarks.cost.core_cost`.

Profile of the paper's method (``aptsjax.APTSConfig.paper()``: local TR, the sum of the local
steps; the paper MLP, N subdomains, nu local steps, memory k, both orders): the trainer of
``aptsjax.parallel.apts_trainer`` (one device) is run for a few warm-up iterations so that the
memories and radius are those of training, then at that point each piece is jitted and timed
on the shapes one iteration uses, through the public pieces (``aptsjax.trust_region.iterate``,
``aptsjax.apts.local_objective``, ``lsr1.update``, ``obs.solve``):

* block gradients: ``jax.vmap`` of value_and_grad over the N blocks;
* one local step: the local TR iteration (solve, trial value_and_grad, update) from theta^k of
  every subdomain, over the subdomains as the trainer's local loop runs them on this backend
  (``aptsjax.local.run``: one after the other on CPU, vmapped elsewhere); counted
  max_i(local steps of subdomain i) times;
* the L-SR1 update and OBS solve alone (local, over the subdomains the same way, and global):
  parts of the local and global steps, shown apart and not added again;
* the trial evaluation at theta^k + s~ (the global value_and_grad) and the APTS pair's global
  memory update;
* the global TR step (``iterate`` on the global objective);
* the whole jitted trainer step; overhead = whole step - the sum of the pieces above.

Each is also given in gradient evaluations: its time over one jitted value_and_grad of the
global loss on the same batch. Compile times are ``jax.jit(f).lower(...).compile()`` wall
times at the XLA flags of the running process (the benchmark sets none).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import aptsjax
from aptsjax import data, lsr1, obs, parallel
from benchmarks.common import datasets, models
from benchmarks.common.output import Row, table_head
from benchmarks.cost.timing import compile_jitted, time_compiled, time_jitted

# The modules: the package attributes ``aptsjax.apts`` and ``aptsjax.trust_region`` are the
# optax transformations of the same names.
apts_lib = importlib.import_module("aptsjax.optim.apts")
tr = importlib.import_module("aptsjax.optim.trust_region")

PROFILE = {"num": 2, "local_steps": 5, "rows": 1_000, "memory": 10, "input_dim": 784,
           "features": (512, 256, 10)}
QUICK_PROFILE = {"num": 2, "local_steps": 2, "rows": 64, "memory": 3, "input_dim": 16,
                 "features": (32, 10)}
PIECE_REPEATS = 30  # the pieces are differenced: repeat them more than the budget asks.
ORDERS = ((False, "first order"), (True, "second order"))


def mlp_problem(rows: int, features: tuple[int, ...] = (512, 256, 10), input_dim: int = 784
                ) -> tuple[Callable[..., jax.Array], Any, Any, str]:
  """``(loss_fn, params, batch, source)``: an MLP with Flax's initial weights and a batch.

  The paper MLP (default) takes the first ``rows`` MNIST-5k training rows when the file is
  there, random inputs of the same shape otherwise; other shapes take random inputs.
  """
  model = models.MLP(features=features)
  params = models.init_params(model, input_dim)
  source = "random"
  try:
    if (input_dim, features[-1]) != (784, 10):
      raise FileNotFoundError
    ds = datasets.load_mnist5k()
    x, y, source = ds.x_train[:rows], ds.y_train[:rows], "MNIST-5k"
  except FileNotFoundError:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, input_dim)).astype(np.float32)
    y = rng.integers(0, features[-1], rows).astype(np.int32)
  return models.cross_entropy_loss(model), params, (jnp.asarray(x), jnp.asarray(y)), source


def _mean(tree: Any) -> Any:
  return jax.tree.map(lambda g: jnp.mean(g, axis=0), tree)


def over_subdomains(fn: Callable[..., Any], in_axes: tuple[int | None, ...]) -> Callable[..., Any]:
  """``fn`` over the subdomain axis as the trainer's local loop runs it on this backend.

  ``jax.lax.map`` (one subdomain after the other) on CPU, ``jax.vmap`` elsewhere; ``in_axes``
  holds 0 for the arguments with a leading subdomain axis and None for the shared ones.
  """
  if jax.default_backend() != "cpu":
    return jax.vmap(fn, in_axes=in_axes)

  def mapped(*args):
    def one(sliced):
      parts = iter(sliced)
      return fn(*[next(parts) if axis == 0 else a for a, axis in zip(args, in_axes)])
    return jax.lax.map(one, [a for a, axis in zip(args, in_axes) if axis == 0])

  return mapped


def piece_functions(loss_fn: Callable[..., jax.Array], num: int) -> dict[str, Callable[..., Any]]:
  """The jittable pieces of one APTS iteration (one device, N = ``num`` subdomains)."""
  hp = aptsjax.APTSConfig.paper().trust_region
  hp_local = hp.scaled(num)

  def block_vg(params, blocks):
    one = lambda blk: jax.value_and_grad(lambda q: tr.scalar_loss(loss_fn, q, blk))(params)
    return jax.vmap(one)(blocks)

  def global_vg(params, blocks):
    losses, grads = block_vg(params, blocks)
    return jnp.mean(losses), _mean(grads)

  def local_step(params, blocks, losses, block_grads, grad, memories, bound):
    def one(blk, loss_i, grad_i, mem):
      f_i = apts_lib.local_objective(loss_fn, blk, params, jax.tree.map(jnp.subtract, grad,
                                                                        grad_i))
      out = tr.iterate(jax.value_and_grad(f_i), params, loss_i, grad, bound, mem, hp_local,
                       step_cap=bound)
      return out.step, jax.tree.map(jnp.subtract, out.grad, grad), out.memory
    return over_subdomains(one, (0, 0, 0, 0))(blocks, losses, block_grads, memories)

  def global_step(params, blocks, loss, grad, radius, memory):
    out = tr.iterate(lambda p: global_vg(p, blocks), params, loss, grad, radius, memory, hp)
    return out.params, out.memory

  return {
      "block_vg": block_vg, "global_vg": global_vg, "local_step": local_step,
      "global_step": global_step,
      "local_update": over_subdomains(lsr1.update, (0, 0, 0)),
      "local_solve": over_subdomains(obs.solve, (None, 0, None)),
      "global_update": lsr1.update, "global_solve": obs.solve,
  }


def trainer_options() -> dict[str, Any]:
  """What a trainer compiles its step with by default (``apts_trainer``'s compiler_options).

  The profile's trainers are built with ``compiler_options={}`` (a nested jit may not have
  options) and their steps compiled by the profile's own ``jax.jit`` with these.

  Returns:
    ``parallel.CPU_COMPILER_OPTIONS`` on the CPU backend, else no options.
  """
  return parallel.CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else {}


def undonated(trainer: parallel.Trainer) -> Callable[..., Any]:
  """``trainer.step`` without its donation, to time it again and again on the same inputs.

  A new function (not ``trainer.step`` itself, whose ``lower`` attribute ``jax.jit`` would carry
  over) calling the step inside the caller's ``jax.jit``, where the inner donation has no effect.
  Compile it with ``trainer_options()``.
  """
  return lambda params, state, batch: trainer.step(params, state, batch)


def _piece(rows: list[Row], order: str, name: str, timing: Row, calls: int, in_sum: bool,
           grad_ms: float) -> None:
  rows.append({"order": order, "piece": name, "ms": timing["ms"], "calls": calls,
               "in_sum": in_sum, "iteration_ms": calls * timing["ms"],
               "grad_evals": calls * timing["ms"] / grad_ms,
               "compile_s": timing.get("compile_s", 0.0)})


def profile_order(second_order: bool, warmup: int, budget_s: float, config: dict[str, int],
                  problem: tuple[Any, ...], gradient: Any) -> tuple[list[Row], Row]:
  """Profiles one order; returns the piece rows and the trainer step's compile/timing row.

  ``gradient`` is the compiled value_and_grad of the global loss; it is timed again here, next
  to the pieces, so that a change in the machine's load between the orders does not enter the
  ratios.
  """
  loss_fn, params, batch, _ = problem
  grad_ms = time_compiled(gradient, (params, batch), budget_s, PIECE_REPEATS)[0]["ms"]
  num, order = config["num"], "second order" if second_order else "first order"
  trainer = parallel.apts_trainer(loss_fn, num, num_devices=1, local_steps=config["local_steps"],
                                  second_order=second_order, memory=config["memory"],
                                  compiler_options={}, base=aptsjax.APTSConfig.paper())
  state, batch = trainer.init(params), trainer.shard_batch(batch)
  step, compile_s = compile_jitted(undonated(trainer), (params, state, batch),
                                   compiler_options=trainer_options())
  for _ in range(warmup):
    params, state = step(params, state, batch)
  whole, (_, after) = time_compiled(step, (params, state, batch), budget_s, PIECE_REPEATS)
  whole["compile_s"] = compile_s
  local_iters = int(np.max(np.asarray(after.local_steps)))

  fns = piece_functions(loss_fn, num)
  blocks = data.split_subdomains(batch, num)
  time_piece = lambda fn, *args: time_jitted(fn, args, budget_s, PIECE_REPEATS)
  t_block, (losses, block_grads) = time_piece(fns["block_vg"], params, blocks)
  grad, loss = _mean(block_grads), jnp.mean(losses)
  bound = state.radius / num
  t_local, (steps, ys, _) = time_piece(fns["local_step"], params, blocks, losses, block_grads,
                                       grad, state.local_state, bound)
  s_sum = jax.tree.map(lambda s: jnp.sum(s, axis=0), steps)
  t_trial, (_, grad_t) = time_piece(fns["global_vg"], optax.apply_updates(params, s_sum), blocks)
  t_global, _ = time_piece(fns["global_step"], params, blocks, loss, grad, state.radius,
                           state.global_memory)
  rows: list[Row] = []
  _piece(rows, order, "block gradients (vmapped value_and_grad)", t_block, 1, True, grad_ms)
  _piece(rows, order, "local step (TR iteration of every subdomain)", t_local, local_iters, True,
         grad_ms)
  if second_order:
    pieces = ((fns["local_update"], (state.local_state, steps, ys), "  inside: L-SR1 update, "
               "local", local_iters),
              (fns["local_solve"], (grad, state.local_state, bound), "  inside: OBS solve, "
               "local", local_iters),
              (fns["global_solve"], (grad, state.global_memory, state.radius), "  inside global "
               "step: OBS solve", 1))
    for fn, args, name, calls in pieces:
      _piece(rows, order, name, time_piece(fn, *args)[0], calls, False, grad_ms)
  _piece(rows, order, "trial value_and_grad at theta^k + s~", t_trial, 1, True, grad_ms)
  if second_order:
    y_sum = jax.tree.map(jnp.subtract, grad_t, grad)
    t_upd, _ = time_piece(fns["global_update"], state.global_memory, s_sum, y_sum)
    _piece(rows, order, "L-SR1 update, global (APTS pair)", t_upd, 1, True, grad_ms)
  _piece(rows, order, "global TR step", t_global, 1, True, grad_ms)
  summed = sum(r["iteration_ms"] for r in rows if r["in_sum"])
  _piece(rows, order, "overhead (whole - sum of pieces)", {"ms": whole["ms"] - summed}, 1,
         False, grad_ms)
  _piece(rows, order, "whole trainer step", whole, 1, False, grad_ms)
  return rows, {"what": f"APTS trainer step, {order}, N={num}, profiled model", **whole}


def user_step(loss_fn: Callable[..., jax.Array], tx: optax.GradientTransformationExtraArgs
              ) -> Callable[..., Any]:
  """A plain training step with ``tx``: value_and_grad, ``tx.update``, apply."""
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch, value=loss)
    return optax.apply_updates(params, updates), state, loss
  return step


def compile_row(what: str, fn: Callable[..., Any], args: tuple[Any, ...], budget_s: float,
                compiler_options: dict[str, Any] | None = None) -> Row:
  """Compile time, first call and steady-state time of ``fn`` on ``args``.

  JAX's in-memory caches are cleared first, so that a function traced or compiled earlier in
  the run (``lsr1.update`` inside the profile, say) is compiled from scratch.
  """
  jax.clear_caches()
  timing, _ = time_jitted(fn, args, budget_s, 10, compiler_options)
  return {"what": what, "compile_s": timing["compile_s"], "first_s": timing["first_s"],
          "ms": timing["ms"]}


def compile_table(problem: tuple[Any, ...], budget_s: float, memory: int, num: int
                  ) -> list[Row]:
  """Compile rows besides the trainer steps: TR, L-SR1, OBS, Adam; a tiny 2-16-2 model."""
  loss_fn, params, batch, _ = problem
  out = []
  for name, tx in (("trust_region second order step, profiled model",
                    aptsjax.trust_region(loss_fn, memory=memory)),
                   ("optax.adam step, profiled model",
                    optax.with_extra_args_support(optax.adam(1e-3)))):
    out.append(compile_row(name, user_step(loss_fn, tx), (params, tx.init(params), batch),
                           budget_s))
  mem = lsr1.init(params, memory)
  grad = jax.tree.map(jnp.ones_like, params)
  out.append(compile_row("lsr1.update alone, profiled model", lsr1.update, (mem, grad, grad),
                         budget_s))
  out.append(compile_row("obs.solve alone, profiled model", obs.solve, (grad, mem, 1.0), budget_s))
  tiny_loss, tiny_params, tiny_batch, _ = mlp_problem(64, (16, 2), 2)
  for second_order, order in ORDERS:
    trainer = parallel.apts_trainer(tiny_loss, num, num_devices=1, second_order=second_order,
                                    memory=memory, compiler_options={},
                                    base=aptsjax.APTSConfig.paper())
    out.append(compile_row(f"APTS trainer step, {order}, tiny 2-16-2", undonated(trainer),
                           (tiny_params, trainer.init(tiny_params), tiny_batch), budget_s,
                           trainer_options()))
  tx = optax.with_extra_args_support(optax.adam(1e-3))
  out.append(compile_row("optax.adam step, tiny 2-16-2", user_step(tiny_loss, tx),
                         (tiny_params, tx.init(tiny_params), tiny_batch), budget_s))
  return out


def run(budget_s: float, warmup: int, config: dict[str, int] | None = None,
        progress: Callable[[str], None] = print) -> tuple[list[Row], list[Row], Row]:
  """The profile of both orders and the compile table; returns (pieces, compiles, info)."""
  config = config or PROFILE
  problem = mlp_problem(config["rows"], config["features"], config["input_dim"])
  gradient, compile_s = compile_jitted(jax.value_and_grad(problem[0]), problem[1:3])
  grad_t, _ = time_compiled(gradient, problem[1:3], budget_s, PIECE_REPEATS)
  grad_t["compile_s"] = compile_s
  info = {"source": problem[3], "n": models.count_params(problem[1]), **config}
  pieces, compiles = [], [{"what": "value_and_grad, profiled model (one gradient)",
                           "compile_s": grad_t["compile_s"], "first_s": grad_t["first_s"],
                           "ms": grad_t["ms"]}]
  for second_order, order in ORDERS:
    progress(f"profile: {order}")
    rows, whole = profile_order(second_order, warmup, budget_s, config, problem, gradient)
    info[f"grad_ms {order}"] = rows[0]["ms"] / rows[0]["grad_evals"]
    pieces += rows
    compiles.append({k: whole[k] for k in ("what", "compile_s", "first_s", "ms")})
  progress("compile times")
  compiles += compile_table(problem, budget_s, config["memory"], config["num"])
  return pieces, compiles, info


def markdown(pieces: list[Row], compiles: list[Row], info: Row) -> str:
  """The profile (both orders side by side) and compile tables, and the whole-step ratios."""
  by_order = {order: [r for r in pieces if r["order"] == order] for _, order in ORDERS}
  first, second = by_order["first order"], by_order["second order"]
  names = [r["piece"] for r in second] + [r["piece"] for r in first
                                          if r["piece"] not in {s["piece"] for s in second}]
  cell = lambda rows, name: next(((f"{r['calls']} | {r['iteration_ms']:.2f} | "
                                   f"{r['grad_evals']:.2f}") for r in rows if r["piece"] == name),
                                 "- | - | -")
  lines = [f"One APTS iteration, MLP {info['input_dim']}-"
           f"{'-'.join(map(str, info['features']))} (n = {info['n']:,}), N = {info['num']}, "
           f"nu = {info['local_steps']}, {info['rows']:,} rows ({info['source']}), memory "
           f"{info['memory']}; one gradient (value_and_grad, {info['rows']:,} rows, timed "
           f"next to each order's pieces) = {info['grad_ms first order']:.2f} ms (o1), "
           f"{info['grad_ms second order']:.2f} ms (o2). Columns: calls per iteration, ms per "
           "iteration, gradient evaluations per iteration.", "",
           *table_head(["piece", "o1 calls", "o1 ms", "o1 grads", "o2 calls", "o2 ms",
                        "o2 grads"])]
  lines += [f"| {name} | {cell(first, name)} | {cell(second, name)} |" for name in names]
  for _, order in ORDERS:
    whole = by_order[order][-1]
    lines.append(f"\nOne {order} APTS iteration = {whole['grad_evals']:.1f} gradient "
                 f"evaluations ({whole['ms']:.1f} ms).")
  lines += ["", *table_head(["compile (default XLA flags)", "compile s", "first call s",
                             "steady ms"])]
  lines += [f"| {r['what']} | {r['compile_s']:.2f} | {r['first_s']:.3f} | {r['ms']:.2f} |"
            for r in compiles]
  return "\n".join(lines)


def plot(stacked: list[Row], pieces: list[Row], path: Path) -> None:
  """Left: passes of the vmapped update and solve against N. Right: the profile's pieces."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
  configs = sorted({(r["n"], r["memory"]) for r in stacked})
  for i, (n, k) in enumerate(configs):
    sel = sorted((r for r in stacked if (r["n"], r["memory"]) == (n, k)), key=lambda r: r["N"])
    ns = [r["N"] for r in sel]
    left.plot(ns, [r["solve_passes"] for r in sel], "o-", color=f"C{i}",
              label=f"obs.solve, n={n:,}, k={k}")
    left.plot(ns, [r["update_passes"] for r in sel], "s--", color=f"C{i}", alpha=0.6,
              label=f"lsr1.update, n={n:,}, k={k}")
  left.set_xticks(sorted({r["N"] for r in stacked}))
  left.set(xlabel="N (vmapped memories)", ylabel="passes over the N stacks", yscale="log",
           title="vmapped L-SR1 update / OBS solve")
  left.grid(True, which="both", alpha=0.3)
  left.legend(fontsize=6, ncol=2)
  names = list(dict.fromkeys(r["piece"] for r in pieces if r["in_sum"]))
  labelled: set[str] = set()
  for j, (_, order) in enumerate(ORDERS):
    base = 0.0
    mine = [x for x in pieces if x["order"] == order]
    bars = [(x["piece"], x["grad_evals"], f"C{names.index(x['piece'])}") for x in mine
            if x["in_sum"]]
    bars += [("overhead", max(x["grad_evals"], 0.0), "0.8") for x in mine
             if x["piece"].startswith("overhead")]
    for name, width, color in bars:
      right.barh(j, width, left=base, color=color, edgecolor="k",
                 label=None if name in labelled else name)
      labelled.add(name)
      base += width
  right.set_yticks(range(len(ORDERS)), [order for _, order in ORDERS])
  right.set(xlabel="gradient evaluations per APTS iteration", title="one APTS iteration")
  right.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
