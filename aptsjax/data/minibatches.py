"""SAPTS minibatches: one epoch's row indices, and the minibatches gathered by them.

SAPTS minibatches (:func:`minibatches`, :func:`iterate_minibatches`) come from a seeded
permutation per epoch, ``np.random.default_rng((seed, epoch)).permutation(num_rows)``; each
minibatch after the first starts with the last ``round(overlap * batch_size)`` rows of the previous
one, followed by fresh rows of the permutation. Fresh rows that cannot fill a whole minibatch are
dropped (4,000 rows, batch 660, overlap 0: 6 minibatches, 40 rows unused).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from aptsjax.data.layout import as_overlap
from aptsjax.data.layout import row_count
from aptsjax.data.layout import take_rows
from aptsjax.numerics.checks import as_int

Batch = Any


def _minibatch_sizes(num_rows: int, batch_size: int, overlap: float) -> tuple[int, int]:
  """Validates the iterator's arguments; returns (carried rows, number of minibatches)."""
  m = as_int("num_rows", num_rows, 1)
  size = as_int("batch_size", batch_size, 1)
  if size > m:
    raise ValueError(f"batch_size={size} exceeds num_rows={m}")
  carried = round(as_overlap(overlap) * size)
  if carried >= size:
    raise ValueError(f"overlap={overlap} carries all {size} rows over: no fresh rows per minibatch")
  return carried, 1 + (m - size) // (size - carried)


def num_minibatches(num_rows: int, batch_size: int, overlap: float = 0.0) -> int:
  """Minibatches per epoch of :func:`minibatches`: 1 + floor((m - B) / (B - round(o B)))."""
  return _minibatch_sizes(num_rows, batch_size, overlap)[1]


def minibatches(num_rows: int, batch_size: int, *, overlap: float = 0.0, seed: int = 0,
                epoch: int = 0) -> list[np.ndarray]:
  """Row indices of one epoch's SAPTS minibatches (docs/method.md, "SAPTS minibatches").

  The epoch's order is ``np.random.default_rng((seed, epoch)).permutation(num_rows)``. The first
  minibatch is its first ``batch_size`` rows; each later one is the last k = round(overlap *
  batch_size) rows of the previous minibatch (Python's round, half to even) followed by the next
  ``batch_size - k`` fresh rows of the permutation. Every row is fresh at most once per epoch;
  the fresh rows left over that cannot fill a whole minibatch (fewer than ``batch_size - k``)
  are dropped for this epoch.

  Args:
    num_rows: m >= 1, rows of the data set.
    batch_size: B in [1, m], rows of every minibatch.
    overlap: in [0, 1), the fraction of a minibatch carried over from the previous one.
    seed: non-negative integer seed.
    epoch: non-negative epoch number (a different permutation per epoch).

  Returns:
    A list of int64 index arrays, each of length ``batch_size``.
  """
  carried, count = _minibatch_sizes(num_rows, batch_size, overlap)
  seed = as_int("seed", seed, 0)
  epoch = as_int("epoch", epoch, 0)
  order = np.random.default_rng((seed, epoch)).permutation(num_rows).astype(np.int64)
  fresh = batch_size - carried
  batches = [order[:batch_size]]
  for j in range(1, count):
    start = batch_size + (j - 1) * fresh
    batches.append(np.concatenate([batches[-1][fresh:], order[start:start + fresh]]))
  return batches


def iterate_minibatches(data: Batch, batch_size: int, *, overlap: float = 0.0, seed: int = 0,
                        epoch: int = 0) -> Iterator[Batch]:
  """Yields one epoch of minibatches of ``data``, gathered by :func:`minibatches`.

  Like :func:`minibatches`, it leaves out of the epoch the fresh rows that cannot fill a whole
  minibatch: m - B - (num_minibatches - 1)(B - round(o B)) rows, fewer than B - round(o B), and
  different rows each epoch (the permutation changes). This is the usual last-batch drop of a
  shuffled loader, documented here rather than warned about.

  Args:
    data: pytree of arrays sharing a leading row axis (the whole training set).
    batch_size: rows per minibatch.
    overlap: fraction of each minibatch carried over from the previous one.
    seed: non-negative integer seed.
    epoch: epoch number.

  Returns:
    An iterator of batches like ``data`` with ``batch_size`` rows each.
  """
  rows = minibatches(row_count(data), batch_size, overlap=overlap, seed=seed, epoch=epoch)
  return (take_rows(data, index) for index in rows)  # Arguments are checked before iteration.
