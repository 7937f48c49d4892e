"""Trust-region benchmark on classic unconstrained problems (float64).

    python -m benchmarks.classic [--quick] [--out DIR]

Every problem of ``benchmarks.common.problems`` at n in {2, 10, 100, 1000} where it is defined (Beale
at n = 2, Powell singular at n = 4 in place of 2 and skipped at 10), solved from its standard
starting point to gradient norm |g|_2 <= 1e-6 by

* ``aptsjax-sr1``: ``aptsjax.trust_region(fn, memory=10, second_order=True)`` (L-SR1 + OBS),
* ``aptsjax-fo``: ``aptsjax.trust_region(fn, second_order=False)`` (first-order model),
* ``scipy-tc-sr1``: ``scipy.optimize.minimize(method="trust-constr", hess=SR1())`` (dense SR1),
* ``scipy-exact``: ``scipy.optimize.minimize(method="trust-exact")`` with the exact Hessian,
* ``optax-lbfgs``: ``optax.lbfgs(memory_size=10)`` with its zoom line search, driven by
  ``optax.value_and_grad_from_state``.

Settings. Both aptsjax runs use ``init_radius=1.0`` (scipy's initial radius for both of its
trust-region methods), ``max_radius=1000`` (trust-exact's default) and ``min_radius=1e-12``
(a floor far below what |g| <= 1e-6 needs), when the constructor accepts those keywords; every
other constant is the library default. Caps: 2,000 iterations for the second-order methods, scipy
and L-BFGS, 20,000 for first-order TR, and a wall-clock cap per scipy run (``--scipy-seconds``,
40 s) because dense trust-constr costs O(n^2) per iteration; a run that stops at a cap is
reported as not converged, with the iterations it made.

Counting. One aptsjax ``update`` is one TR iteration and costs one loss and one gradient
evaluation, at the trial point (``value=state.value`` is passed, and the gradient at the
accepted point is ``state.grad``, so nothing at the current point is recomputed); the start costs
one more of each, so f-evals = g-evals = 1 + iterations. (If the state had no ``grad`` field,
the loop would recompute the gradient after each update and count it.) scipy's counts are its
``nfev``/``njev``/``nhev``. L-BFGS: each zoom line-search step is one value-and-gradient
evaluation, plus one at the start, so f-evals = g-evals = 1 + sum of ``num_linesearch_steps``.
The gradient norm that decides convergence is computed from these gradients (scipy trust-exact
tests |g|_2 itself; trust-constr's own gtol is an infinity norm, so it is switched off and a
callback stops the run once |g|_2 <= tol).

Time per iteration: the wall time of the iteration loop divided by the iterations, excluding
compilation (aptsjax and L-BFGS steps are compiled ahead of time; scipy's functions are jitted
JAX functions behind numpy wrappers, warmed up before timing). The aptsjax and L-BFGS loops are
Python loops around one jitted step (update, apply, |g|) with one host read of |g| per
iteration.

Errors: |x - x*| (for the saddle problem: to the nearest of its global minimisers, see
``problems.nearest_minimiser``) and f - f*. Output: a Markdown table on stdout and in
``DIR/results.md``, the rows in ``DIR/results.csv``, and a verdict.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize

import aptsjax
from benchmarks.common import problems as problems_lib
from benchmarks.common.output import table_head, write_csv

TOL = 1e-6
SIZES = (2, 10, 100, 1000)
QUICK_SIZES = (2, 10)
MEMORY = 10
WANTED_TR_OPTIONS = {"init_radius": 1.0, "min_radius": 1e-12, "max_radius": 1000.0}
METHODS = ("aptsjax-sr1", "aptsjax-fo", "scipy-tc-sr1", "scipy-exact", "optax-lbfgs")


@dataclasses.dataclass(frozen=True)
class Caps:
  """Iteration and time caps of one benchmark run."""
  second_order_iters: int = 2000
  first_order_iters: int = 20000
  lbfgs_iters: int = 2000
  scipy_iters: int = 2000
  scipy_seconds: float = 40.0


QUICK_CAPS = Caps(second_order_iters=500, first_order_iters=3000, lbfgs_iters=500,
                  scipy_iters=500, scipy_seconds=10.0)


class Row(NamedTuple):
  """One (problem, method) result."""
  problem: str
  n: int
  method: str
  converged: bool
  status: str
  iterations: int
  fevals: int
  gevals: int
  hevals: int
  grad_norm: float
  x_error: float
  f_error: float
  ms_per_iter: float


class Outcome(NamedTuple):
  """What a solver run returns before the errors are measured."""
  x: np.ndarray
  grad_norm: float
  iterations: int
  fevals: int
  gevals: int
  hevals: int
  seconds: float
  status: str


# ----------------------------------------------------------------------------- problems


def benchmark_problems(sizes: Sequence[int]) -> list[problems_lib.Problem]:
  """The problems at each size (scalable ones where valid), Beale once, Powell at 4 for n = 2."""
  found: dict[tuple[str, int], problems_lib.Problem] = {}
  for n in sizes:
    for problem in problems_lib.get_problems(n, include_fixed=(n == min(sizes))):
      found.setdefault((problem.name, problem.n), problem)
    if n == 2 and not problems_lib.is_valid_size("powell", n):
      found.setdefault(("powell", 4), problems_lib.powell_singular(4))
  return sorted(found.values(), key=lambda p: (p.n, p.name))


def errors(problem: problems_lib.Problem, x: np.ndarray) -> tuple[float, float]:
  """(|x - x*| to the nearest minimiser, f(x) - f*)."""
  x_near = np.asarray(problems_lib.nearest_minimiser(problem, x))
  return (float(np.linalg.norm(np.asarray(x) - x_near)),
          float(problem.fn(jnp.asarray(x))) - problem.f_star)


# ----------------------------------------------------------------------------- aptsjax


def tr_options(wanted: dict[str, float] = WANTED_TR_OPTIONS) -> dict[str, float]:
  """The keywords of ``wanted`` that ``aptsjax.trust_region`` accepts (checked by inspection)."""
  parameters = inspect.signature(aptsjax.trust_region).parameters
  named = {k for k, p in parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
    hyperparams = getattr(aptsjax, "TrustRegionConfig", None)
    named |= set(getattr(hyperparams, "_fields", ()))
  return {k: v for k, v in wanted.items() if k in named}


def make_tr_step(tx: optax.GradientTransformationExtraArgs, fn: Callable[..., Any], reuse: bool
                 ) -> Callable[..., tuple[Any, Any, Any, Any, Any]]:
  """One TR iteration as one function: update, apply, next (loss, grad) and |grad|.

  With ``reuse`` the next loss and gradient are ``state.value`` and ``state.grad`` (computed by
  the update at the trial point); otherwise they are recomputed (one more evaluation of each).
  """
  value_and_grad = jax.value_and_grad(fn)

  def step(x: Any, state: Any, loss: Any, grad: Any) -> tuple[Any, Any, Any, Any, Any]:
    updates, state = tx.update(grad, state, x, batch=None, value=loss)
    x = optax.apply_updates(x, updates)
    loss, grad = (state.value, state.grad) if reuse else value_and_grad(x)
    return x, state, loss, grad, optax.tree.norm(grad)

  return step


def run_aptsjax(problem: problems_lib.Problem, second_order: bool, max_iters: int,
                options: dict[str, float]) -> Outcome:
  """Runs aptsjax.trust_region from x0 to |g| <= TOL or max_iters updates."""
  tx = aptsjax.trust_region(problem.fn, memory=MEMORY, second_order=second_order, **options)
  x = problem.x0
  state = tx.init(x)
  loss, grad = jax.value_and_grad(problem.fn)(x)
  reuse = hasattr(state, "grad")
  step = jax.jit(make_tr_step(tx, problem.fn, reuse)).lower(x, state, loss, grad).compile()
  evals_per_update = 1 if reuse else 2
  iterations = 0
  norm = float(jnp.linalg.norm(grad))
  start = time.perf_counter()
  while norm > TOL and iterations < max_iters:
    x, state, loss, grad, norm_array = step(x, state, loss, grad)
    norm = float(norm_array)
    iterations += 1
  seconds = time.perf_counter() - start
  evals = 1 + evals_per_update * iterations
  status = "converged" if norm <= TOL else "max iterations"
  return Outcome(np.asarray(x), norm, iterations, evals, evals, 0, seconds, status)


# ----------------------------------------------------------------------------- optax L-BFGS


def run_lbfgs(problem: problems_lib.Problem, max_iters: int) -> Outcome:
  """optax.lbfgs (zoom line search) with value_and_grad_from_state, to |g| <= TOL."""
  fn = problem.fn
  opt = optax.lbfgs(memory_size=MEMORY)
  value_and_grad = optax.value_and_grad_from_state(fn)

  def step(x: Any, state: Any) -> tuple[Any, Any, Any, Any]:
    value, grad = value_and_grad(x, state=state)
    updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=fn)
    x = optax.apply_updates(x, updates)
    new_grad = optax.tree.get(state, "grad")
    return x, state, optax.tree.norm(new_grad), optax.tree.get(state, "num_linesearch_steps")

  x = problem.x0
  state = opt.init(x)
  compiled = jax.jit(step).lower(x, state).compile()
  norm = float(jnp.linalg.norm(jax.grad(fn)(x)))  # convergence check only, not counted
  evals, iterations = 1, 0  # the first step evaluates value and gradient at x0 once
  start = time.perf_counter()
  while norm > TOL and iterations < max_iters:
    x, state, norm_arr, steps = compiled(x, state)
    norm = float(norm_arr)
    evals += int(steps)
    iterations += 1
  seconds = time.perf_counter() - start
  status = "converged" if norm <= TOL else "max iterations"
  return Outcome(np.asarray(x), norm, iterations, evals, evals, 0, seconds, status)


# ----------------------------------------------------------------------------- scipy


class NumpyFns(NamedTuple):
  """Jitted JAX value, gradient and Hessian behind float64 numpy wrappers."""
  fun: Callable[[np.ndarray], float]
  jac: Callable[[np.ndarray], np.ndarray]
  hess: Callable[[np.ndarray], np.ndarray]


def numpy_fns(problem: problems_lib.Problem, with_hessian: bool) -> NumpyFns:
  """Wraps the problem for scipy and compiles each function once (outside any timing)."""
  f = jax.jit(problem.fn)
  g = jax.jit(jax.grad(problem.fn))
  h = jax.jit(jax.hessian(problem.fn))
  fns = NumpyFns(lambda x: float(f(jnp.asarray(x))),
                 lambda x: np.asarray(g(jnp.asarray(x))),
                 lambda x: np.asarray(h(jnp.asarray(x))))
  x0 = np.asarray(problem.x0)
  fns.fun(x0), fns.jac(x0)
  if with_hessian:
    fns.hess(x0)
  return fns


class _Stopper:
  """scipy callback: stops at |g|_2 <= TOL (when the result carries grad) or after a time cap."""

  def __init__(self, seconds: float):
    self.deadline = time.perf_counter() + seconds
    self.timed_out = False

  def __call__(self, intermediate_result: scipy.optimize.OptimizeResult) -> None:
    grad = intermediate_result.get("grad")
    if grad is not None and np.linalg.norm(grad) <= TOL:
      raise StopIteration
    if time.perf_counter() > self.deadline:
      self.timed_out = True
      raise StopIteration


def run_scipy(problem: problems_lib.Problem, method: str, caps: Caps) -> Outcome:
  """scipy trust-constr with SR1 ("scipy-tc-sr1") or trust-exact with the exact Hessian."""
  exact = method == "scipy-exact"
  fns = numpy_fns(problem, with_hessian=exact)
  stopper = _Stopper(caps.scipy_seconds)
  if exact:
    kwargs = dict(method="trust-exact", hess=fns.hess,
                  options=dict(gtol=TOL, maxiter=caps.scipy_iters))
  else:
    kwargs = dict(method="trust-constr", hess=scipy.optimize.SR1(),
                  options=dict(gtol=1e-300, xtol=1e-300, maxiter=caps.scipy_iters))
  start = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    result = scipy.optimize.minimize(fns.fun, np.asarray(problem.x0), jac=fns.jac,
                                     callback=stopper, **kwargs)
  seconds = time.perf_counter() - start
  norm = float(np.linalg.norm(fns.jac(result.x)))
  if norm <= TOL:
    status = "converged"
  elif stopper.timed_out:
    status = "time cap"
  elif result.nit >= caps.scipy_iters:
    status = "max iterations"
  else:
    status = f"stopped: {str(result.message)[:40]}"
  return Outcome(np.asarray(result.x), norm, int(result.nit), int(result.get("nfev", 0)),
                 int(result.get("njev", 0)), int(result.get("nhev", 0)), seconds, status)


# ----------------------------------------------------------------------------- driver


def run_one(problem: problems_lib.Problem, method: str, caps: Caps,
            options: dict[str, float]) -> Row:
  """Runs one method on one problem and measures its errors."""
  if method == "aptsjax-sr1":
    out = run_aptsjax(problem, True, caps.second_order_iters, options)
  elif method == "aptsjax-fo":
    out = run_aptsjax(problem, False, caps.first_order_iters, options)
  elif method == "optax-lbfgs":
    out = run_lbfgs(problem, caps.lbfgs_iters)
  else:
    out = run_scipy(problem, method, caps)
  x_error, f_error = errors(problem, out.x)
  ms = 1e3 * out.seconds / max(out.iterations, 1)
  return Row(problem.name, problem.n, method, out.grad_norm <= TOL, out.status, out.iterations,
             out.fevals, out.gevals, out.hevals, out.grad_norm, x_error, f_error, ms)


def markdown_table(rows: Sequence[Row]) -> str:
  """The rows as a Markdown table."""
  lines = table_head(["problem", "n", "method", "iterations", "f-evals", "g-evals",
                      "final \\|g\\|", "\\|x - x*\\|", "f - f*", "time/iter ms", "status"])
  for r in rows:
    iters = f"{r.iterations}" if r.converged else f"{r.iterations} (not converged)"
    lines.append(f"| {r.problem} | {r.n} | {r.method} | {iters} | {r.fevals} | {r.gevals} | "
                 f"{r.grad_norm:.1e} | {r.x_error:.1e} | {r.f_error:.1e} | "
                 f"{r.ms_per_iter:.3f} | {r.status} |")
  return "\n".join(lines)


def compare_iterations(ours: Row, theirs: Row) -> str:
  """'win' if ours converged in no more iterations than theirs needed (or made, if they did
  not converge), 'loss' if ours did not converge or needed more than theirs did converged, else
  'undecided' (neither converged, or theirs stopped early before ours finished)."""
  if ours.converged and ours.iterations <= theirs.iterations:
    return "win"
  if not ours.converged and not theirs.converged:
    return "undecided"
  if theirs.converged:
    return "loss"
  return "undecided"


def verdict(rows: Sequence[Row]) -> str:
  """Iteration comparison with scipy's SR1 trust region and the per-iteration cost at n = 1000."""
  by_key = {(r.problem, r.n, r.method): r for r in rows}
  outcomes: dict[str, list[str]] = {"win": [], "loss": [], "undecided": []}
  for (name, n, method), ours in by_key.items():
    theirs = by_key.get((name, n, "scipy-tc-sr1"))
    if method == "aptsjax-sr1" and theirs is not None:
      outcomes[compare_iterations(ours, theirs)].append(
          f"{name}/{n} ({ours.iterations} vs {theirs.iterations})")
  total = sum(len(v) for v in outcomes.values())
  lines = [f"aptsjax SR1-TR used no more iterations than scipy trust-constr SR1 on "
           f"{len(outcomes['win'])} of {total} problems."]
  for kind in ("win", "loss", "undecided"):
    if outcomes[kind]:
      lines.append(f"  {kind}: " + ", ".join(outcomes[kind]))
  largest = max(r.n for r in rows)
  ratios = []
  for (name, n, method), ours in by_key.items():
    theirs = by_key.get((name, n, "scipy-tc-sr1"))
    if method == "aptsjax-sr1" and n == largest and theirs is not None:
      ratios.append((name, ours.ms_per_iter, theirs.ms_per_iter))
  if ratios:
    detail = ", ".join(f"{name} {a:.2f} vs {b:.1f} ms" for name, a, b in ratios)
    median = statistics.median(b / a for _, a, b in ratios if a > 0)
    lines.append(f"Per-iteration time at n = {largest}, aptsjax SR1-TR vs scipy trust-constr "
                 f"SR1: {detail}; scipy is {median:.0f}x slower per iteration (median).")
  return "\n".join(lines)


def machine_load() -> str:
  """CPU count and 1/5/15-minute load averages: timings are only comparable on an idle machine."""
  try:
    loads = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  except OSError:
    loads = "unknown"
  return f"{os.cpu_count()} CPUs, load average {loads}"


def main(argv: Sequence[str] | None = None) -> list[Row]:
  """Command-line entry point: float64 on, every problem and method, the table and verdict."""
  jax.config.update("jax_enable_x64", True)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="n in {2, 10} and smaller caps (about a minute)")
  parser.add_argument("--out", default=os.path.join("results", "trust_region"),
                      help="output directory (default results/trust_region)")
  parser.add_argument("--scipy-seconds", type=float, default=None,
                      help="wall-clock cap per scipy run (default 40, quick 10)")
  args = parser.parse_args(argv)
  caps = QUICK_CAPS if args.quick else Caps()
  if args.scipy_seconds is not None:
    caps = dataclasses.replace(caps, scipy_seconds=args.scipy_seconds)
  sizes = QUICK_SIZES if args.quick else SIZES
  options = tr_options()
  print(f"aptsjax.trust_region options: memory={MEMORY}, {options}; tolerance |g|_2 <= {TOL}; "
        f"caps {caps}; {machine_load()}", flush=True)
  rows = []
  start = time.perf_counter()
  for problem in benchmark_problems(sizes):
    for method in METHODS:
      row = run_one(problem, method, caps, options)
      rows.append(row)
      print(f"[{time.perf_counter() - start:6.1f}s] {row.problem:10s} n={row.n:<5d} "
            f"{row.method:13s} it={row.iterations:<6d} |g|={row.grad_norm:.1e} {row.status}",
            flush=True)
  table, summary = markdown_table(rows), verdict(rows) + f"\nAt the end: {machine_load()}."
  print("\n" + table + "\n\n" + summary)
  os.makedirs(args.out, exist_ok=True)
  write_csv(rows, os.path.join(args.out, "results.csv"))
  with open(os.path.join(args.out, "results.md"), "w") as handle:
    handle.write(table + "\n\n" + summary + "\n")
  print(f"\nwrote {args.out}/results.csv and results.md "
        f"(total {time.perf_counter() - start:.0f} s)")
  return rows


if __name__ == "__main__":
  main()
