"""The L-SR1 compact form in the small space: Gram matrices and 2k-by-2k factorizations.

The compact form B = gamma I + Psi M Psi^T (docs/method.md, "L-SR1 matrices") is evaluated via
the LDL^T factorization of M^{-1} = D + L + L^T - gamma S^T S in time order: its pivots are the
SR1 denominators d_t = s_t.r_t and Psi L^{-T} = R = [r_1 .. r_k] are the SR1 residuals
r_t = y_t - B_t s_t, so that

  B = gamma I + R D^{-1} R^T = gamma I + Z K Z^T,   K = C D^{-1} C^T,

where Z = [S Y] W is an orthonormal basis of span(S, Y) and C holds the coordinates of the r_t
in it. Z is never formed: W comes from the eigen-decomposition of the (Jacobi-scaled) Gram
matrix of [S Y], and everything here works on k-by-k and 2k-by-2k matrices. The only passes
over n are ``pair_dots`` ([S Y]^T v, one read of the stored pairs per vector) and
``pair_combine`` ([S Y] C, one read). No k-by-k inverse of the possibly near-singular M^{-1} is ever formed, and r_t is built
as a coordinate vector by the recursion itself, so rounding errors grow linearly, not
quadratically, with the size of the terms that cancel in y_t - B_t s_t.

Accuracy: Z is orthonormal to about eps / e_min, e_min the smallest kept eigenvalue of the
unit-diagonal Gram matrix (directions below ``rank_tol`` are dropped); docs/method.md,
"Factored form", states what that costs and why no re-orthogonalization pass is made.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from aptsjax.numerics import tree as _stack

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST
NOISE = 100.0  # multiple of eps below which a quantity computed from Gram matrices is noise.


def mm(a: jax.Array, b: jax.Array) -> jax.Array:
  """A small matrix product at full precision (no TF32 on GPUs)."""
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


def pair_dots(s: PyTree, y: PyTree, vectors: Sequence[PyTree]) -> jax.Array:
  """[S Y]^T [v_1 .. v_m], a 2k-by-m matrix: one read of the stored pairs per vector.

  One matrix-vector product per vector rather than one product with the m vectors stacked:
  XLA's CPU backend runs a k-by-n times n-by-2 product about three times slower than two
  matrix-vector products, and stacking would copy the vectors.
  """
  cols = [jnp.concatenate([_stack.dot(s, v), _stack.dot(y, v)]) for v in vectors]
  return jnp.stack(cols, axis=1)


def pair_combine(s: PyTree, y: PyTree, coef: jax.Array) -> PyTree:
  """[S Y] C for a 2k-by-m matrix C: a stack of m vectors, in one pass over the stored pairs."""
  k = _stack.stack_size(s)
  return jax.tree.map(lambda a, b: a + b, _stack.combine_matrix(s, coef[:k]),
                      _stack.combine_matrix(y, coef[k:]))


class Factor(NamedTuple):
  """The SR1 recursion over some slots, in the orthonormal basis Z = [S Y] ``basis``.

  Attributes:
    kept: ``(m,)`` bool in slot order, the pairs the recursion keeps.
    basis: ``(2m, 2m)`` coefficients W of Z on [S Y] (zero columns where not ``keep``).
    keep: ``(2m,)`` bool, the columns of W in use.
    core: ``(2m, 2m)`` K with B = gamma I + Z K Z^T over the kept pairs.
  """
  kept: jax.Array
  basis: jax.Array
  keep: jax.Array
  core: jax.Array


def factor(gram: jax.Array, valid: jax.Array, stamp: jax.Array, gamma: jax.Array,
           force: jax.Array) -> Factor:
  """The pairs in use and the factored B, by the SR1 recursion from gamma I, oldest first.

  Pair t is kept iff, with r = y_t - B_t s_t over the kept pairs before it, the pivot
  d = s_t.r satisfies |d| > r_tol |s_t| |r| and r and d are above their rounding noise
  (NOISE eps times the size of the terms summed); a ``force``d pair is kept whenever d is finite
  and nonzero (the pairs of a B already tested). The kept pairs keep M^{-1} nonsingular.
  Everything is computed from the Gram matrix, in coordinates of Z: no pass over n.

  Args:
    gram: the 2m-by-2m Gram matrix of [S Y] (``pair_gram``), slots in any order.
    valid: ``(m,)`` bool, the slots that hold a candidate pair.
    stamp: ``(m,)`` insertion numbers (time order: smallest is oldest).
    gamma: B_0 = gamma I.
    force: ``(m,)`` bool, the slots kept without the safeguard tests.

  Returns:
    A ``Factor``.
  """
  dtype = gram.dtype
  eps, tol = eps_of(dtype), r_tol(dtype)
  m = stamp.shape[0]
  order = jnp.argsort(jnp.where(valid, stamp, jnp.iinfo(jnp.int32).max))
  w, keep, _ = eig_basis(gram, jnp.concatenate([valid, valid]))
  coords = mm(w.T, gram)
  cs, cy = coords[:, :m][:, order], coords[:, m:][:, order]     # time order
  cpsi = cy - gamma * cs
  valid_t, force_t = valid[order], force[order]

  s_norms, y_norms = jnp.linalg.norm(cs, axis=0), jnp.linalg.norm(cy, axis=0)

  def step(carry, t):
    kept, res, dinv, res_norms = carry
    proj = mm(res.T, cs[:, t]) * dinv                          # (r_j . s_t) / d_j
    low = mm(res, proj)                                        # (B_t - gamma I) s_t
    r = cpsi[:, t] - low
    d = cs[:, t] @ r
    s_n = s_norms[t]
    r_n, bs_n = jnp.linalg.norm(r), jnp.linalg.norm(gamma * cs[:, t] + low)
    scale = y_norms[t] + jnp.abs(gamma) * s_n + bs_n + jnp.abs(proj) @ res_norms
    tested = ((jnp.abs(d) > tol * s_n * r_n) & (r_n > NOISE * eps * scale)
              & (jnp.abs(d) > NOISE * eps * s_n * scale))
    ok = valid_t[t] & jnp.isfinite(d) & jnp.isfinite(r_n) & (d != 0) & (force_t[t] | tested)
    res = res.at[:, t].set(jnp.where(ok, r, 0.0))
    dinv = dinv.at[t].set(jnp.where(ok, 1.0 / jnp.where(ok, d, 1.0), 0.0))
    return (kept.at[t].set(ok), res, dinv, res_norms.at[t].set(jnp.where(ok, r_n, 0.0))), None

  start = (jnp.zeros((m,), bool), jnp.zeros((2 * m, m), dtype), jnp.zeros((m,), dtype),
           jnp.zeros((m,), dtype))
  (kept, res, dinv, _), _ = jax.lax.scan(
      step, _stack.match_varying(start, cpsi[0, 0] + gamma), jnp.arange(m))
  core = mm(res * dinv[None, :], res.T)
  core = 0.5 * (core + core.T)
  return Factor(kept=jnp.zeros((m,), bool).at[order].set(kept), basis=w, keep=keep, core=core)


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
  coef = jnp.where(valid[None, :], mm(basis, u), 0.0)
  return Spectral(coef=coef, lam=jnp.where(valid, lam_hat + gamma, gamma), valid=valid,
                  gamma=gamma)


# The largest one-hot matrix (leaf size x entries) of a contraction in ``unit_entries``.
_MASK_MAX_SIZE = 1 << 20


def _unit_sizes(like: PyTree, count: int) -> list[int]:
  """How many of the ``count`` unit vectors e_i of ``unit_entries`` fall in each leaf.

  The smallest leaves first (biases, typically), in leaf order among equal sizes: there the
  entries are cheapest to read without moving data between the devices of a model axis
  (``unit_entries``).
  """
  sizes = [int(np.prod(x.shape[1:] if x.ndim else ())) for x in jax.tree.leaves(like)]
  taken, left = [0] * len(sizes), count
  for i in sorted(range(len(sizes)), key=lambda i: sizes[i]):
    taken[i] = min(left, sizes[i])
    left -= taken[i]
  return taken


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """The row-major flat index of every entry of an array of ``shape``, built without a reshape."""
  index = jnp.zeros(shape, jnp.int32)
  stride = 1
  for dim in reversed(range(len(shape))):
    index = index + stride * jax.lax.broadcasted_iota(jnp.int32, shape, dim)
    stride *= shape[dim]
  return index


def _by_contraction(size: int, count: int, total: int) -> bool:
  """Whether ``count`` entries of a leaf of ``size`` are read through a one-hot contraction."""
  return size * count <= min(total, _MASK_MAX_SIZE)


def _one_hot(shape: tuple[int, ...], count: int, dtype) -> jax.Array:
  """``(*shape, count)``: column i is e_i, the entry of flat index i, for i < count."""
  return (_flat_index(shape)[..., None] == jnp.arange(count)).astype(dtype)


def _row_slices(shape: tuple[int, ...], count: int) -> list[tuple]:
  """Static index tuples selecting the first ``count`` flat entries, one per row of the last dim."""
  if not shape:
    return [()] if count else []
  width = shape[-1]
  out = []
  for row in range(-(-count // width)):
    index = tuple(int(i) for i in np.unravel_index(row, shape[:-1])) if shape[:-1] else ()
    out.append(index + (slice(0, min(width, count - row * width)),))
  return out


def unit_entries(stack: PyTree, count: int) -> jax.Array:
  """The entries of every stack vector at ``count`` fixed positions: ``(k, count)``.

  These are the products [S Y]^T e_i with ``count`` unit vectors (the first flat entries of the
  smallest leaves, ``_unit_sizes``), without a pass over n. A leaf read with ``c`` of them is
  read by a contraction with one-hot columns when its size times ``c`` is at most n and at most
  ``_MASK_MAX_SIZE`` (a small fraction of a pass): on a leaf sharded over a model axis that is
  a local product and an all-reduce of k x c numbers, where a slice would move data from one
  device to another with a point-to-point transfer, which every device of the mesh must join.
  Other leaves (a single-array parameter, say) are read by static slices.
  """
  parts = []
  total = sum(int(np.prod(x.shape[1:])) for x in jax.tree.leaves(stack))
  for x, c in zip(jax.tree.leaves(stack), _unit_sizes(stack, count)):
    if not c:
      continue
    shape = x.shape[1:]
    if _by_contraction(int(np.prod(shape)), c, total):
      parts.append(jnp.tensordot(x, _one_hot(shape, c, x.dtype), axes=len(shape),
                                 precision=jax.lax.Precision.HIGHEST))
      continue
    for index in _row_slices(shape, c):
      parts.append(jnp.reshape(x[(slice(None),) + index], (x.shape[0], -1)))
  return jnp.concatenate(parts, axis=1)


def add_unit(tree: PyTree, values: jax.Array) -> PyTree:
  """``tree + sum_i values_i e_i`` for the unit vectors of ``unit_entries`` (same order)."""
  sizes = _unit_sizes(jax.tree.map(lambda x: x[None], tree), values.shape[0])
  leaves, treedef = jax.tree.flatten(tree)
  total = sum(x.size for x in leaves)
  out, offset = [], 0
  for x, c in zip(leaves, sizes):
    v = values[offset:offset + c].astype(x.dtype)
    offset += c
    if c and _by_contraction(x.size, c, total):
      x = x + jnp.tensordot(_one_hot(x.shape, c, x.dtype), v, axes=1,
                            precision=jax.lax.Precision.HIGHEST)
    elif c:
      start = 0
      for index in _row_slices(x.shape, c):
        width = index[-1].stop if index else 1
        x = x.at[index].add(jnp.reshape(v[start:start + width], x[index].shape))
        start += width
    out.append(x)
  return jax.tree.unflatten(treedef, out)
