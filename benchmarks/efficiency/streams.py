"""The minibatch streams of the simulated workers, the same for every method.

The training rows are split into W equal contiguous shares (the last ``rows mod W`` rows are
dropped); worker i owns share i and reads it, every epoch, in the order of
``np.random.default_rng((seed, epoch, i)).permutation(share)`` as minibatches of b = B / W rows
(the last partial minibatch of each epoch is dropped). Global minibatch h of an epoch is the
concatenation over the workers of their h-th minibatches: worker i's rows sit at
``[i b, (i + 1) b)``. The run's stream is the epochs' global minibatches one after the other; a
method that exchanges every H minibatches reads them in consecutive groups of H.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

Batch = Any


class Stream(NamedTuple):
  """The global minibatches of a run, as row indices into the training rows.

  Attributes:
    indices: (steps, B) int64, global minibatch k's rows, in order.
    epochs: (steps,) the 1-based epoch of each minibatch.
    workers: W.
    dropped: training rows in no share (``rows mod W``).
    unread: rows of every share left out of each epoch (its last partial minibatch).
  """
  indices: np.ndarray
  epochs: np.ndarray
  workers: int
  dropped: int
  unread: int


def shares(rows: int, workers: int) -> np.ndarray:
  """The workers' contiguous shares of the training rows.

  Args:
    rows: the number of training rows.
    workers: W.

  Returns:
    (W, rows // W) row indices; worker i's share is row i.
  """
  size = rows // workers
  if size < 1:
    raise ValueError(f"{rows} rows are too few for {workers} workers")
  return np.arange(workers * size).reshape(workers, size)


def worker_minibatches(share: np.ndarray, rows: int, seed: int, epoch: int,
                       worker: int) -> np.ndarray:
  """One worker's minibatches of one epoch: its share reshuffled, the last partial one dropped.

  Args:
    share: the worker's row indices.
    rows: b, rows per minibatch.
    seed: the run's seed.
    epoch: the 0-based epoch.
    worker: the worker's index i.

  Returns:
    (len(share) // b, b) row indices.
  """
  order = share[np.random.default_rng((seed, epoch, worker)).permutation(len(share))]
  count = len(share) // rows
  return order[:count * rows].reshape(count, rows)


def epoch_minibatches(parts: np.ndarray, batch: int, seed: int, epoch: int) -> np.ndarray:
  """The global minibatches of one epoch.

  Args:
    parts: (W, share) the shares.
    batch: B, rows per global minibatch (a multiple of W).
    seed: the run's seed.
    epoch: the 0-based epoch.

  Returns:
    (steps, B) row indices: minibatch h holds worker i's h-th minibatch at ``[i b, (i + 1) b)``.
  """
  rows = batch // len(parts)
  per_worker = [worker_minibatches(p, rows, seed, epoch, i) for i, p in enumerate(parts)]
  return np.concatenate(per_worker, axis=1)


def make_stream(rows: int, workers: int, batch: int, seed: int, epochs: int) -> Stream:
  """The stream of a run.

  Args:
    rows: the number of training rows.
    workers: W.
    batch: B, rows per global minibatch; must be a multiple of W.
    seed: the run's seed.
    epochs: the number of epochs.

  Returns:
    The Stream.

  Raises:
    ValueError: B not a multiple of W, or a share smaller than one minibatch.
  """
  if batch % workers:
    raise ValueError(f"the global minibatch ({batch} rows) must be a multiple of W={workers}")
  parts = shares(rows, workers)
  if parts.shape[1] < batch // workers:
    raise ValueError(f"a share of {parts.shape[1]} rows holds no {batch // workers}-row minibatch")
  per_epoch = [epoch_minibatches(parts, batch, seed, e) for e in range(epochs)]
  return Stream(np.concatenate(per_epoch), np.repeat(np.arange(1, epochs + 1), len(per_epoch[0])),
                workers, rows - parts.size, parts.shape[1] % (batch // workers))


def steps_per_epoch(stream: Stream) -> int:
  """Global minibatches per epoch."""
  return int(np.sum(stream.epochs == 1))


def exchanges(stream: Stream, period: int) -> list[np.ndarray]:
  """The stream in consecutive groups of ``period`` minibatches, one per exchange; a last
  incomplete group is left out.

  Args:
    stream: the stream.
    period: H, minibatches per exchange.

  Returns:
    ``steps // H`` arrays of shape (H, B).
  """
  count = len(stream.indices) // period
  return [stream.indices[k * period:(k + 1) * period] for k in range(count)]


def take(batch: Batch, rows: np.ndarray) -> Batch:
  """The rows ``rows`` of every leaf of ``batch`` (numpy, on the host).

  Args:
    batch: a pytree of arrays with a leading rows axis.
    rows: integer indices, of any shape S.

  Returns:
    The pytree with leaves of shape S + the leaf's trailing shape.
  """
  return jax.tree.map(lambda x: np.asarray(x)[rows], batch)


def worker_view(minibatches: Batch, workers: int) -> Batch:
  """H global minibatches as each worker's H local minibatches.

  Args:
    minibatches: leaves of shape (H, B, ...).
    workers: W.

  Returns:
    Leaves of shape (W, H, B / W, ...): ``[i, h]`` is worker i's rows of minibatch h.
  """
  def split(x: np.ndarray) -> np.ndarray:
    h, b = x.shape[:2]
    return np.swapaxes(x.reshape(h, workers, b // workers, *x.shape[2:]), 0, 1)
  return jax.tree.map(split, minibatches)
