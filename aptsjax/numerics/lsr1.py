"""Limited-memory SR1 (L-SR1) matrices in compact form, on pytrees.

The matrix kept here is (Erway & Marcia, SIMAX 2015; docs/method.md, "L-SR1 matrices")

  B = gamma I + Psi M Psi^T,   Psi = Y - gamma S,   M = (D + L + L^T - gamma S^T S)^{-1},

with S^T Y = L + D + U over the pairs *in use*, taken oldest first. It equals the SR1 recursion
B_{j+1} = B_j + r r^T / (r.s_j), r = y_j - B_j s_j, started from B_0 = gamma I over those pairs.

Pairs live in a ring buffer of ``memory`` slots (stacks whose leaves have shape
``(memory, *leaf.shape)``) with the k-by-k Gram matrices S^T S, S^T Y and Y^T Y kept up to date,
so that everything that depends on gamma is O(k^3) on small matrices (``compact``). An
``update`` reads the stored pairs twice ([S Y]^T s and [S Y]^T y), writes the new pair into its
slot in place, and does the rest in the small space:

1. rejects a pair with a non-finite entry (the state is returned unchanged);
2. tests the SR1 safeguard against the current B: with r = y - B s, skip unless
   |s.r| > r_tol |s| |r| and r and s.r lie above their rounding noise (``compact.factor``, the
   new pair as the newest of the pairs in use, with the current gamma);
3. inserts the pair into the ring, dropping the oldest;
4. recomputes gamma from the stored pairs (:func:`choose_gamma`);
5. recomputes the in-use mask from scratch, oldest to newest, each pair tested against the
   recursion from gamma I over the kept pairs before it (``compact.factor``); a pair masked out
   can come back when gamma changes;
6. sets gamma = 0 while no pair is in use (B = 0: the first step of a method built on this is the
   first-order step, with no hidden learning rate);
7. keeps the thin spectral decomposition of B (``spectral``) for ``matvec`` and the OBS solver.

``dense_pairs`` reports exactly the pairs that ``matvec`` and the OBS solver use.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from aptsjax.numerics import tree as _stack
from aptsjax.numerics import compact
from aptsjax.numerics.compact import Spectral

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


_mm = compact.mm


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
    coef: ``(2 memory, 2 memory)`` the eigenvectors of B on span(S, Y) as coefficients on [S Y]:
      P_par = [S Y] coef (``compact.Spectral``; columns outside ``lam_valid`` are zero).
    lam: ``(2 memory,)`` the eigenvalues of B on those eigenvectors.
    lam_valid: ``(2 memory,)`` bool, the columns of ``coef`` that are eigenvectors.
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
  coef: jax.Array
  lam: jax.Array
  lam_valid: jax.Array


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
      coef=jnp.zeros((2 * memory, 2 * memory), dtype), lam=jnp.zeros((2 * memory,), dtype),
      lam_valid=jnp.zeros((2 * memory,), bool))


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


def check_vector(state: LSR1State, v: PyTree, name: str) -> None:
  """Raises ValueError (trace time) unless ``v`` is shaped like one vector of the memory."""
  _stack.check_like(v, state.s, name, leading=memory_size(state))


def matvec(state: LSR1State, v: PyTree) -> PyTree:
  """Returns B v without forming B: gamma v + Psi M Psi^T v, O(n k + k^2).

  Args:
    state: an ``LSR1State``.
    v: a pytree vector with the structure and shapes of the parameters.

  Returns:
    B v, a pytree like ``v``.
  """
  check_vector(state, v, "v")
  v = jax.tree.map(lambda x, r: x.astype(r.dtype), v, jax.tree.map(lambda b: b[0], state.s))
  scale = jnp.where(state.lam_valid, state.lam - state.gamma, 0.0)   # B - gamma I on span(P_par)
  c = _mm(state.coef, scale[:, None] * _mm(state.coef.T, pair_dots(state, [v])))
  low_rank = jax.tree.map(lambda x: x[0], pair_combine(state, c))
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
  check_vector(state, s, "s")
  check_vector(state, y, "y")
  like = jax.tree.map(lambda b: b[0], state.s)
  s = jax.tree.map(lambda x, r: jnp.asarray(x).astype(r.dtype), s, like)
  y = jax.tree.map(lambda x, r: jnp.asarray(x).astype(r.dtype), y, like)
  dtype = state.ss.dtype
  k = memory_size(state)

  finite = _stack.all_finite(s) & _stack.all_finite(y) & jnp.asarray(valid)
  # A non-finite pair is not zeroed (that would cost a pass over it): whatever its products
  # are, ``accept`` is False and every field of the state keeps its old value.

  # The only reads of the stored pairs: [S Y]^T s and [S Y]^T y.
  dots = pair_dots(state, [s, y])
  s_col, y_col = dots[:, 0], dots[:, 1]          # [S^T s; Y^T s], [S^T y; Y^T y]
  ss_jj, sy_jj, yy_jj = _stack.inner(s, s), _stack.inner(s, y), _stack.inner(y, y)

  # (3) The Gram matrices with the pair in slot j (the oldest pair, if the ring is full).
  j = state.count % k
  at_j = jnp.arange(k) == j
  set_row_col = lambda m, row, col: jnp.where(at_j[:, None], row[None, :],
                                              jnp.where(at_j[None, :], col[:, None], m))
  ss_c = s_col[:k].at[j].set(ss_jj)
  yy_c = y_col[k:].at[j].set(yy_jj)
  ss = set_row_col(state.ss, ss_c, ss_c)
  sy = set_row_col(state.sy, s_col[k:].at[j].set(sy_jj), y_col[:k].at[j].set(sy_jj))
  yy = set_row_col(state.yy, yy_c, yy_c)
  stamp = jnp.where(at_j, state.count, state.stamp)
  gamma = choose_gamma(ss, sy, stamp, state.gamma)                              # (4)

  # (2) and (5) as one batched recursion over k + 1 slots: [current pairs in use, new pair]
  # with the current gamma (the safeguard against the current B) and [ring after the insert,
  # empty slot] with the new gamma (the in-use mask).
  grow = lambda m, col, row, corner: jnp.block([[m, col[:, None]], [row[None, :], corner]])
  pad = lambda m: jnp.pad(m, ((0, 1), (0, 1)))
  grams = jnp.stack([
      compact.pair_gram(grow(state.ss, s_col[:k], s_col[:k], ss_jj[None, None]),
                        grow(state.sy, y_col[:k], s_col[k:], sy_jj[None, None]),
                        grow(state.yy, y_col[k:], y_col[k:], yy_jj[None, None])),
      compact.pair_gram(pad(ss), pad(sy), pad(yy))])
  new_ok = finite & (ss_jj > 0)
  valid_now = jnp.concatenate([state.in_use, new_ok[None]])
  stamps = jnp.stack([jnp.concatenate([state.stamp, state.count[None]]),
                      jnp.concatenate([stamp, jnp.full((1,), -1, jnp.int32)])])
  fac = jax.vmap(compact.factor)(
      grams, jnp.stack([valid_now, stamps[1] >= 0]), stamps, jnp.stack([state.gamma, gamma]),
      jnp.stack([valid_now.at[k].set(False), jnp.zeros((k + 1,), bool)]))
  accept = new_ok & fac.kept[0, k]

  # The new factor without its empty slot (rows k and 2k + 1 of W; its two columns are
  # dropped directions, which eigh sorts first), then its spectral form. (6): gamma = 0 and
  # B = 0 while no pair is in use.
  in_use = fac.kept[1, :k]
  rows = np.concatenate([np.arange(k), k + 1 + np.arange(k)])
  used = jnp.any(in_use)
  gamma = jnp.where(used, gamma, 0.0).astype(dtype)
  spec = compact.spectral(gamma, fac.basis[1][rows][:, 2:], fac.keep[1][2:],
                          jnp.where(used, fac.core[1][2:, 2:], 0.0))

  pick = lambda new, old: jnp.where(accept, new, old)
  insert = lambda buf, x: buf.at[j].set(jnp.where(accept, x, buf[j]))   # in place, one slot
  return LSR1State(
      s=jax.tree.map(insert, state.s, s), y=jax.tree.map(insert, state.y, y),
      ss=pick(ss, state.ss), sy=pick(sy, state.sy), yy=pick(yy, state.yy),
      stamp=pick(stamp, state.stamp), count=pick(state.count + 1, state.count),
      gamma=pick(gamma, state.gamma), in_use=pick(in_use, state.in_use),
      coef=pick(spec.coef, state.coef), lam=pick(spec.lam, state.lam),
      lam_valid=pick(spec.valid, state.lam_valid))


def rescale(state: LSR1State, ratio: PyTree) -> LSR1State:
  """The memory in the variables u' = ratio * u: every pair (s, y) becomes (ratio s, y / ratio).

  For a change of the diagonal scaling of a scaled trust region (``aptsjax.scaling``): the
  pairs are the same secant information, expressed in the new variables (s.y is unchanged). The
  Gram matrices S^T S and Y^T Y are recomputed (one read of each new stack), and gamma, the
  in-use mask and the spectral form are recomputed from them as ``update`` does (O(k^3)). With
  ``ratio`` all ones the matrix is unchanged up to rounding.

  Args:
    state: an ``LSR1State``.
    ratio: a pytree like the parameters, positive and finite (the new D over the old).

  Returns:
    The rescaled state (a memory without pairs is returned as it is, apart from its stacks).
  """
  check_vector(state, ratio, "ratio")
  s = jax.tree.map(lambda b, r: b * r.astype(b.dtype)[None], state.s, ratio)
  y = jax.tree.map(lambda b, r: b / r.astype(b.dtype)[None], state.y, ratio)
  valid = state.stamp >= 0
  both = valid[:, None] & valid[None, :]
  ss = jnp.where(both, _stack.gram(s, s), 0.0).astype(state.ss.dtype)
  yy = jnp.where(both, _stack.gram(y, y), 0.0).astype(state.yy.dtype)
  gamma = choose_gamma(ss, state.sy, state.stamp, state.gamma)
  fac = compact.factor(compact.pair_gram(ss, state.sy, yy), valid, state.stamp, gamma,
                       jnp.zeros_like(valid))
  used = jnp.any(fac.kept)
  gamma = jnp.where(used, gamma, 0.0).astype(state.ss.dtype)
  spec = compact.spectral(gamma, fac.basis, fac.keep, jnp.where(used, fac.core, 0.0))
  return state._replace(s=s, y=y, ss=ss, yy=yy, gamma=gamma, in_use=fac.kept, coef=spec.coef,
                        lam=spec.lam, lam_valid=spec.valid)


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
  """The thin spectral decomposition of B (docs/method.md, "The subproblem: OBS"), kept in the state.

  P_par = [S Y] coef and the eigenvalues lam on span(S, Y); gamma on its orthogonal complement.
  ``update`` computes it (O(k^3), no pass over n); see ``compact``.
  """
  return Spectral(coef=state.coef, lam=state.lam, valid=state.lam_valid, gamma=state.gamma)


def pair_dots(state: LSR1State, vectors: list[PyTree]) -> jax.Array:
  """[S Y]^T [v_1 .. v_m], a 2k-by-m matrix (one read of the stored pairs per vector)."""
  return compact.pair_dots(state.s, state.y, vectors)


def pair_combine(state: LSR1State, coef: jax.Array) -> PyTree:
  """[S Y] C for a 2k-by-m matrix C: a stack of m vectors (one pass over the stored pairs)."""
  return compact.pair_combine(state.s, state.y, coef)
