"""The L-SR1 compact form, factored in an orthonormal basis of span(S, Y).

The compact form B = gamma I + Psi M Psi^T (docs/method.md, "L-SR1 matrices") is evaluated via the
LDL^T factorization of M^{-1} = D + L + L^T - gamma S^T S in time order: its pivots are the SR1
denominators d_t = s_t.r_t and Psi L^{-T} = R = [r_1 .. r_k] are the SR1 residuals
r_t = y_t - B_t s_t, so that

  B = gamma I + R D^{-1} R^T = gamma I + Z K Z^T,   K = C D^{-1} C^T,

where Z = [S Y] W is an orthonormal basis of span(S, Y) and C holds the coordinates of the r_t
in it. Everything here works on the k-by-k Gram matrices of S and Y (no pass over n), except one
optional re-orthogonalization pass: no k-by-k inverse of the possibly near-singular M^{-1} is
ever formed, and r_t is built as a coordinate vector by the recursion itself, so rounding errors
grow linearly, not quadratically, with the size of the terms that cancel in y_t - B_t s_t.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from aptsjax import _stack

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST
NOISE = 100.0  # multiple of eps below which a quantity computed from Gram matrices is noise.


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=_HIGHEST)


def eps_of(dtype) -> float:
  return float(jnp.finfo(dtype).eps)


def r_tol(dtype) -> float:
  """The SR1 safeguard's relative tolerance: max(1e-8, 100 eps) (1e-8 in float64, 1.2e-5 in f32)."""
  return max(1e-8, 100.0 * eps_of(dtype))


def rank_tol(dtype) -> float:
  """Eigenvalue threshold of a column-normalized (unit-diagonal) Gram matrix.

  Directions below it are dropped as dependent: 10 eps in float32 (1.2e-6: singular values
  below ~1e-3 of the largest are at the rounding level of the Gram entries; docs/method.md,
  "Numerics"), 1e-12 in float64. Normalizing to unit diagonal first keeps pairs of very different
  lengths from being mistaken for dependent ones.
  """
  return max(1e-12, 10.0 * eps_of(dtype))


def reorthogonalize_below(dtype) -> float:
  """Smallest kept eigenvalue of the unit-diagonal Gram matrix below which the basis is redone.

  The Gram route loses about eps / e_min of orthogonality: 1e-3 (float32) keeps that under
  1e-4; 1e-4 in float64 keeps it under 1e-11, so that whether the pass runs (a threshold
  decision that rounding can flip) changes results by no more than that.
  """
  return 1e-3 if eps_of(dtype) > 1e-10 else 1e-4


def eig_basis(gram: jax.Array, mask: jax.Array, tol: float | None = None
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Coefficients W such that A W is orthonormal, for a stack A with Gram matrix ``gram``.

  The Gram matrix is normalized to unit diagonal (Jacobi scaling) before its
  eigen-decomposition; directions whose eigenvalue is below ``tol`` (default ``rank_tol``) are
  dropped (zero columns, ``keep`` False), so dependent columns never break anything and shapes
  stay fixed.

  Returns:
    ``(W, keep, e_min)``: the coefficients, the kept columns and the smallest kept eigenvalue.
  """
  diag = jnp.diagonal(gram)
  mask = mask & (diag > 0)
  inv_norm = jnp.where(mask, jax.lax.rsqrt(jnp.where(mask, diag, 1.0)), 0.0)
  both = mask[:, None] & mask[None, :]
  e, v = jnp.linalg.eigh(jnp.where(both, inv_norm[:, None] * gram * inv_norm[None, :], 0.0))
  keep = e > (rank_tol(gram.dtype) if tol is None else tol)
  w = v * jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, e, 1.0)), 0.0)[None, :]
  return inv_norm[:, None] * w, keep, jnp.min(jnp.where(keep, e, jnp.inf))


def pair_gram(ss: jax.Array, sy: jax.Array, yy: jax.Array) -> jax.Array:
  """The 2k-by-2k Gram matrix of the stack [S Y]."""
  return jnp.block([[ss, sy], [sy.T, yy]])


def pair_dot(s: PyTree, y: PyTree, v: PyTree) -> jax.Array:
  """[S Y]^T v, a 2k-vector (one pass over the stored pairs)."""
  return jnp.concatenate([_stack.dot(s, v), _stack.dot(y, v)])


def pair_combine(s: PyTree, y: PyTree, c: jax.Array) -> PyTree:
  """[S Y] c for a 2k-vector c (one pass over the stored pairs)."""
  k = _stack.stack_size(s)
  return jax.tree.map(lambda a, b: a + b, _stack.combine(s, c[:k]), _stack.combine(y, c[k:]))


class Factor(NamedTuple):
  """B = gamma I + Z K Z^T with Z = [S Y] ``basis`` orthonormal on the ``keep`` columns."""
  in_use: jax.Array
  basis: jax.Array
  keep: jax.Array
  core: jax.Array


def _coordinates(ss, sy, yy, valid, s, y):
  """An orthonormal basis of span(S, Y) and the coordinates of every s_i and y_i in it."""
  gram = pair_gram(ss, sy, yy)
  w, keep, e_min = eig_basis(gram, jnp.concatenate([valid, valid]))
  coords = _mm(w.T, gram)

  def reorthogonalize(carry):  # one explicit pass: the Gram route squares the conditioning.
    i, w, keep, _ = carry
    k = ss.shape[0]
    z = jax.tree.map(lambda a, b: a + b, _stack.combine_matrix(s, w[:k]),
                     _stack.combine_matrix(y, w[k:]))
    w2, keep2, _ = eig_basis(_stack.gram(z, z), keep)
    coords = _mm(w2.T, jnp.concatenate([_stack.gram(z, s), _stack.gram(z, y)], axis=1))
    return i + 1, _mm(w, w2), keep2, coords

  # 0 or 1 trips; under vmap (APTS subdomains) the pass runs only if some subdomain needs it.
  needed = e_min < reorthogonalize_below(ss.dtype)
  _, w, keep, coords = jax.lax.while_loop(
      lambda c: (c[0] < 1) & needed, reorthogonalize,
      _stack.match_varying((jnp.zeros((), jnp.int32), w, keep, coords), gram[0, 0] + e_min))
  return w, keep, coords


def factor(ss: jax.Array, sy: jax.Array, yy: jax.Array, stamp: jax.Array, gamma: jax.Array,
           s: PyTree, y: PyTree) -> Factor:
  """The pairs in use and the factored B, by the SR1 recursion from gamma I, oldest first.

  Pair t is kept iff, with r = y_t - B_t s_t over the kept pairs before it, the pivot
  d = s_t.r satisfies |d| > r_tol |s_t| |r| and r and d are above their rounding noise
  (NOISE eps times the size of the terms summed). The kept pairs keep M^{-1} nonsingular.

  Args:
    ss: the Gram matrix S^T S in slot order.
    sy: S^T Y in slot order.
    yy: the Gram matrix Y^T Y in slot order.
    stamp: insertion numbers, -1 for empty slots.
    gamma: B_0 = gamma I.
    s: the stack S (read only when the basis needs re-orthogonalizing).
    y: the stack Y (likewise).

  Returns:
    A ``Factor``.
  """
  dtype = ss.dtype
  eps, tol = eps_of(dtype), r_tol(dtype)
  k = stamp.shape[0]
  valid = stamp >= 0
  order = jnp.argsort(jnp.where(valid, stamp, jnp.iinfo(jnp.int32).max))
  w, keep, coords = _coordinates(ss, sy, yy, valid, s, y)
  cs, cy = coords[:, :k][:, order], coords[:, k:][:, order]     # time order
  cpsi = cy - gamma * cs
  valid_t = valid[order]

  def step(carry, t):
    kept, res, dinv = carry
    proj = _mm(res.T, cs[:, t]) * dinv                          # (r_j . s_t) / d_j
    low = _mm(res, proj)                                        # (B_t - gamma I) s_t
    r = cpsi[:, t] - low
    d = cs[:, t] @ r
    s_n, y_n = jnp.linalg.norm(cs[:, t]), jnp.linalg.norm(cy[:, t])
    r_n, bs_n = jnp.linalg.norm(r), jnp.linalg.norm(gamma * cs[:, t] + low)
    scale = (y_n + jnp.abs(gamma) * s_n + bs_n
             + jnp.sum(jnp.abs(proj) * jnp.linalg.norm(res, axis=0)))
    ok = (valid_t[t] & jnp.isfinite(d) & jnp.isfinite(r_n)
          & (jnp.abs(d) > tol * s_n * r_n)
          & (r_n > NOISE * eps * scale)
          & (jnp.abs(d) > NOISE * eps * s_n * scale))
    res = res.at[:, t].set(jnp.where(ok, r, 0.0))
    dinv = dinv.at[t].set(jnp.where(ok, 1.0 / jnp.where(ok, d, 1.0), 0.0))
    return (kept.at[t].set(ok), res, dinv), None

  start = (jnp.zeros((k,), bool), jnp.zeros((2 * k, k), dtype), jnp.zeros((k,), dtype))
  (kept, res, dinv), _ = jax.lax.scan(
      step, _stack.match_varying(start, cpsi[0, 0] + gamma), jnp.arange(k))
  core = _mm(res * dinv[None, :], res.T)
  core = 0.5 * (core + core.T)
  in_use = jnp.zeros((k,), bool).at[order].set(kept)
  return Factor(in_use=in_use, basis=w, keep=keep, core=core)


class Spectral(NamedTuple):
  """Thin spectral decomposition B = gamma I + P_par diag(lam - gamma) P_par^T.

  Attributes:
    coef: ``(2k, 2k)`` coefficients of P_par on the stack [S Y] (invalid columns zero).
    lam: ``(2k,)`` eigenvalues of B on span(P_par) (meaningful where ``valid``).
    valid: ``(2k,)`` bool, the columns of P_par that are real directions (the first ``rank``).
    gamma: the eigenvalue of B on the orthogonal complement of span(P_par).
  """
  coef: jax.Array
  lam: jax.Array
  valid: jax.Array
  gamma: jax.Array


def spectral(gamma: jax.Array, basis: jax.Array, keep: jax.Array, core: jax.Array) -> Spectral:
  """Eigen-decomposition of K on the kept basis directions: P_par = Z U, lam = gamma + eig(K)."""
  both = keep[:, None] & keep[None, :]
  sentinel = 2.0 * jnp.linalg.norm(core) + 1.0                # above every eigenvalue of K
  lam_hat, u = jnp.linalg.eigh(jnp.where(both, core, 0.0) + jnp.diag(jnp.where(keep, 0.0, sentinel)))
  valid = jnp.arange(keep.shape[0]) < jnp.sum(keep)           # sentinels sort last
  coef = jnp.where(valid[None, :], _mm(basis, u), 0.0)
  return Spectral(coef=coef, lam=jnp.where(valid, lam_hat + gamma, gamma), valid=valid,
                  gamma=gamma)


def low_rank_matvec(s: PyTree, y: PyTree, basis: jax.Array, core: jax.Array, v: PyTree) -> PyTree:
  """Z K Z^T v, two passes over the stored pairs."""
  return pair_combine(s, y, _mm(basis, _mm(core, _mm(basis.T, pair_dot(s, y, v)))))


def complement_pattern(like: PyTree) -> PyTree:
  """A fixed, dense, deterministic vector shaped like ``like`` (for complement directions)."""
  offsets = np.cumsum([0] + [int(np.prod(x.shape)) for x in jax.tree.leaves(like)])[:-1]
  leaves, treedef = jax.tree.flatten(like)
  return jax.tree.unflatten(treedef, [
      jnp.cos(0.7548776662 * (o + 1 + jnp.arange(x.size, dtype=x.dtype))).reshape(x.shape)
      for o, x in zip(offsets, leaves)])
