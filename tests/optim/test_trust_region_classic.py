"""aptsjax.trust_region on classic unconstrained problems (float64, ``benchmarks.common.problems``).

* Second order (L-SR1 + OBS, memory 10, library defaults): converges to the known minimiser
  (|x - x*| < 1e-4; f - f* < 1e-8 for the saddle problem, which has many global minimisers)
  within ``SECOND_ORDER_CAP`` updates, and ``state.value`` never increases and is the loss at the
  updated parameters.
* First order: the loss never increases on every problem, and on the convex quadratic the gap
  f - f* halves within ``FIRST_ORDER_ITERS`` updates.
* Oracle: on a convex quadratic with memory >= n, the second-order iterates reach the minimiser
  that scipy's trust-exact (exact Hessian) finds, in at most 3 k + n + 5 updates when trust-exact
  needs k iterations (same initial and maximum radius as scipy). The n is the price of a
  quasi-Newton method: SR1 needs up to n + 1 steps to identify the Hessian of an n-dimensional
  quadratic, which trust-exact is given.

Every run is a Python loop around one jitted step (``tx.update`` then ``optax.apply_updates``),
passing ``value=state.value`` and reusing ``state.grad`` (full batch), as a user would.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

import aptsjax
from benchmarks.common import problems as problems_lib

pytestmark = pytest.mark.slow

MEMORY = 10
X_TOL = 1e-4             # |x - x*| for problems with a unique minimiser
F_TOL = 1e-8             # f - f* for the saddle problem
SECOND_ORDER_CAP = 500   # updates allowed to reach X_TOL / F_TOL
FIRST_ORDER_ITERS = 300  # updates of the first-order runs
MATCH_GTOL = 1e-8        # gradient tolerance of the trust-exact comparison
SCIPY_RADII = {"init_radius": 1.0, "max_radius": 1000.0}  # trust-exact's defaults

PROBLEMS: dict[str, Callable[[], problems_lib.Problem]] = {
    "rosenbrock": lambda: problems_lib.extended_rosenbrock(4),
    "powell": lambda: problems_lib.powell_singular(4),
    "beale": problems_lib.beale,
    "quadratic": lambda: problems_lib.convex_quadratic(6),
    "saddle": lambda: problems_lib.double_well_saddle(6),
}


class Trace(NamedTuple):
  """A trust-region run.

  Attributes:
    x: the final parameters.
    losses: ``state.value`` after each update, preceded by f(x0).
    true_losses: ``fn(params)`` after each update, preceded by f(x0).
    grad_norm: |g| at the final parameters.
    iterations: number of updates made.
    reached: whether the stopping criterion was met.
  """
  x: np.ndarray
  losses: np.ndarray
  true_losses: np.ndarray
  grad_norm: float
  iterations: int
  reached: bool


def solution_error(problem: problems_lib.Problem, x: np.ndarray) -> float:
  """f - f* for the saddle problem, |x - x*| otherwise."""
  if problem.name == "saddle":
    return float(problem.fn(jnp.asarray(x))) - problem.f_star
  return float(np.linalg.norm(np.asarray(x) - np.asarray(problem.x_star)))


def tolerance(problem: problems_lib.Problem) -> float:
  """The error below which a run counts as converged (see ``solution_error``)."""
  return F_TOL if problem.name == "saddle" else X_TOL


def make_step(tx: optax.GradientTransformationExtraArgs, fn: Callable[..., Any]
              ) -> Callable[..., tuple[Any, Any, Any, Any, Any]]:
  """One jitted TR iteration: (x, state, loss, grad) -> (x, state, loss, grad, fn(x))."""
  value_and_grad = jax.value_and_grad(fn)

  def step(x: Any, state: Any, loss: Any, grad: Any) -> tuple[Any, Any, Any, Any, Any]:
    updates, state = tx.update(grad, state, x, batch=None, value=loss)
    x = optax.apply_updates(x, updates)
    if hasattr(state, "grad"):
      loss, grad = state.value, state.grad
    else:
      loss, grad = value_and_grad(x)
    return x, state, loss, grad, fn(x)

  return jax.jit(step)


def run_tr(problem: problems_lib.Problem, max_iters: int,
           stop: Callable[[np.ndarray, float], bool], **kwargs: Any) -> Trace:
  """Runs aptsjax.trust_region from x0 until ``stop(x, |g|)`` or ``max_iters`` updates."""
  tx = aptsjax.trust_region(problem.fn, **kwargs)
  x = problem.x0
  state = tx.init(x)
  loss, grad = jax.value_and_grad(problem.fn)(x)
  step = make_step(tx, problem.fn)
  losses, true_losses = [float(loss)], [float(loss)]
  grad_norm = float(jnp.linalg.norm(grad))
  reached, iterations = stop(np.asarray(x), grad_norm), 0
  while not reached and iterations < max_iters:
    x, state, loss, grad, true_loss = step(x, state, loss, grad)
    iterations += 1
    losses.append(float(state.value))
    true_losses.append(float(true_loss))
    grad_norm = float(jnp.linalg.norm(grad))
    reached = stop(np.asarray(x), grad_norm)
  return Trace(np.asarray(x), np.asarray(losses), np.asarray(true_losses), grad_norm,
               iterations, reached)


@functools.lru_cache(maxsize=None)
def second_order_trace(name: str) -> Trace:
  """Second-order TR with the library defaults, until the problem's error criterion holds."""
  problem = PROBLEMS[name]()
  stop = lambda x, _: solution_error(problem, x) < tolerance(problem)
  return run_tr(problem, SECOND_ORDER_CAP, stop, memory=MEMORY, second_order=True)


@functools.lru_cache(maxsize=None)
def first_order_trace(name: str) -> Trace:
  """First-order TR with the library defaults, ``FIRST_ORDER_ITERS`` updates."""
  problem = PROBLEMS[name]()
  return run_tr(problem, FIRST_ORDER_ITERS, lambda x, g: g == 0.0, second_order=False)


def assert_monotone(trace: Trace) -> None:
  """state.value never increases and equals the loss at the updated parameters."""
  increases = np.diff(trace.losses)
  assert np.all(increases <= 0.0), (
      f"state.value increased by {increases.max():.3e} at update {int(np.argmax(increases)) + 1}")
  np.testing.assert_allclose(trace.true_losses, trace.losses, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_second_order_converges_to_minimiser(x64, name):
  problem = PROBLEMS[name]()
  trace = second_order_trace(name)
  error = solution_error(problem, trace.x)
  assert trace.reached, (
      f"{name} (n={problem.n}): error {error:.3e} (tolerance {tolerance(problem):.0e}) after "
      f"{trace.iterations} updates, |g| = {trace.grad_norm:.3e}, f = {trace.losses[-1]:.6e}")
  assert trace.iterations <= SECOND_ORDER_CAP


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_second_order_loss_never_increases(x64, name):
  trace = second_order_trace(name)
  assert trace.iterations > 0
  assert_monotone(trace)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_first_order_loss_never_increases(x64, name):
  trace = first_order_trace(name)
  assert_monotone(trace)
  assert trace.losses[-1] < trace.losses[0], f"{name}: no progress in {trace.iterations} updates"


def test_first_order_halves_the_gap_on_the_quadratic(x64):
  problem = PROBLEMS["quadratic"]()
  trace = first_order_trace("quadratic")
  gap0, gap = trace.losses[0] - problem.f_star, trace.losses[-1] - problem.f_star
  assert gap <= 0.5 * gap0, (
      f"f - f* went from {gap0:.3e} to {gap:.3e} in {trace.iterations} first-order updates")


def trust_exact(problem: problems_lib.Problem, gtol: float) -> scipy.optimize.OptimizeResult:
  """scipy's trust-exact with the exact (constant) Hessian of a quadratic, jitted functions."""
  fun = jax.jit(problem.fn)
  jac = jax.jit(jax.grad(problem.fn))
  hess = np.asarray(jax.hessian(problem.fn)(problem.x0))
  return scipy.optimize.minimize(
      lambda x: float(fun(jnp.asarray(x))), np.asarray(problem.x0),
      jac=lambda x: np.asarray(jac(jnp.asarray(x))), hess=lambda x: hess,
      method="trust-exact", options={"gtol": gtol})


@pytest.mark.parametrize("n,seed", [(2, 0), (2, 1), (8, 0), (8, 1)])
def test_quadratic_matches_trust_exact(x64, n, seed):
  problem = problems_lib.convex_quadratic(n, seed=seed)
  reference = trust_exact(problem, MATCH_GTOL)
  assert reference.success, reference.message
  trace = run_tr(problem, 200, lambda x, g: g <= MATCH_GTOL, memory=max(MEMORY, n),
                 second_order=True, **SCIPY_RADII)
  bound = 3 * reference.nit + n + 5
  assert trace.reached, f"|g| = {trace.grad_norm:.3e} after {trace.iterations} updates"
  assert trace.iterations <= bound, (
      f"n={n}: {trace.iterations} updates, trust-exact {reference.nit} iterations "
      f"(bound {bound})")
  np.testing.assert_allclose(trace.x, reference.x, rtol=0, atol=1e-7)
  np.testing.assert_allclose(trace.x, np.asarray(problem.x_star), rtol=0, atol=1e-7)
  assert_monotone(trace)


ROSENBROCK_RADII = (0.01, 0.1, 1.0, 10.0)
ROSENBROCK_CAP = 300  # updates allowed to reach f < 1e-10 on extended Rosenbrock, n = 10


@functools.lru_cache(maxsize=None)
def rosenbrock_10_trace(growth: str, init_radius: float) -> Trace:
  """Second-order TR on extended Rosenbrock (n = 10) until f < 1e-10, at most 1000 updates."""
  problem = problems_lib.extended_rosenbrock(10)
  return run_tr(problem, 1000, lambda x, _: float(problem.fn(jnp.asarray(x))) < 1e-10,
                memory=MEMORY, second_order=True, radius_growth=growth, init_radius=init_radius,
                max_radius=max(4.0, init_radius))


@pytest.mark.parametrize("init_radius", ROSENBROCK_RADII)
def test_boundary_growth_solves_rosenbrock_10_from_any_initial_radius(x64, init_radius):
  """radius_growth="boundary": f < 1e-10 on extended Rosenbrock (n = 10) in < 300 updates.

  Measured 50-71 updates for these initial radii; the paper's rule (growth after interior
  steps too) took 47-253, so the cap leaves room for rounding and rejects a regression of the
  boundary rule to the paper's spread only in its worst case; the next test pins the spread.
  """
  trace = rosenbrock_10_trace("boundary", init_radius)
  assert trace.reached and trace.iterations <= ROSENBROCK_CAP, (
      f"f = {trace.losses[-1]:.3e} after {trace.iterations} updates")


def test_boundary_growth_makes_rosenbrock_insensitive_to_the_initial_radius(x64):
  """The spread of iteration counts over initial radii: boundary rule < half the paper rule's
  (the boundary runs are the previous test's)."""
  counts = {growth: [rosenbrock_10_trace(growth, r).iterations for r in ROSENBROCK_RADII]
            for growth in ("always", "boundary")}
  spread = {g: max(c) - min(c) for g, c in counts.items()}
  assert spread["boundary"] < 0.5 * spread["always"], counts
