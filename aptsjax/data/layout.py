"""Batch layouts for APTS: subdomain blocks, shared (overlap) rows, and SAPTS minibatches.

A batch is any pytree whose leaves (numpy or jax arrays) share a leading row axis, e.g. a tuple
``(x, y)``. Functions that return a batch return the same pytree with leaves of the same kind.

``apts`` splits a batch of ``rows`` rows into N equal contiguous blocks, subdomain i holding rows
``[i b, (i + 1) b)`` (:func:`split_subdomains`). Overlap between subdomains is a layout made
beforehand by :func:`overlapping_subdomains`, by the exact rule of docs/method.md, "Overlap layout"
(:func:`overlap_layout`): for a batch of m rows and overlap o (shared rows / own rows),

  c = floor(o m / (N + o))   shared rows: the LAST c rows of the batch,
  b = floor((m - c) / N)     own rows per block: block i owns rows [i b, (i + 1) b),

the m - c - N b rows in between are dropped, and the laid-out batch has N (b + c) rows, block i
being its own b rows followed by the c shared rows. Example: m = 1000, N = 2, o = 0.05 gives
c = 24, b = 488 and two blocks of 512 rows. With o = 0 it is the plain split, remainder dropped.
Dropping is never silent: :func:`overlapping_subdomains` (and the trainer's ``shard_batch``)
warns by default, naming the batch sizes that drop nothing (:func:`check_remainder`).

Multi-process loading: every process computes the same global indices and materializes only
the blocks of its own devices (shared rows included), e.g.::

  blocks = overlap_layout(m, N, o).reshape(N, -1)           # (N, b + c) global row indices
  local = take_rows(data, blocks[first:last].reshape(-1))   # this process's blocks, in order
  # then jax.make_array_from_process_local_data(sharding, local_leaf) for each leaf
"""

from __future__ import annotations

import fractions
import math
import warnings
from typing import Any

import jax
import numpy as np

from aptsjax.numerics.checks import as_int

Batch = Any


def as_overlap(overlap: Any) -> float:
  """Returns ``overlap`` as a float in [0, 1) (shared rows / own rows of the subdomain layout).

  Raises:
    ValueError: ``overlap`` is not a number, or not in [0, 1) (NaN included).
  """
  try:
    result = float(overlap)
  except (TypeError, ValueError):
    raise ValueError(f"overlap must be a number in [0, 1), got {overlap!r}") from None
  if not 0.0 <= result < 1.0:  # False for NaN as well.
    raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
  return result


def row_count(batch: Batch) -> int:
  """Returns the number of rows of ``batch``: the common leading size of its leaves.

  Raises:
    ValueError: the batch has no leaves, a scalar leaf, or leaves of different leading sizes.
  """
  leaves = jax.tree_util.tree_leaves(batch)
  if not leaves:
    raise ValueError("the batch has no array leaves")
  counts = set()
  for leaf in leaves:
    shape = np.shape(leaf)
    if not shape:
      raise ValueError(f"every batch leaf needs a leading row axis; got a leaf of shape {shape}")
    counts.add(int(shape[0]))
  if len(counts) != 1:
    raise ValueError(f"batch leaves disagree on the number of rows: {sorted(counts)}")
  return counts.pop()


def layout_sizes(num_rows: int, num_subdomains: int, overlap: float = 0.0) -> tuple[int, int]:
  """Own and shared row counts of the overlap layout (docs/method.md, "Overlap layout").

  The overlap is read as the decimal it prints as (``repr(float(overlap))``) and the floors are
  taken in exact rational arithmetic, so every process gets the same counts and o = 0.3, m = 13,
  N = 1 gives exactly c = 3.

  Args:
    num_rows: m, the number of rows of the batch.
    num_subdomains: N >= 1.
    overlap: o in [0, 1), shared rows / own rows.

  Returns:
    ``(b, c)``: b = floor((m - c) / N) own rows per block, c = floor(o m / (N + o)) shared rows.

  Raises:
    ValueError: invalid arguments, or b = 0 (too few rows for N blocks).
  """
  m = as_int("num_rows", num_rows, 0)
  n = as_int("num_subdomains", num_subdomains, 1)
  o = fractions.Fraction(repr(as_overlap(overlap)))
  shared = math.floor(o * m / (n + o))
  own = (m - shared) // n
  if own < 1:
    raise ValueError(
        f"{m} rows are too few for {n} subdomains with overlap {float(o)}: no own rows per block")
  return own, shared


REMAINDER_ACTIONS = ("warn", "drop", "raise")


def dropped_rows(num_rows: int, num_subdomains: int, overlap: float = 0.0) -> int:
  """The m - c - N b rows of an m-row batch that the overlap layout leaves out.

  Args:
    num_rows: m, the number of rows of the batch.
    num_subdomains: N >= 1.
    overlap: o in [0, 1), shared rows / own rows.

  Returns:
    The number of dropped rows, in [0, N) when o = 0.
  """
  own, shared = layout_sizes(num_rows, num_subdomains, overlap)
  return int(num_rows) - shared - int(num_subdomains) * own


def _drops_none(num_rows: int, num_subdomains: int, overlap: float) -> bool:
  try:
    return dropped_rows(num_rows, num_subdomains, overlap) == 0
  except ValueError:  # too few rows for the layout
    return False


def full_batch_sizes(num_rows: int, num_subdomains: int, overlap: float = 0.0
                     ) -> tuple[int | None, int]:
  """The nearest batch sizes below and above ``num_rows`` whose layout drops no rows.

  m - c grows by 1 at least every other row (c grows by o / (N + o) < 1/2 per row), so the
  next size above lies within 2 N rows.

  Args:
    num_rows: m, the number of rows of the batch.
    num_subdomains: N >= 1.
    overlap: o in [0, 1), shared rows / own rows.

  Returns:
    ``(below, above)``: the largest size < m and the smallest size > m that drop nothing
    (``below`` is None when no smaller batch fills the layout).
  """
  m, n = as_int("num_rows", num_rows, 0), as_int("num_subdomains", num_subdomains, 1)
  below = next((k for k in range(m - 1, 0, -1) if _drops_none(k, n, overlap)), None)
  above = next(k for k in range(m + 1, m + 2 * n + 3) if _drops_none(k, n, overlap))
  return below, above


def check_remainder(num_rows: int, num_subdomains: int, overlap: float = 0.0,
                    remainder: str = "warn", *, stacklevel: int = 2) -> int:
  """Reports the rows the overlap layout drops: a UserWarning, nothing, or a ValueError.

  Args:
    num_rows: m, the number of rows of the batch.
    num_subdomains: N >= 1.
    overlap: o in [0, 1), shared rows / own rows.
    remainder: what to do when rows are dropped: ``"warn"`` (a ``UserWarning`` naming how many
      rows out of m and the nearest batch sizes that drop none), ``"drop"`` (drop them quietly:
      the caller has accepted it) or ``"raise"`` (ValueError).
    stacklevel: passed to ``warnings.warn`` (2: the caller of this function).

  Returns:
    The number of dropped rows.
  """
  if remainder not in REMAINDER_ACTIONS:
    raise ValueError(f"remainder must be one of {REMAINDER_ACTIONS}, got {remainder!r}")
  dropped = dropped_rows(num_rows, num_subdomains, overlap)
  if dropped == 0 or remainder == "drop":
    return dropped
  below, above = full_batch_sizes(num_rows, num_subdomains, overlap)
  sizes = f"{below} or {above}" if below is not None else f"{above}"
  message = (f"the subdomain layout (num_subdomains={num_subdomains}, overlap={overlap}) drops "
             f"{dropped} of the {num_rows} rows of the batch; batches of {sizes} rows drop none")
  if remainder == "raise":
    raise ValueError(f"{message}. Use such a batch size, or remainder='drop' to drop them.")
  warnings.warn(f"{message} (remainder='drop' drops them without this warning).", UserWarning,
                stacklevel=stacklevel)
  return dropped


def overlap_layout(num_rows: int, num_subdomains: int, overlap: float = 0.0) -> np.ndarray:
  """Global row indices of the overlap layout (docs/method.md); the single source of truth.

  Args:
    num_rows: m, the number of rows of the batch.
    num_subdomains: N >= 1.
    overlap: o in [0, 1), shared rows / own rows.

  Returns:
    An int64 array of N (b + c) row indices into the batch: block i is
    ``[i b, ..., (i + 1) b - 1, m - c, ..., m - 1]``. ``reshape(N, -1)`` gives one row per block.
  """
  own, shared = layout_sizes(num_rows, num_subdomains, overlap)
  n = int(num_subdomains)
  own_rows = np.arange(n * own, dtype=np.int64).reshape(n, own)
  shared_rows = np.broadcast_to(np.arange(num_rows - shared, num_rows, dtype=np.int64), (n, shared))
  return np.concatenate([own_rows, shared_rows], axis=1).reshape(-1)


def take_rows(batch: Batch, rows: np.ndarray) -> Batch:
  """Gathers ``rows`` (integer indices) along the leading axis of every leaf.

  Args:
    batch: pytree of arrays sharing a leading row axis.
    rows: 1-D integer indices, each in ``[0, rows of batch)``.

  Returns:
    The pytree of ``leaf[rows]``, with leaves of the same kind as the input.
  """
  count = row_count(batch)
  rows = np.asarray(rows)
  if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
    raise ValueError(f"rows must be a 1-D integer array, got shape {rows.shape} {rows.dtype}")
  if rows.size and (rows.min() < 0 or rows.max() >= count):
    raise ValueError(f"row indices must lie in [0, {count}), got [{rows.min()}, {rows.max()}]")
  return jax.tree_util.tree_map(lambda leaf: leaf[rows], batch)


def overlapping_subdomains(batch: Batch, num_subdomains: int, overlap: float = 0.0,
                           remainder: str = "warn") -> Batch:
  """Lays out ``batch`` as N contiguous blocks of own rows plus the shared rows.

  Args:
    batch: pytree of arrays sharing a leading row axis of m rows.
    num_subdomains: N >= 1.
    overlap: o in [0, 1), shared rows / own rows (see :func:`overlap_layout`).
    remainder: when the layout drops the m - c - N b rows that do not fill a block: ``"warn"``
      (default: drop them with a ``UserWarning`` naming the batch sizes that drop none),
      ``"drop"`` (quietly) or ``"raise"`` (ValueError); see :func:`check_remainder`.

  Returns:
    The batch with N (b + c) rows, ready for ``apts(num_subdomains=N)``. With no shared rows it
    is a plain slice of the first N b rows (the batch itself when nothing is dropped).
  """
  count = row_count(batch)
  own, shared = layout_sizes(count, num_subdomains, overlap)
  check_remainder(count, num_subdomains, overlap, remainder, stacklevel=3)
  if shared == 0:
    return trim_rows(batch, int(num_subdomains))
  return take_rows(batch, overlap_layout(count, num_subdomains, overlap))


def check_batch(batch: Batch, num_subdomains: int) -> int:
  """Checks that ``batch`` splits into ``num_subdomains`` equal blocks (usable at trace time).

  Args:
    batch: pytree of arrays sharing a leading row axis.
    num_subdomains: N >= 1.

  Returns:
    The number of rows of the batch.

  Raises:
    ValueError: no leaves, a leaf without a row axis, leaves with different row counts, or a row
      count not divisible by N.
  """
  n = as_int("num_subdomains", num_subdomains, 1)
  count = row_count(batch)
  if count % n:
    raise ValueError(
        f"the batch has {count} rows, not divisible by num_subdomains={n}; lay it out with "
        "aptsjax.data.overlapping_subdomains or trim it with aptsjax.data.trim_rows")
  return count


def split_subdomains(batch: Batch, num_subdomains: int) -> Batch:
  """Reshapes every leaf ``(rows, ...)`` to ``(N, rows // N, ...)``; subdomain i = rows [i b, (i+1) b).

  Args:
    batch: pytree of arrays sharing a leading row axis divisible by N.
    num_subdomains: N >= 1.

  Returns:
    The pytree of reshaped leaves (same kind as the input).
  """
  count = check_batch(batch, num_subdomains)
  n = int(num_subdomains)
  return jax.tree_util.tree_map(
      lambda leaf: leaf.reshape((n, count // n) + tuple(leaf.shape[1:])), batch)


def trim_rows(batch: Batch, multiple: int) -> Batch:
  """Drops trailing rows so that the row count is a multiple of ``multiple``.

  Args:
    batch: pytree of arrays sharing a leading row axis.
    multiple: >= 1, at most the number of rows.

  Returns:
    The batch itself when nothing is dropped, else the pytree of ``leaf[:keep]``.
  """
  k = as_int("multiple", multiple, 1)
  count = row_count(batch)
  keep = count - count % k
  if keep == 0:
    raise ValueError(f"the batch has {count} rows, fewer than multiple={k}")
  if keep == count:
    return batch
  return jax.tree_util.tree_map(lambda leaf: leaf[:keep], batch)
