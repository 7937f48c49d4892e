"""Dense float64 numpy oracles: the L-SR1 matrix, the trust-region subproblem, the RMS scaling D
and the L-SR1 gamma.

These never call aptsjax: they build n x n matrices and full eigendecompositions, which is
fine for the small n used in tests.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.optimize


def sr1_dense(S: np.ndarray, Y: np.ndarray, gamma: float) -> np.ndarray:
  """Dense SR1 recursion from B0 = gamma*I over the pairs (rows of S, Y, oldest first).

  B_{j+1} = B_j + r r^T / (r.s_j),  r = y_j - B_j s_j.
  """
  S = np.asarray(S, dtype=np.float64)
  Y = np.asarray(Y, dtype=np.float64)
  if S.ndim != 2 or S.shape != Y.shape:
    raise ValueError(f"S and Y must be (k, n) of equal shape, got {S.shape}, {Y.shape}")
  n = S.shape[1]
  B = float(gamma) * np.eye(n)
  for s, y in zip(S, Y):
    r = y - B @ s
    B = B + np.outer(r, r) / (r @ s)
  return 0.5 * (B + B.T)


def model_value(g: np.ndarray, B: np.ndarray, p: np.ndarray) -> float:
  """The quadratic model g.p + 0.5 p.Bp in float64."""
  g = np.asarray(g, dtype=np.float64)
  B = np.asarray(B, dtype=np.float64)
  p = np.asarray(p, dtype=np.float64)
  return float(g @ p + 0.5 * p @ (B @ p))


def tr_subproblem_dense(
    g: np.ndarray, B: np.ndarray, radius: float
) -> tuple[np.ndarray, float]:
  """Global minimiser of g.p + 0.5 p.Bp subject to |p| <= radius (More-Sorensen, dense).

  Works on the full eigendecomposition B = V diag(lam) V^T, a = V^T g. Candidates:
  - interior: B positive semidefinite and the minimum-norm solution of B p = -g (eigenvalues
    below a relative threshold treated as zero) lies inside; only taken when g has no component
    on those zero eigenvalues (B PD: p = -B^-1 g);
  - boundary: sigma >= max(0, -lam_min) with |p(sigma)| = radius, p(sigma) = -(B + sigma I)^-1 g,
    found by scipy.optimize.brentq in the shifted variable t = sigma - max(0, -lam_min);
  - hard case: lam_min < 0, p_hat = -(B - lam_min I)^+ g inside, p = p_hat + tau z with z a unit
    eigenvector of lam_min and |p| = radius;
  - p = 0.
  Eigenvalues within 1e-10 |B|_2 of zero are treated as exactly zero. Every candidate is
  feasible; the one with the lowest model value is returned (the global minimiser is always among
  them, so tolerance choices near case boundaries cannot pick a wrong branch).
  Returns (p, model_value(g, B, p)).
  """
  g = np.asarray(g, dtype=np.float64)
  B = np.asarray(B, dtype=np.float64)
  radius = float(radius)
  if not (np.isfinite(radius) and radius > 0):
    raise ValueError(f"radius must be finite and > 0, got {radius}")
  B = 0.5 * (B + B.T)
  lam, V = np.linalg.eigh(B)
  a = V.T @ g
  g_norm = float(np.linalg.norm(g))
  lam_scale = max(float(np.max(np.abs(lam))), np.finfo(np.float64).tiny)
  zero_tol = 1e-10 * lam_scale
  # Rounding makes the zero eigenvalues of a singular B come out as +-1e-16 |B|: call them zero.
  lam = np.where(np.abs(lam) <= zero_tol, 0.0, lam)
  lam_min = float(lam[0])

  candidates = [np.zeros_like(g)]

  # Interior (PD) or minimum-norm interior (PSD singular, g in range(B)).
  if lam_min >= -zero_tol:
    nonzero = lam > zero_tol
    g_in_range = np.linalg.norm(a[~nonzero]) <= 1e-10 * max(g_norm, 1e-300)
    if g_in_range:
      p = -V[:, nonzero] @ (a[nonzero] / lam[nonzero])
      if np.linalg.norm(p) <= radius:
        candidates.append(p)

  # Boundary, secular equation in the shifted variable t >= 0.
  sigma_lo = max(0.0, -lam_min)
  d = lam + sigma_lo  # >= 0 up to rounding
  d = np.maximum(d, 0.0)

  def p_of(t: float) -> np.ndarray:
    return -V @ (a / (d + t))

  def f(t: float) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
      val = np.linalg.norm(a / (d + t))
    return float(val) - radius if np.isfinite(val) else np.inf

  if g_norm > 0:
    # |p(t)| <= |g| / (min(d) + t) <= radius at t_hi.
    t_hi = g_norm / radius + 1.0
    if f(t_hi) > 0:  # cannot happen, but keep brentq's bracket valid
      t_hi = 2.0 * g_norm / radius + 1.0
    t_lo = t_hi
    for _ in range(4000):
      if f(t_lo) > 0:
        break
      t_lo *= 0.25
      if t_lo < 1e-300:
        break
    if f(t_lo) > 0 and f(t_hi) <= 0:
      t_star = scipy.optimize.brentq(f, t_lo, t_hi, xtol=1e-300,
                                     rtol=4 * np.finfo(float).eps, maxiter=2000)
      p = p_of(t_star)
      p *= radius / np.linalg.norm(p)
      candidates.append(p)

  # Hard case: lam_min < 0, p_hat = -(B - lam_min I)^+ g inside, then move to the boundary.
  if lam_min < -zero_tol:
    hard = d <= zero_tol
    p_hat = -V[:, ~hard] @ (a[~hard] / d[~hard])
    p_hat_norm = float(np.linalg.norm(p_hat))
    if p_hat_norm <= radius:
      z = V[:, 0]
      tau = np.sqrt(max(radius**2 - p_hat_norm**2, 0.0))
      for sign in (1.0, -1.0):
        p = p_hat + sign * tau * z
        candidates.append(p * min(1.0, radius / np.linalg.norm(p)))

  # Negative curvature with g = 0 (covered by the hard case above, kept explicit for clarity).
  if lam_min < -zero_tol and g_norm == 0:
    candidates.append(radius * V[:, 0])

  values = [model_value(g, B, p) for p in candidates]
  best = int(np.argmin(values))
  return candidates[best], values[best]


def rms_oracle(grads: list[np.ndarray], decay: float, eps: float) -> tuple[np.ndarray, np.ndarray]:
  """Adam's bias-corrected second moment and D from a sequence of flat gradients (float64).

  Returns ``(nu, d)`` after the last gradient: nu = EMA of g * g, w = sqrt(nu / (1 - decay^t))
  + eps and D = sqrt(w / mean(w)).
  """
  nu = np.zeros_like(grads[0], dtype=np.float64)
  for g in grads:
    nu = decay * nu + (1.0 - decay) * np.asarray(g, np.float64) ** 2
  w = np.sqrt(nu / (1.0 - decay ** len(grads))) + eps
  return nu, np.sqrt(w / np.mean(w))


def gamma_oracle(S: np.ndarray, Y: np.ndarray) -> float:
  """gamma = mu_min / 2 of the pencil (D + L + L^T, S^T S) over the pairs (rows, oldest first).

  Only for pairs where mu_min > 0 and S has full rank (the caller's test asserts both).
  """
  sy = S @ Y.T                          # [i, j] = s_i . y_j
  k = S.shape[0]
  newer = np.arange(k)[:, None] >= np.arange(k)[None, :]
  sym = np.where(newer, sy, sy.T)       # s_newer . y_older
  mu = scipy.linalg.eigh(sym, S @ S.T, eigvals_only=True)
  assert mu[0] > 0, mu
  return 0.5 * float(mu[0])
