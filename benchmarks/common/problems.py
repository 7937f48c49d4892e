"""Classic unconstrained test problems as JAX functions on flat vectors.

Every problem is a `Problem(name, fn, x0, x_star, f_star)`: ``fn(x, batch=None)`` maps a flat
vector ``x`` of shape (n,) to a scalar and ignores ``batch``, so it is also a ``loss_fn`` for
``aptsjax.trust_region``. ``x_star`` is a minimiser (for problems with several global
minimisers: one of them) and ``f_star`` the optimal value. The arrays take the dtype JAX gives
float64 data: float64 when ``jax_enable_x64`` is on, float32 otherwise.

* ``extended_rosenbrock(n)``, n even: sum over pairs of 100 (x_{2i} - x_{2i-1}^2)^2 +
  (1 - x_{2i-1})^2; x0 = (-1.2, 1, -1.2, 1, ...), x* = ones, f* = 0 (More, Garbow & Hillstrom
  1981, problem 21).
* ``powell_singular(n)``, n a multiple of 4: sum over blocks of (x1 + 10 x2)^2 + 5 (x3 - x4)^2 +
  (x2 - 2 x3)^4 + 10 (x1 - x4)^4; x0 = (3, -1, 0, 1, ...), x* = 0, f* = 0; the Hessian at x* is
  singular (rank n/2), so Newton-type methods converge only linearly (MGH problem 22).
* ``beale()``, n = 2: (1.5 - x + xy)^2 + (2.25 - x + xy^2)^2 + (2.625 - x + xy^3)^2;
  x0 = (1, 1), x* = (3, 0.5), f* = 0 (MGH problem 5).
* ``convex_quadratic(n, seed, condition)``: 0.5 (x - x*)^T A (x - x*) with A = Q diag(lam) Q^T,
  Q a seeded random orthogonal matrix and lam log-spaced from 1 to ``condition`` (1e3);
  x* seeded standard normal, x0 = 0, f* = 0.
* ``double_well_saddle(n, seed)``, n even: x = (u_1, v_1, u_2, v_2, ...) and
  f = sum_k [u_k^4/4 - u_k^2/2 + v_k^2/2 + d v_k (u_k^2 - 1)] + (c/4) sum_k (u_k^2 - u_{k+1}^2)^2
  with d = 0.5, c = 0.1. Each (u, v) pair has a saddle at (0, d) (Hessian diag(2 d^2 - 1, 1):
  one negative and one positive curvature direction) and minimisers (+-1, 0); minimising over v
  leaves (1/4 - d^2/2)(u^2 - 1)^2 - 1/4, a double well, and the coupling is >= 0 and
  vanishes with its gradient whenever every u_k = +-1. So every u in {-1, 1}^(n/2) with v = 0 is a
  global minimiser, f* = -n/8, and ``x_star`` is the all-(+1, 0) one. x0 = the saddle
  (0, d, 0, d, ...) plus a seeded perturbation of size 1e-3 per coordinate.

``nearest_minimiser(problem, x)`` gives the global minimiser nearest to x (``x_star`` except for
the saddle problem). ``get_problems(n)`` lists every problem at size n: the scalable ones valid
at n and the fixed-size ones (Beale) at their own size.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

Fn = Callable[..., Any]

SADDLE_D = 0.5
SADDLE_C = 0.1
SADDLE_PERTURBATION = 1e-3


class Problem(NamedTuple):
  """An unconstrained minimisation problem.

  Attributes:
    name: short identifier, e.g. ``"rosenbrock"``.
    fn: ``fn(x, batch=None) -> scalar`` on flat vectors of shape (n,).
    x0: the standard starting point, shape (n,).
    x_star: a (global) minimiser, shape (n,).
    f_star: the optimal value.
  """
  name: str
  fn: Fn
  x0: Any
  x_star: Any
  f_star: float

  @property
  def n(self) -> int:
    """The dimension."""
    return int(np.shape(self.x0)[0])


def _array(values: Any) -> Any:
  """Float64 data as a JAX array (float64 under jax_enable_x64, float32 otherwise)."""
  return jnp.asarray(np.asarray(values, dtype=np.float64))


def _check_multiple(name: str, n: int, k: int) -> None:
  """Raises ValueError unless n is a positive multiple of k."""
  if not isinstance(n, (int, np.integer)) or n < k or n % k:
    raise ValueError(f"{name} needs n a positive multiple of {k}, got {n!r}.")


def rosenbrock_fn(x: Any, batch: Any = None) -> Any:
  """Extended Rosenbrock: sum over pairs of 100 (x_{2i} - x_{2i-1}^2)^2 + (1 - x_{2i-1})^2."""
  del batch
  odd, even = x[0::2], x[1::2]
  return jnp.sum(100.0 * (even - odd**2) ** 2 + (1.0 - odd) ** 2)


def extended_rosenbrock(n: int = 2) -> Problem:
  """Extended Rosenbrock at even n: x0 = (-1.2, 1, ...), x* = ones, f* = 0."""
  _check_multiple("extended_rosenbrock", n, 2)
  x0 = np.tile([-1.2, 1.0], n // 2)
  return Problem("rosenbrock", rosenbrock_fn, _array(x0), _array(np.ones(n)), 0.0)


def powell_fn(x: Any, batch: Any = None) -> Any:
  """Powell singular function, summed over blocks of 4 coordinates."""
  del batch
  x1, x2, x3, x4 = x[0::4], x[1::4], x[2::4], x[3::4]
  return jnp.sum((x1 + 10.0 * x2) ** 2 + 5.0 * (x3 - x4) ** 2 + (x2 - 2.0 * x3) ** 4
                 + 10.0 * (x1 - x4) ** 4)


def powell_singular(n: int = 4) -> Problem:
  """Powell singular at n a multiple of 4: x0 = (3, -1, 0, 1, ...), x* = 0, f* = 0."""
  _check_multiple("powell_singular", n, 4)
  x0 = np.tile([3.0, -1.0, 0.0, 1.0], n // 4)
  return Problem("powell", powell_fn, _array(x0), _array(np.zeros(n)), 0.0)


def beale_fn(x: Any, batch: Any = None) -> Any:
  """Beale's function of (x, y) = (x[0], x[1])."""
  del batch
  a, b = x[0], x[1]
  return ((1.5 - a + a * b) ** 2 + (2.25 - a + a * b**2) ** 2
          + (2.625 - a + a * b**3) ** 2)


def beale() -> Problem:
  """Beale (n = 2): x0 = (1, 1), x* = (3, 0.5), f* = 0."""
  return Problem("beale", beale_fn, _array([1.0, 1.0]), _array([3.0, 0.5]), 0.0)


def quadratic_matrix(n: int, seed: int = 0, condition: float = 1e3) -> np.ndarray:
  """A seeded symmetric positive definite n x n matrix with eigenvalues logspace(0, log10 cond)."""
  rng = np.random.default_rng(seed)
  q, r = np.linalg.qr(rng.standard_normal((n, n)))
  q = q * np.sign(np.diag(r))  # Haar-distributed orthogonal matrix
  lam = np.logspace(0.0, np.log10(condition), n)
  a = (q * lam) @ q.T
  return 0.5 * (a + a.T)


def make_quadratic_fn(a: Any, x_star: Any) -> Fn:
  """Returns ``fn(x, batch=None) = 0.5 (x - x_star)^T a (x - x_star)``."""

  def fn(x: Any, batch: Any = None) -> Any:
    del batch
    d = x - x_star
    return 0.5 * jnp.dot(d, a @ d)

  return fn


def convex_quadratic(n: int = 2, seed: int = 0, condition: float = 1e3) -> Problem:
  """Seeded convex quadratic with condition number ``condition``: x0 = 0, f* = 0."""
  _check_multiple("convex_quadratic", n, 1)
  if n == 1:
    condition = 1.0
  a = _array(quadratic_matrix(n, seed, condition))
  x_star = _array(np.random.default_rng(seed + 1).standard_normal(n))
  return Problem("quadratic", make_quadratic_fn(a, x_star), _array(np.zeros(n)), x_star, 0.0)


def saddle_fn(x: Any, batch: Any = None) -> Any:
  """The coupled double well with saddles (see the module docstring)."""
  del batch
  u, v = x[0::2], x[1::2]
  wells = jnp.sum(u**4 / 4.0 - u**2 / 2.0 + v**2 / 2.0 + SADDLE_D * v * (u**2 - 1.0))
  coupling = SADDLE_C / 4.0 * jnp.sum((u[1:] ** 2 - u[:-1] ** 2) ** 2)
  return wells + coupling


def saddle_point(n: int) -> np.ndarray:
  """The saddle (u, v) = (0, d) in every pair, a stationary point with negative curvature."""
  _check_multiple("double_well_saddle", n, 2)
  return np.tile([0.0, SADDLE_D], n // 2)


def double_well_saddle(n: int = 2, seed: int = 0) -> Problem:
  """Coupled double well started next to its saddle: f* = -n/8, x* = (1, 0, 1, 0, ...)."""
  x0 = saddle_point(n) + SADDLE_PERTURBATION * np.random.default_rng(seed).standard_normal(n)
  x_star = np.tile([1.0, 0.0], n // 2)
  return Problem("saddle", saddle_fn, _array(x0), _array(x_star), -n / 8.0)


def nearest_minimiser(problem: Problem, x: Any) -> Any:
  """The global minimiser of ``problem`` nearest to ``x``.

  ``x_star`` for the problems with a unique minimiser; for ``saddle`` the sign vector
  (sign(u_k), 0) (sign(0) taken as +1), which minimises the distance over all 2^(n/2) minimisers.
  """
  if problem.name != "saddle":
    return problem.x_star
  x = np.asarray(x, dtype=np.float64)
  near = np.zeros_like(x)
  near[0::2] = np.where(x[0::2] < 0, -1.0, 1.0)
  return _array(near)


SCALABLE: dict[str, tuple[Callable[[int], Problem], int]] = {
    "rosenbrock": (extended_rosenbrock, 2),
    "powell": (powell_singular, 4),
    "quadratic": (convex_quadratic, 1),
    "saddle": (double_well_saddle, 2),
}
FIXED: dict[str, Callable[[], Problem]] = {"beale": beale}


def is_valid_size(name: str, n: int) -> bool:
  """Whether the scalable problem ``name`` is defined at size n."""
  _, multiple = SCALABLE[name]
  return n >= multiple and n % multiple == 0


def get_problems(n: int, include_fixed: bool = True) -> list[Problem]:
  """Every problem at size n: the scalable ones valid at n, then the fixed-size ones.

  Args:
    n: the dimension of the scalable problems.
    include_fixed: add the fixed-size problems (Beale, n = 2) at their own size.

  Returns:
    The list of problems, in a fixed order.
  """
  problems = [make(n) for name, (make, _) in SCALABLE.items() if is_valid_size(name, n)]
  if include_fixed:
    problems += [make() for make in FIXED.values()]
  return problems
