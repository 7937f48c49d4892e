"""Limited-memory SR1 (L-SR1) matrices in compact form, on pytrees.

The matrix kept here is (METHOD.md section 3; Erway & Marcia, SIMAX 2015)

  B = gamma I + Psi M Psi^T,   Psi = Y - gamma S,   M = (D + L + L^T - gamma S^T S)^{-1},

with S^T Y = L + D + U over the pairs *in use*, taken oldest first. It equals the SR1 recursion
B_{j+1} = B_j + r r^T / (r.s_j), r = y_j - B_j s_j, started from B_0 = gamma I over those pairs.

Pairs live in a ring buffer of ``memory`` slots (stacks whose leaves have shape
``(memory, *leaf.shape)``) with the k-by-k Gram matrices S^T S, S^T Y and Y^T Y kept up to date
with O(n k) work per pair, so that everything that depends on gamma is O(k^3). An ``update``:

1. rejects a pair with a non-finite entry (the state is returned unchanged);
2. tests the SR1 safeguard against the current B (explicitly, one pass over n):
   skip unless |s.r| > r_tol |s| |r| and |r| > c eps (|y| + |B s|), r = y - B s;
3. inserts the pair into the ring, dropping the oldest;
4. recomputes gamma from the stored pairs (:func:`choose_gamma`);
5. recomputes the in-use mask from scratch, oldest to newest, each pair tested against the
   recursion from gamma I over the kept pairs before it (:func:`in_use_mask`); a pair masked out
   can come back when gamma changes;
6. sets gamma = 0 while no pair is in use (B = 0: the first step of a method built on this is the
   first-order step, with no hidden learning rate).

``dense_pairs`` reports exactly the pairs that ``matvec`` and the OBS solver use.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from aptsjax import _stack

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=_HIGHEST)


def _eps(dtype) -> float:
  return float(jnp.finfo(dtype).eps)


def r_tol(dtype) -> float:
  """The SR1 safeguard's relative tolerance: max(1e-8, 100 eps) (1e-8 in float64, 1.2e-5 in f32)."""
  return max(1e-8, 100.0 * _eps(dtype))


def rank_tol(dtype) -> float:
  """Eigenvalue threshold of a column-normalized (unit-diagonal) Gram matrix.

  Directions below it are dropped as dependent: 10 eps in float32 (1.2e-6: singular values
  below ~1e-3 of the largest are at the rounding level of the Gram entries, METHOD.md section
  7), 1e-12 in float64. The Gram matrices are normalized to unit diagonal first, so pairs of
  very different lengths are not mistaken for dependent ones.
  """
  return max(1e-12, 10.0 * _eps(dtype))


_NOISE = 100.0  # multiple of eps below which a quantity computed from Gram matrices is noise.


class LSR1State(NamedTuple):
  """State of an L-SR1 matrix (a pytree: jit-, vmap- and shard_map-friendly).

  Attributes:
    s: stack of steps, leaves of shape ``(memory, *param.shape)``; slot ``i`` holds one pair.
    y: stack of gradient differences, same layout as ``s``.
    ss: ``(memory, memory)`` Gram matrix S^T S in slot order.
    sy: ``(memory, memory)`` matrix S^T Y in slot order: ``sy[i, j] = <s_i, y_j>``.
    yy: ``(memory, memory)`` Gram matrix Y^T Y in slot order.
    stamp: ``(memory,)`` int32 insertion number of each slot's pair, -1 for an empty slot; it
      gives the time order (oldest = smallest) that L and D refer to.
    count: int32 scalar, the number of pairs inserted so far (the next stamp; the next slot is
      ``count % memory``).
    gamma: scalar, B_0 = gamma I.
    in_use: ``(memory,)`` bool, the pairs that define B (stored and passing the recursion test).
  """
  s: PyTree
  y: PyTree
  ss: jax.Array
  sy: jax.Array
  yy: jax.Array
  stamp: jax.Array
  count: jax.Array
  gamma: jax.Array
  in_use: jax.Array


def memory_size(state: LSR1State) -> int:
  """Returns the static number of slots of ``state``."""
  return state.stamp.shape[-1]


def init(params: PyTree, memory: int = 10) -> LSR1State:
  """Returns an empty L-SR1 state for vectors shaped like ``params`` (B = 0, gamma = 0).

  Args:
    params: a pytree of floating arrays (only shapes and dtypes are used).
    memory: the number of (s, y) pairs kept, a Python int >= 1.

  Returns:
    An ``LSR1State`` with no pairs.
  """
  if isinstance(memory, bool) or not isinstance(memory, (int, np.integer)) or memory < 1:
    raise ValueError(f"memory must be an integer >= 1, got {memory!r}.")
  leaves = jax.tree.leaves(params)
  if not leaves:
    raise ValueError("params must contain at least one array.")
  for leaf in leaves:
    if not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
      raise ValueError(f"params leaves must be floating arrays, got dtype {jnp.asarray(leaf).dtype}.")
  memory = int(memory)
  dtype = _stack.tree_dtype(params)
  zeros = lambda p: jnp.zeros((memory,) + jnp.shape(p), jnp.asarray(p).dtype)
  small = jnp.zeros((memory, memory), dtype)
  return LSR1State(
      s=jax.tree.map(zeros, params), y=jax.tree.map(zeros, params), ss=small, sy=small, yy=small,
      stamp=jnp.full((memory,), -1, jnp.int32), count=jnp.zeros((), jnp.int32),
      gamma=jnp.zeros((), dtype), in_use=jnp.zeros((memory,), bool))


def time_symmetric(sy: jax.Array, stamp: jax.Array) -> jax.Array:
  """Returns D + L + L^T from S^T Y given in slot order.

  Entry (i, j) is <s_newer, y_older> of the two slots (<s_i, y_i> on the diagonal), which is
  D + L + L^T of S^T Y = L + D + U once the slots are sorted oldest first.
  """
  newer = stamp[:, None] >= stamp[None, :]
  return jnp.where(newer, sy, sy.T)


def _masked_inverse(a: jax.Array, mask: jax.Array) -> jax.Array:
  """Inverse of ``a`` restricted to ``mask`` (rows and columns outside it are zero)."""
  both = mask[:, None] & mask[None, :]
  full = jnp.where(both, a, 0.0) + jnp.diag(jnp.where(mask, 0.0, 1.0).astype(a.dtype))
  return jnp.where(both, jnp.linalg.inv(full), 0.0)


def choose_gamma(ss: jax.Array, sy: jax.Array, stamp: jax.Array, gamma_prev: jax.Array
                 ) -> jax.Array:
  """Safeguarded gamma from the smallest eigenvalue of the pencil (D + L + L^T, S^T S).

  gamma = mu_min / 2 when the smallest generalized eigenvalue mu_min of
  (D + L + L^T) x = mu S^T S x over the stored pairs is positive (above 100 eps times the largest
  in magnitude); otherwise the previous gamma. Directions of the unit-diagonal S^T S below
  sqrt(eps) are left out (repeated or collinear steps, where the pencil is ill-determined).

  Why: any gamma < mu_min makes M^{-1} = D + L + L^T - gamma S^T S positive definite, so every
  stored pair is usable and B is positive definite when all observed curvature is positive; the
  factor 1/2 keeps M^{-1} away from singular and leaves gamma a safe underestimate of the observed
  curvature (steps on the complement of span(Psi) are not too short). When a pair shows negative
  curvature (mu_min <= 0) gamma is kept, so the negative curvature is carried by M, and the
  in-use mask removes any pair that would make M^{-1} singular. Unlike y.y / s.y of the newest
  pair, this never makes a collinear pair (y = c s) unusable.

  Args:
    ss: S^T S in slot order.
    sy: S^T Y in slot order.
    stamp: insertion numbers, -1 for empty slots.
    gamma_prev: the previous gamma.

  Returns:
    The new gamma (scalar).
  """
  valid = stamp >= 0
  both = valid[:, None] & valid[None, :]
  # S W orthonormal on span(S); the pencil is only trusted on well-determined directions.
  w, keep = _eig_basis(ss, valid, tol=float(np.sqrt(_eps(ss.dtype))))
  c = _mm(_mm(w.T, jnp.where(both, time_symmetric(sy, stamp), 0.0)), w)
  scale = jnp.max(jnp.abs(c))
  sentinel = 2.0 * scale + 1.0
  mu = jnp.linalg.eigvalsh(c + jnp.diag(jnp.where(keep, 0.0, sentinel)))
  mu_min = mu[0]
  ok = jnp.any(keep) & jnp.isfinite(mu_min) & (mu_min > _NOISE * _eps(ss.dtype) * scale)
  return jnp.where(ok, 0.5 * mu_min, gamma_prev).astype(ss.dtype)


def in_use_mask(ss: jax.Array, sy: jax.Array, yy: jax.Array, stamp: jax.Array,
                gamma: jax.Array) -> jax.Array:
  """Returns the pairs in use: those the SR1 recursion from gamma I accepts, oldest first.

  Pair j (in time order) is kept iff, with B_j the recursion over the kept pairs before it and
  r = y_j - B_j s_j, the denominator d = s_j.r (the pivot of M^{-1}) satisfies
  |d| > r_tol |s_j| |r|, |r| is above rounding noise and d above its own rounding noise. All of
  it is computed from the k-by-k Gram matrices, in O(k^4) with k = memory: no pass over n.
  The kept pairs make M^{-1} nonsingular (its LDL^T pivots in time order are the d's).

  Args:
    ss, sy, yy: the Gram matrices in slot order.
    stamp: insertion numbers, -1 for empty slots.
    gamma: B_0 = gamma I.

  Returns:
    A bool mask over the slots.
  """
  dtype = ss.dtype
  eps, tol = _eps(dtype), r_tol(dtype)
  k = stamp.shape[0]
  valid = stamp >= 0
  order = jnp.argsort(jnp.where(valid, stamp, jnp.iinfo(jnp.int32).max))
  perm = lambda x: x[order][:, order]
  a = perm(time_symmetric(sy, stamp) - gamma * ss)          # M^{-1} before masking.
  pp = perm(yy - gamma * (sy + sy.T) + gamma**2 * ss)         # Psi^T Psi.
  ss_t, yy_t, valid_t = perm(ss), perm(yy), valid[order]

  def step(kept, t):
    u = jnp.where(kept, a[:, t], 0.0)                          # Psi_K^T s_t.
    w = _mm(_masked_inverse(a, kept), u)                       # M_K Psi_K^T s_t.
    wpw = w @ _mm(pp, w)
    d = a[t, t] - u @ w
    r2 = jnp.maximum(pp[t, t] - 2.0 * (w @ pp[:, t]) + wpw, 0.0)
    bs2 = jnp.maximum(gamma**2 * ss_t[t, t] + 2.0 * gamma * (u @ w) + wpw, 0.0)
    s2, y2 = ss_t[t, t], yy_t[t, t]
    # Rounding scale of r = psi_t - Psi_K w: the sizes of the terms summed, cancellation included.
    terms = jnp.sum(jnp.abs(w) * jnp.sqrt(jnp.maximum(jnp.diagonal(pp), 0.0)))
    scale = jnp.sqrt(y2) + jnp.sqrt(bs2) + jnp.abs(gamma) * jnp.sqrt(s2) + terms
    keep = (valid_t[t] & jnp.isfinite(d) & jnp.isfinite(r2)
            & (jnp.abs(d) > tol * jnp.sqrt(s2 * r2))
            & (r2 > _NOISE * eps * scale**2)
            & (jnp.abs(d) > _NOISE * eps * jnp.sqrt(s2) * scale))
    return kept.at[t].set(keep), None

  kept, _ = jax.lax.scan(step, _stack.match_varying(jnp.zeros((k,), bool), a[0, 0] + pp[0, 0]),
                         jnp.arange(k))
  return jnp.zeros((k,), bool).at[order].set(kept)


def middle_matrix(state: LSR1State) -> jax.Array:
  """Returns M = (D + L + L^T - gamma S^T S)^{-1} over the pairs in use (zero elsewhere)."""
  minv = time_symmetric(state.sy, state.stamp) - state.gamma * state.ss
  return _masked_inverse(minv, state.in_use)


def _check_vector(state: LSR1State, v: PyTree, name: str) -> None:
  _stack.check_like(v, state.s, name, leading=memory_size(state))


def matvec(state: LSR1State, v: PyTree) -> PyTree:
  """Returns B v without forming B: gamma v + Psi M Psi^T v, O(n k + k^2).

  Args:
    state: an ``LSR1State``.
    v: a pytree vector with the structure and shapes of the parameters.

  Returns:
    B v, a pytree like ``v``.
  """
  _check_vector(state, v, "v")
  v = jax.tree.map(lambda x, r: x.astype(r.dtype), v, jax.tree.map(lambda b: b[0], state.s))
  low_rank = psi_combine(state, _mm(middle_matrix(state), psi_dot(state, v)))
  return jax.tree.map(lambda x, l: state.gamma.astype(x.dtype) * x + l, v, low_rank)


def update(state: LSR1State, s: PyTree, y: PyTree, valid: jax.Array | bool = True) -> LSR1State:
  """Adds the pair (s, y) unless the SR1 safeguard skips it (see the module docstring).

  Args:
    state: an ``LSR1State``.
    s: a step, a pytree like the parameters.
    y: the gradient difference along ``s`` (same data on both sides), like ``s``.
    valid: an optional bool (traced or not); False skips the pair (the caller knows it is bad,
      e.g. the trial loss was not finite).

  Returns:
    The new state; exactly ``state`` when the pair is skipped (non-finite entries, or the
    safeguard |s.r| <= r_tol |s||r|, or r at rounding level).
  """
  _check_vector(state, s, "s")
  _check_vector(state, y, "y")
  like = jax.tree.map(lambda b: b[0], state.s)
  s = jax.tree.map(lambda x, r: jnp.asarray(x).astype(r.dtype), s, like)
  y = jax.tree.map(lambda x, r: jnp.asarray(x).astype(r.dtype), y, like)
  dtype = state.ss.dtype
  eps = _eps(dtype)
  k = memory_size(state)

  finite = _stack.all_finite(s) & _stack.all_finite(y) & jnp.asarray(valid)
  s = jax.tree.map(lambda x: jnp.where(finite, x, 0.0), s)
  y = jax.tree.map(lambda x: jnp.where(finite, x, 0.0), y)

  # (2) The safeguard against the current B, computed explicitly.
  # The Gram patches; <s_i, s> and <y_i, s> also give Psi^T s for B s.
  s_dots, y_dots = _stack.dot(state.s, s), _stack.dot(state.y, s)   # <s_i, s>, <y_i, s>
  sy_col, yy_col = _stack.dot(state.s, y), _stack.dot(state.y, y)   # <s_i, y>, <y_i, y>

  # (2) The safeguard against the current B, computed explicitly: r = y - B s.
  psi_s = jnp.where(state.in_use, y_dots - state.gamma * s_dots, 0.0)
  low_rank = psi_combine(state, _mm(middle_matrix(state), psi_s))
  bs = jax.tree.map(lambda x, l: state.gamma.astype(x.dtype) * x + l, s, low_rank)
  r = jax.tree.map(lambda a, b: a - b, y, bs)
  s_norm, r_norm = _norm(s), _norm(r)
  y_norm, bs_norm = _norm(y), _norm(bs)
  sr = _vdot(s, r)
  accept = (finite & (s_norm > 0) & (jnp.abs(sr) > r_tol(dtype) * s_norm * r_norm)
            & (r_norm > _NOISE * eps * (y_norm + bs_norm)))

  # (3) Insert into slot j (the oldest pair, if the ring is full) and patch the Gram matrices.
  j = state.count % k
  ss_jj, sy_jj, yy_jj = _vdot(s, s), _vdot(s, y), _vdot(y, y)
  set_row_col = lambda m, row, col: m.at[j, :].set(row).at[:, j].set(col)
  ss_col = s_dots.at[j].set(ss_jj)
  yy_c = yy_col.at[j].set(yy_jj)
  ss = set_row_col(state.ss, ss_col, ss_col)
  sy = set_row_col(state.sy, y_dots.at[j].set(sy_jj), sy_col.at[j].set(sy_jj))
  yy = set_row_col(state.yy, yy_c, yy_c)
  stamp = state.stamp.at[j].set(state.count)

  # (4)-(6) gamma, then the in-use mask under it; gamma = 0 while nothing is in use.
  gamma = choose_gamma(ss, sy, stamp, state.gamma)
  in_use = in_use_mask(ss, sy, yy, stamp, gamma)
  gamma = jnp.where(jnp.any(in_use), gamma, 0.0).astype(dtype)

  pick = lambda new, old: jnp.where(accept, new, old)
  insert = lambda buf, x: buf.at[j].set(jnp.where(accept, x, buf[j]))
  return LSR1State(
      s=jax.tree.map(insert, state.s, s), y=jax.tree.map(insert, state.y, y),
      ss=pick(ss, state.ss), sy=pick(sy, state.sy), yy=pick(yy, state.yy),
      stamp=pick(stamp, state.stamp), count=pick(state.count + 1, state.count),
      gamma=pick(gamma, state.gamma), in_use=pick(in_use, state.in_use))


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
  parts = jax.tree.map(lambda x, y: jnp.vdot(x, y, precision=_HIGHEST), a, b)
  return sum(jax.tree.leaves(parts))


def _norm(a: PyTree) -> jax.Array:
  return jnp.sqrt(_vdot(a, a))


def dense_pairs(state: LSR1State) -> tuple[np.ndarray, np.ndarray, float]:
  """Host-side (not jittable): the pairs in use as dense numpy arrays, oldest first.

  Args:
    state: an unbatched ``LSR1State``.

  Returns:
    ``(S, Y, gamma)``: arrays of shape (k, n) flattened in ``jax.flatten_util.ravel_pytree``
    order, and the float gamma, such that B is the SR1 recursion from gamma I over those pairs.
  """
  from jax.flatten_util import ravel_pytree  # pylint: disable=g-import-not-at-top
  stamp, in_use = np.asarray(state.stamp), np.asarray(state.in_use)
  if stamp.ndim != 1:
    raise ValueError("dense_pairs takes a single (unbatched) LSR1State.")
  slots = [i for i in np.argsort(stamp, kind="stable") if in_use[i]]
  flat = lambda stack, i: np.asarray(ravel_pytree(jax.tree.map(lambda b: b[i], stack))[0])
  n = sum(int(np.prod(np.shape(x)[1:])) for x in jax.tree.leaves(state.s))
  dtype = np.asarray(state.ss).dtype
  s_rows = [flat(state.s, i) for i in slots]
  y_rows = [flat(state.y, i) for i in slots]
  as_matrix = lambda rows: np.stack(rows) if rows else np.zeros((0, n), dtype)
  return as_matrix(s_rows), as_matrix(y_rows), float(state.gamma)


class Spectral(NamedTuple):
  """Thin spectral decomposition of B = gamma I + P_par diag(lam - gamma) P_par^T.

  P_par = Psi coef = Y coef - gamma S coef is never formed: ``psi_coefficients`` turns a
  coefficient vector on P_par into one on S and Y.

  Attributes:
    coef: ``(k, k)`` coefficients of P_par's columns on Psi's (invalid columns zero).
    lam: ``(k,)`` eigenvalues of B on span(P_par) (meaningful where ``valid``).
    valid: ``(k,)`` bool, the columns of P_par that are real directions (the first ``rank``).
    gamma: the eigenvalue of B on the orthogonal complement of span(P_par).
  """
  coef: jax.Array
  lam: jax.Array
  valid: jax.Array
  gamma: jax.Array


def psi_gram(state: LSR1State) -> jax.Array:
  """Psi^T Psi = Y^T Y - gamma (S^T Y + Y^T S) + gamma^2 S^T S over the pairs in use (O(k^2))."""
  g = state.gamma
  pp = state.yy - g * (state.sy + state.sy.T) + g**2 * state.ss
  both = state.in_use[:, None] & state.in_use[None, :]
  return jnp.where(both, pp, 0.0)


def _eig_basis(gram_matrix: jax.Array, mask: jax.Array, tol: float | None = None
               ) -> tuple[jax.Array, jax.Array]:
  """Coefficients W with A W orthonormal for a stack A of Gram matrix ``gram_matrix``.

  The Gram matrix is normalized to unit diagonal (Jacobi scaling) before its
  eigen-decomposition; directions whose eigenvalue is below ``rank_tol`` of the largest are
  dropped (zero columns, ``keep`` False), so dependent columns never break anything and shapes
  stay fixed.
  """
  diag = jnp.diagonal(gram_matrix)
  mask = mask & (diag > 0)
  inv_norm = jnp.where(mask, jax.lax.rsqrt(jnp.where(mask, diag, 1.0)), 0.0)
  both = mask[:, None] & mask[None, :]
  e, v = jnp.linalg.eigh(jnp.where(both, inv_norm[:, None] * gram_matrix * inv_norm[None, :], 0.0))
  tol = rank_tol(gram_matrix.dtype) if tol is None else tol
  keep = e > tol                                       # unit diagonal: eigenvalues average 1
  w = v * jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, e, 1.0)), 0.0)[None, :]
  return inv_norm[:, None] * w, keep


def spectral(state: LSR1State) -> Spectral:
  """Returns the thin spectral decomposition of B (METHOD.md sections 4 and 7), in O(k^3).

  No pass over n: Psi^T Psi comes from the cached Gram matrices. An orthonormal basis
  Q = Psi W of range(Psi) comes from the eigen-decomposition of the *column-normalized* Gram
  matrix D Psi^T Psi D (D = diag(1/|psi_i|)), so that pairs of very different lengths keep their
  directions and only genuinely dependent directions (eigenvalue below ``rank_tol`` of the
  largest) are dropped; a column whose norm is at the rounding level of Y - gamma S (catastrophic
  cancellation) is dropped too. Then R M R^T = U Lambda_hat U^T with R = Q^T Psi, and
  P_par = Q U.

  Args:
    state: an ``LSR1State``.

  Returns:
    A ``Spectral`` tuple.
  """
  gamma, dtype = state.gamma, state.ss.dtype
  k = memory_size(state)
  eps = _eps(dtype)
  pp = psi_gram(state)
  noise = _NOISE * eps * (jnp.diagonal(state.yy) + gamma**2 * jnp.diagonal(state.ss))
  w, keep = _eig_basis(pp, state.in_use & (jnp.diagonal(pp) > noise))   # Q = Psi W
  r = _mm(w.T, pp)                                              # R = Q^T Psi
  c = _mm(_mm(r, middle_matrix(state)), r.T)
  c = 0.5 * (c + c.T)
  both = keep[:, None] & keep[None, :]
  sentinel = 2.0 * jnp.max(jnp.abs(c)) + 1.0
  lam_hat, u = jnp.linalg.eigh(jnp.where(both, c, 0.0) + jnp.diag(jnp.where(keep, 0.0, sentinel)))
  valid = jnp.arange(k) < jnp.sum(keep)                         # sentinels sort last.
  coef = jnp.where(valid[None, :], _mm(w, u), 0.0)
  lam = jnp.where(valid, lam_hat + gamma, gamma)
  return Spectral(coef=coef, lam=lam, valid=valid, gamma=gamma)


def psi_dot(state: LSR1State, v: PyTree) -> jax.Array:
  """Psi^T v = Y^T v - gamma S^T v (one pass over the stored pairs)."""
  return jnp.where(state.in_use, _stack.dot(state.y, v) - state.gamma * _stack.dot(state.s, v), 0.0)


def psi_combine(state: LSR1State, c: jax.Array) -> PyTree:
  """Psi c = Y c - gamma S c (one pass over the stored pairs), for c over the slots."""
  c = jnp.where(state.in_use, c, 0.0)
  return jax.tree.map(lambda a, b: a - state.gamma.astype(a.dtype) * b,
                      _stack.combine(state.y, c), _stack.combine(state.s, c))
