"""Pytree helpers for stacks of vectors: leaves of shape ``(k, *leaf.shape)``.

A *stack* holds k pytree vectors (the columns of an n-by-k matrix such as S, Y or Psi) with the
same structure as the parameters, each leaf carrying a leading axis of size k. The helpers below
are the only O(n k) operations of the L-SR1 and OBS code; everything else works on k-by-k
matrices. None of them reshapes a leaf: products contract the leaf's own dimensions, so a leaf
sharded over a model axis stays sharded and only the k-sized results are all-reduced. All products run at ``Precision.HIGHEST`` so that float32 stays float32 on GPUs (no
TF32; docs/method.md, "Numerics").
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


def _trailing(x: jax.Array, skip: int) -> tuple[int, ...]:
  return tuple(range(skip, jnp.ndim(x)))


def stack_size(stack: PyTree) -> int:
  """Returns k, the leading-axis size shared by every leaf of ``stack``."""
  return jax.tree.leaves(stack)[0].shape[0]


def gram(a: PyTree, b: PyTree) -> jax.Array:
  """Returns the k-by-l matrix ``A^T B`` of two stacks: ``[i, j] = <a_i, b_j>``."""
  parts = jax.tree.map(lambda x, y: jnp.tensordot(
      x, y, axes=(_trailing(x, 1), _trailing(y, 1)), precision=_HIGHEST), a, b)
  return sum(jax.tree.leaves(parts))


def dot(stack: PyTree, v: PyTree) -> jax.Array:
  """Returns the k-vector ``A^T v``: ``[i] = <a_i, v>``."""
  parts = jax.tree.map(lambda x, y: jnp.tensordot(
      x, y, axes=(_trailing(x, 1), _trailing(y, 0)), precision=_HIGHEST), stack, v)
  return sum(jax.tree.leaves(parts))


def combine(stack: PyTree, coef: jax.Array) -> PyTree:
  """Returns the pytree vector ``A c = sum_i c_i a_i``."""
  return jax.tree.map(lambda x: jnp.tensordot(coef.astype(x.dtype), x, axes=1,
                                              precision=_HIGHEST), stack)


def combine_matrix(stack: PyTree, coef: jax.Array) -> PyTree:
  """Returns the stack ``A C`` (column j = sum_i C[i, j] a_i) for a k-by-l matrix C."""
  return jax.tree.map(lambda x: jnp.tensordot(coef.T.astype(x.dtype), x, axes=1,
                                              precision=_HIGHEST), stack)


def check_like(tree: PyTree, reference: PyTree, name: str, *, leading: int | None = None) -> None:
  """Raises ValueError unless ``tree`` has the structure and leaf shapes of ``reference``.

  Args:
    tree: the pytree to check (a vector such as a gradient or a step).
    reference: the pytree it must match; with ``leading`` set, a stack whose leaves carry an
      extra leading axis of that size which ``tree`` must not have.
    name: how the error message calls ``tree``.
    leading: the size of the leading axis of ``reference`` to ignore, if any.
  """
  ref_def, tree_def = jax.tree.structure(reference), jax.tree.structure(tree)
  if ref_def != tree_def:
    raise ValueError(f"{name} has pytree structure {tree_def}, expected {ref_def}.")
  for r, t in zip(jax.tree.leaves(reference), jax.tree.leaves(tree)):
    want = r.shape[1:] if leading is not None else r.shape
    if tuple(t.shape) != tuple(want):
      raise ValueError(f"{name} has a leaf of shape {tuple(t.shape)}, expected {tuple(want)}.")
    if not jnp.issubdtype(t.dtype, jnp.floating):
      raise ValueError(f"{name} has a leaf of dtype {t.dtype}; floating arrays are required.")


def all_finite(tree: PyTree) -> jax.Array:
  """Returns a bool scalar: every entry of every leaf is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def tree_dtype(tree: PyTree) -> jnp.dtype:
  """Returns the common floating dtype of a pytree's leaves (the promoted one if they differ)."""
  return jnp.result_type(*jax.tree.leaves(tree))


def upcast(tree: PyTree) -> PyTree:
  """Returns ``tree`` with its leaves in at least float32 (float32 and float64 leaves unchanged).

  Norms and inner products of half-precision vectors (bfloat16, float16) accumulate in float32
  this way: their sums of squares neither overflow (float16 ends at 65504) nor lose small terms.
  """
  return jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), tree)


def inner(a: PyTree, b: PyTree) -> jax.Array:
  """The inner product of two pytree vectors in their own dtype.

  Each leaf's product contracts all its dimensions in place (``jnp.vdot`` would flatten it,
  which gathers a leaf sharded over a model axis).
  """
  parts = jax.tree.map(lambda x, y: jnp.tensordot(x, y, axes=jnp.ndim(x), precision=_HIGHEST),
                       a, b)
  return sum(jax.tree.leaves(parts))


def vdot(a: PyTree, b: PyTree) -> jax.Array:
  """The inner product of two pytree vectors, accumulated in at least float32 (see ``upcast``)."""
  return inner(upcast(a), upcast(b))


def norm(tree: PyTree) -> jax.Array:
  """The 2-norm of a pytree vector, accumulated in at least float32 (see ``upcast``)."""
  return jnp.sqrt(vdot(tree, tree))


def varying_axes(x: Any) -> frozenset:
  """The mesh axes over which ``x`` varies inside ``jax.shard_map`` (empty elsewhere)."""
  manual = getattr(jax.typeof(x), "manual_axis_type", None)
  return frozenset(manual.varying) if manual is not None else frozenset()


def match_varying(tree: PyTree, reference: Any) -> PyTree:
  """Casts every leaf of ``tree`` to vary over the axes ``reference`` varies over.

  Loop carries inside ``jax.shard_map`` (check_vma=True) must keep their type; a constant that
  starts a loop next to device-varying values has to be marked varying first.
  """
  axes = varying_axes(reference)

  def cast(x):
    missing = tuple(sorted(axes - varying_axes(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(cast, tree) if axes else tree


def sum_leading(x: jax.Array) -> jax.Array:
  """The sum over the (static, small) leading axis as a balanced tree of explicit adds.

  Cheaper than ``jnp.sum(x, axis=0)`` for the few subdomains of a device (XLA's reduce over a
  short leading axis reads the array with a poor access pattern on CPU).
  """
  parts = [x[i] for i in range(x.shape[0])]
  while len(parts) > 1:
    pairs = [parts[i] + parts[i + 1] for i in range(0, len(parts) - 1, 2)]
    parts = pairs + parts[len(parts) - len(parts) % 2:]
  return parts[0]
