"""Limited-memory SR1 (L-SR1) matrices in compact form, on pytrees.

The matrix kept here is (Erway & Marcia, SIMAX 2015; docs/method.md, "L-SR1 matrices")

  B = gamma I + Psi M Psi^T,   Psi = Y - gamma S,   M = (D + L + L^T - gamma S^T S)^{-1},

with S^T Y = L + D + U over the pairs *in use*, taken oldest first. It equals the SR1 recursion
B_{j+1} = B_j + r r^T / (r.s_j), r = y_j - B_j s_j, started from B_0 = gamma I over those pairs.

Pairs live in a ring buffer of ``memory`` slots (stacks whose leaves have shape
``(memory, *leaf.shape)``) with the k-by-k Gram matrices S^T S, S^T Y and Y^T Y kept up to date
with O(n k) work per pair, so that everything that depends on gamma is O(k^3) (``compact``:
the compact form is kept factored in an orthonormal basis of span(S, Y)). An ``update``:

1. rejects a pair with a non-finite entry (the state is returned unchanged);
2. tests the SR1 safeguard against the current B (explicitly, one pass over n):
   skip unless |s.r| > r_tol |s| |r| and |r| > c eps (|y| + |B s|), r = y - B s;
3. inserts the pair into the ring, dropping the oldest;
4. recomputes gamma from the stored pairs (:func:`choose_gamma`);
5. recomputes the in-use mask from scratch, oldest to newest, each pair tested against the
   recursion from gamma I over the kept pairs before it (``compact.factor``); a pair masked out
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
from aptsjax import compact
from aptsjax.compact import Spectral
from aptsjax.compact import r_tol

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=_HIGHEST)


def _eps(dtype) -> float:
  return float(jnp.finfo(dtype).eps)


_NOISE = compact.NOISE


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
    basis: ``(2 memory, 2 memory)`` coefficients W: Z = [S Y] W is an orthonormal basis of
      span(S, Y) on its ``basis_keep`` columns.
    basis_keep: ``(2 memory,)`` bool, the columns of W in use.
    core: ``(2 memory, 2 memory)`` K with B = gamma I + Z K Z^T (``compact``).
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
  basis: jax.Array
  basis_keep: jax.Array
  core: jax.Array


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
      gamma=jnp.zeros((), dtype), in_use=jnp.zeros((memory,), bool),
      basis=jnp.zeros((2 * memory, 2 * memory), dtype),
      basis_keep=jnp.zeros((2 * memory,), bool),
      core=jnp.zeros((2 * memory, 2 * memory), dtype))


def time_symmetric(sy: jax.Array, stamp: jax.Array) -> jax.Array:
  """Returns D + L + L^T from S^T Y given in slot order.

  Entry (i, j) is <s_newer, y_older> of the two slots (<s_i, y_i> on the diagonal), which is
  D + L + L^T of S^T Y = L + D + U once the slots are sorted oldest first.
  """
  newer = stamp[:, None] >= stamp[None, :]
  return jnp.where(newer, sy, sy.T)


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
  w, keep, _ = compact.eig_basis(ss, valid, tol=float(np.sqrt(_eps(ss.dtype))))
  c = _mm(_mm(w.T, jnp.where(both, time_symmetric(sy, stamp), 0.0)), w)
  scale = jnp.max(jnp.abs(c))
  sentinel = 2.0 * jnp.linalg.norm(c) + 1.0          # above every eigenvalue of c
  mu = jnp.linalg.eigvalsh(c + jnp.diag(jnp.where(keep, 0.0, sentinel)))
  mu_min = mu[0]
  ok = jnp.any(keep) & jnp.isfinite(mu_min) & (mu_min > _NOISE * _eps(ss.dtype) * scale)
  return jnp.where(ok, 0.5 * mu_min, gamma_prev).astype(ss.dtype)


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
  low_rank = compact.low_rank_matvec(state.s, state.y, state.basis, state.core, v)
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
  # (2) The safeguard against the current B, computed explicitly: r = y - B s.
  bs = matvec(state, s)
  r = jax.tree.map(lambda a, b: a - b, y, bs)
  s_norm, r_norm = _norm(s), _norm(r)
  y_norm, bs_norm = _norm(y), _norm(bs)
  sr = _vdot(s, r)
  accept = (finite & (s_norm > 0) & (jnp.abs(sr) > r_tol(dtype) * s_norm * r_norm)
            & (r_norm > _NOISE * eps * (y_norm + bs_norm)))

  # (3) Insert into slot j (the oldest pair, if the ring is full) and patch the Gram matrices.
  j = state.count % k
  s_dots, y_dots = _stack.dot(state.s, s), _stack.dot(state.y, s)   # <s_i, s>, <y_i, s>
  sy_col, yy_col = _stack.dot(state.s, y), _stack.dot(state.y, y)   # <s_i, y>, <y_i, y>
  ss_jj, sy_jj, yy_jj = _vdot(s, s), _vdot(s, y), _vdot(y, y)
  set_row_col = lambda m, row, col: m.at[j, :].set(row).at[:, j].set(col)
  ss_col = s_dots.at[j].set(ss_jj)
  yy_c = yy_col.at[j].set(yy_jj)
  ss = set_row_col(state.ss, ss_col, ss_col)
  sy = set_row_col(state.sy, y_dots.at[j].set(sy_jj), sy_col.at[j].set(sy_jj))
  yy = set_row_col(state.yy, yy_c, yy_c)
  stamp = state.stamp.at[j].set(state.count)

  # (4)-(6) gamma, then the in-use mask under it; gamma = 0 while nothing is in use.
  pick = lambda new, old: jnp.where(accept, new, old)
  insert = lambda buf, x: buf.at[j].set(jnp.where(accept, x, buf[j]))
  new_s, new_y = jax.tree.map(insert, state.s, s), jax.tree.map(insert, state.y, y)
  gamma = choose_gamma(ss, sy, stamp, state.gamma)
  fac = compact.factor(ss, sy, yy, stamp, gamma, new_s, new_y)
  gamma = jnp.where(jnp.any(fac.in_use), gamma, 0.0).astype(dtype)
  core = jnp.where(jnp.any(fac.in_use), fac.core, 0.0)
  return LSR1State(
      s=new_s, y=new_y,
      ss=pick(ss, state.ss), sy=pick(sy, state.sy), yy=pick(yy, state.yy),
      stamp=pick(stamp, state.stamp), count=pick(state.count + 1, state.count),
      gamma=pick(gamma, state.gamma), in_use=pick(fac.in_use, state.in_use),
      basis=pick(fac.basis, state.basis), basis_keep=pick(fac.keep, state.basis_keep),
      core=pick(core, state.core))


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


def spectral(state: LSR1State) -> Spectral:
  """The thin spectral decomposition of B (docs/method.md, "The subproblem: OBS"), in O(k^3).

  P_par = Z U = [S Y] coef and the eigenvalues lam = gamma + eig(K) on span(S, Y);
  gamma on its orthogonal complement. See ``compact``.
  """
  return compact.spectral(state.gamma, state.basis, state.basis_keep, state.core)


def pair_dot(state: LSR1State, v: PyTree) -> jax.Array:
  """[S Y]^T v (one pass over the stored pairs)."""
  return compact.pair_dot(state.s, state.y, v)


def pair_combine(state: LSR1State, c: jax.Array) -> PyTree:
  """[S Y] c (one pass over the stored pairs)."""
  return compact.pair_combine(state.s, state.y, c)
