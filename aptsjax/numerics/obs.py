"""The trust-region subproblem for an L-SR1 matrix: the orthonormal-basis SR1 (OBS) method.

Solves  min_p  g.p + 0.5 p.B p  subject to |p|_2 <= radius  globally (Brust, Erway & Marcia,
COAP 66, 2017; docs/method.md, "The subproblem: OBS") for B = gamma I + Psi M Psi^T from
``aptsjax.lsr1``, in O(n k^2) time and O(n k) memory, never forming B. With the thin spectral
decomposition B = P_par diag(lam) P_par^T + gamma (I - P_par P_par^T) (``lsr1.spectral``), the
problem separates into the eigen-components a = P_par^T g and the complement g_perp = g - P_par a
(formed explicitly, docs/method.md, "Numerics"), and

  p(sigma) = -P_par (diag(lam) + sigma I)^{-1} a - g_perp / (gamma + sigma).

Cases: interior (B positive definite and |B^{-1} g| <= radius; or B positive semidefinite and
singular with g in its range and the minimum-norm minimiser inside); boundary (Newton on
phi(sigma) = 1/|p(sigma)| - 1/radius, started where phi <= 0 so it is monotone, in the shifted
variable t = sigma + lam_min so the hard case stays accurate); hard case (lam_min < 0, g
orthogonal to its eigenvectors and |(B - lam_min I)^+ g| < radius: p = -(B - lam_min I)^+ g + tau z).
The predicted reduction is a sum of non-negative eigen-terms (no cancellation), and the final
step is rescaled, if rounding made it longer, so that |p| <= radius always.

A non-finite or non-positive traced radius, or a non-finite gradient, gives the zero step with
zero predicted reduction (callers then reject it).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import numpy as np

from aptsjax.numerics import tree as _stack
from aptsjax.numerics import compact
from aptsjax.numerics import lsr1
from aptsjax.numerics.compact import mm as _mm

PyTree = Any

_NEWTON_TOL = 1e-5      # Newton ends once |p| is within min(this, 100 eps) of the radius (relative).
_NEWTON_MAX_ITERS = 60  # cap on Newton iterations (monotone convergence needs far fewer).


class OBSResult(NamedTuple):
  """Solution of the trust-region subproblem.

  Attributes:
    step: the minimiser p, a pytree like the gradient, |p| <= radius.
    predicted_reduction: -(g.p + 0.5 p.B p) >= 0.
    on_boundary: whether |p| = radius.
    sigma: the Lagrange multiplier (0 for interior solutions).
    hard_case: whether the hard case occurred.
  """
  step: PyTree
  predicted_reduction: jax.Array
  on_boundary: jax.Array
  sigma: jax.Array
  hard_case: jax.Array


def check_radius(radius: Any) -> None:
  """Raises ValueError for a radius known (not traced) to be non-positive or non-finite."""
  if isinstance(radius, jax.core.Tracer):
    return
  value = np.asarray(radius)
  if value.shape != ():
    raise ValueError(f"radius must be a scalar, got shape {value.shape}.")
  if not (math.isfinite(float(value)) and float(value) > 0):
    raise ValueError(f"radius must be positive and finite, got {float(value)}.")


def first_order_step(grad: PyTree, radius: Any) -> OBSResult:
  """The trust-region step of the first-order model (B = 0): p = -radius g / |g|.

  Args:
    grad: the gradient g, a pytree of floating arrays.
    radius: the trust-region radius (> 0).

  Returns:
    An ``OBSResult`` with predicted reduction radius |g|; the zero step when g = 0, g is not
    finite, or a traced radius is not positive and finite.
  """
  check_radius(radius)
  dtype = _stack.tree_dtype(grad)
  gnorm = _stack.norm(grad)   # at least float32: half-precision gradients are scaled in float32
  radius = jnp.asarray(radius, dtype).astype(gnorm.dtype)
  ok = (gnorm > 0) & jnp.isfinite(gnorm) & jnp.isfinite(radius) & (radius > 0)
  scale = jnp.where(ok, -radius / jnp.where(ok, gnorm, 1.0), 0.0)
  step = jax.tree.map(
      lambda g: jnp.where(ok, scale * g.astype(scale.dtype), 0.0).astype(g.dtype), grad)
  zero = jnp.zeros((), gnorm.dtype)
  return OBSResult(step=step, predicted_reduction=jnp.where(ok, radius * gnorm, zero).astype(dtype),
                   on_boundary=ok,
                   sigma=jnp.where(ok, gnorm / jnp.where(ok, radius, 1.0), zero).astype(dtype),
                   hard_case=jnp.array(False))


def solve(grad: PyTree, state: lsr1.LSR1State, radius: Any) -> OBSResult:
  """Global minimiser of g.p + 0.5 p.B p over |p| <= radius for the L-SR1 matrix B of ``state``.

  Args:
    grad: the gradient g, a pytree like the parameters of ``state``.
    state: an ``lsr1.LSR1State`` (B = 0 when it holds no pair in use: the first-order step).
    radius: the trust-region radius, > 0.

  Returns:
    An ``OBSResult``.
  """
  check_radius(radius)
  lsr1.check_vector(state, grad, "grad")
  like = jax.tree.map(lambda b: b[0], state.s)
  g = jax.tree.map(lambda x, r: jnp.asarray(x).astype(r.dtype), grad, like)
  dtype = state.ss.dtype
  eps = float(jnp.finfo(dtype).eps)
  zero_tol = 1e3 * eps
  # Quadratic convergence makes a tight tolerance cheap; in float64 it keeps the step a smooth
  # function of the data (a loose stop would let rounding change the iteration count).
  newton_tol = min(_NEWTON_TOL, 100.0 * eps)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(like))
  radius = jnp.asarray(radius, dtype)
  finite = _stack.all_finite(g) & jnp.isfinite(radius) & (radius > 0)
  # A non-finite g is not zeroed (a pass over it): the final ``ok`` returns the zero step.
  delta = jnp.where(finite, radius, 1.0)

  spec = lsr1.spectral(state)
  k = spec.valid.shape[0]                        # 2 memory eigen-directions at most
  coef = jnp.where(spec.valid[None, :], spec.coef, 0.0)
  # Pass 1 over the pairs: a_par = P_par^T g.
  a_par = jnp.where(spec.valid, _mm(coef.T, lsr1.pair_dots(state, [g]))[:, 0], 0.0)
  # Pass 2: the explicit projection g_perp = g - P_par a_par, for its norm.
  proj = lsr1.pair_combine(state, _mm(coef, a_par[:, None]))
  gperp_norm = _stack.norm(jax.tree.map(lambda x, p: x - p[0], g, proj))
  # For the hard case in the complement: the unit vector e_i among 4k fixed ones (entries of the
  # smallest leaves, ``compact.unit_entries``) that is farthest from span(P_par)
  # (|z_perp|^2 >= 1/2 when n >= 4k: sum_i |P_par^T e_i|^2 <= 2k), from entries of S and Y only.
  ez = _mm(coef.T, jnp.concatenate([compact.unit_entries(state.s, 2 * k),
                                    compact.unit_entries(state.y, 2 * k)]))
  z_sq = 1.0 - jnp.sum(ez**2, axis=0)                 # |e_i - P_par P_par^T e_i|^2
  z_pick = jnp.argmax(z_sq)
  zc, zperp_norm = ez[:, z_pick], jnp.sqrt(jnp.maximum(z_sq[z_pick], 0.0))
  gnorm = _stack.norm(g)
  has_complement = jnp.sum(spec.valid) < n

  # Components: k eigen-directions, then the complement (eigenvalue gamma).
  act = jnp.concatenate([spec.valid, has_complement[None]])
  lam = jnp.concatenate([spec.lam, spec.gamma[None]])
  a = jnp.concatenate([a_par, gperp_norm[None]])
  a = jnp.where(act, a, 0.0)
  a_small = jnp.abs(a) <= zero_tol * gnorm
  lam_min = jnp.min(jnp.where(act, lam, jnp.inf))
  scale = jnp.maximum(jnp.max(jnp.where(act, jnp.abs(lam), 0.0)), jnp.finfo(dtype).tiny)
  lam_tol = zero_tol * scale
  mu = jnp.where(act, lam - lam_min, 1.0)        # shifted eigenvalues, >= 0
  t_low = jnp.maximum(lam_min, 0.0)              # t = sigma + lam_min >= t_low

  # Pseudo-inverse solution at sigma = max(0, -lam_min).
  sing = act & (mu + t_low <= lam_tol)
  sing_has_g = jnp.any(sing & ~a_small)
  regular = act & ~sing
  den_low = jnp.where(regular, mu + t_low, 1.0)
  p_low_norm = jnp.sqrt(jnp.sum(jnp.where(regular, (a / den_low) ** 2, 0.0)))
  inside = ~sing_has_g & (p_low_norm <= delta)
  interior = inside & (lam_min >= -lam_tol)
  hard = inside & ~interior

  # Newton on phi(t) = 1/|p| - 1/delta, from t0 where phi(t0) <= 0 (monotone).
  def pnorm_and_slope(t):
    den = jnp.where(act, mu + t, 1.0)
    terms = jnp.where(act, a**2, 0.0)
    return jnp.sqrt(jnp.sum(terms / den**2)), jnp.sum(terms / den**3)

  big = act & ~a_small
  t0 = jnp.maximum(t_low, jnp.max(jnp.where(big, jnp.abs(a) / delta - mu, -jnp.inf)))
  t0 = jnp.where(jnp.isfinite(t0), t0, t_low)

  def cond(carry):
    t, it = carry
    pn, _ = pnorm_and_slope(t)
    return (~inside) & (it < _NEWTON_MAX_ITERS) & (pn - delta > newton_tol * delta)

  def body(carry):
    t, it = carry
    pn, slope = pnorm_and_slope(t)
    t_new = t + (pn - delta) / delta * pn**2 / jnp.where(slope > 0, slope, 1.0)
    return jnp.where(jnp.isfinite(t_new) & (t_new > t), t_new, t), it + 1

  ref = jnp.sum(a) + jnp.sum(mu) + delta      # varies over every mesh axis the inputs do
  t_star, _ = jax.lax.while_loop(
      cond, body, _stack.match_varying((t0, jnp.zeros((), jnp.int32)), ref))
  t = jnp.where(inside, t_low, t_star)
  used = jnp.where(inside, regular, act)
  den = jnp.where(used, mu + t, 1.0)
  x = jnp.where(used, -a / den, 0.0)             # components of p along each direction
  x_norm = jnp.sqrt(jnp.sum(x**2))
  c = jnp.where(inside | (x_norm == 0), 1.0, delta / jnp.where(x_norm > 0, x_norm, 1.0))

  # Hard case: add tau z along an eigenvector of lam_min (in P_par, or the complement, where
  # z = z_perp / |z_perp|).
  tau = jnp.where(hard, jnp.sqrt(jnp.maximum(delta**2 - p_low_norm**2, 0.0)), 0.0)
  par_sing = sing[:k]
  z_index = jnp.argmax(par_sing)
  z_in_par = jnp.any(par_sing)

  # Pass 3: the step p = P_par xs + perp_coef g_perp + tau_z z_perp, written as
  # [S Y] coef (xs - perp_coef a_par - tau_z P_par^T e_i) + perp_coef g + tau_z e_i.
  xs = c * x[:k] + jnp.where(z_in_par & (jnp.arange(k) == z_index), tau, 0.0)
  perp_coef = c * jnp.where(used[k], -1.0 / den[k], 0.0)
  tau_z = jnp.where(z_in_par | (zperp_norm == 0), 0.0, tau / jnp.where(zperp_norm > 0, zperp_norm, 1.0))
  par = _mm(coef, (xs - perp_coef * a_par - tau_z * zc)[:, None])
  step = jax.tree.map(lambda p, gv: p[0] + perp_coef.astype(p.dtype) * gv,
                      lsr1.pair_combine(state, par), g)
  step = compact.add_unit(step, jnp.where(jnp.arange(ez.shape[1]) == z_pick, tau_z, 0.0))
  # Rounding (P_par is orthonormal only to working precision) changes |p| slightly: scale by f
  # so that |p| <= radius always, and the predicted reduction with it.
  # A boundary (or hard-case) step is scaled to length exactly radius, an interior one only down.
  step_norm = _stack.norm(step)
  to_radius = delta / jnp.where(step_norm > 0, step_norm, 1.0)
  f = jnp.where(~interior & (step_norm > 0), to_radius, jnp.minimum(to_radius, 1.0))
  step = jax.tree.map(lambda p: (f * p).astype(p.dtype), step)
  lam_orig = mu + lam_min
  fc = f * c
  terms = jnp.where(used, fc * a**2 / den * (1.0 - 0.5 * fc * lam_orig / den), 0.0)
  pred = jnp.sum(terms) - 0.5 * lam_min * (f * tau) ** 2
  sigma = jnp.maximum(t - lam_min, 0.0)
  ok = finite & jnp.isfinite(pred)
  step = optax.tree.where(ok, step, optax.tree.zeros_like(step))
  return OBSResult(step=step, predicted_reduction=jnp.where(ok, jnp.maximum(pred, 0.0), 0.0),
                   on_boundary=ok & ~interior, sigma=jnp.where(ok, sigma, 0.0),
                   hard_case=ok & hard)
