"""A training task of the efficiency benchmarks: a model, its loss, its data splits and a metric.

Every method of ``benchmarks.efficiency`` (DDP-Adam, DiLoCo, APTS) trains a ``Task`` the same
way: the training rows are split into equal contiguous shares, one per simulated worker, each
worker reads its own share as a stream of minibatches reshuffled every epoch with a fixed seed,
and the metric is read on the validation split (for selection) or the test split (reported).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import numpy as np

PyTree = Any
Batch = Any   # a pytree of arrays with a leading rows axis, e.g. (x, y)


class Task(NamedTuple):
  """One problem of the efficiency benchmarks.

  Attributes:
    name: a short name ("mnist_mlp", "mnist_cnn", "char_transformer", ...).
    init: ``seed -> params``, the initial parameters as a plain pytree of arrays.
    loss_fn: ``(params, batch) -> scalar``, the mean training loss over the batch's rows.
    metric_fn: ``(params, batch) -> scalar``, the reported metric over the batch's rows.
    metric: the metric's name ("accuracy" or "loss").
    higher_is_better: True for accuracy, False for a loss.
    train: the training rows (the last ``num_val`` of them are the validation split).
    test: the test rows.
    num_val: rows at the end of ``train`` held out for selection.
    weight_decay: the decoupled weight decay of the Adam baselines (AdamW; 0: Adam).
  """
  name: str
  init: Callable[[int], PyTree]
  loss_fn: Callable[[PyTree, Batch], jax.Array]
  metric_fn: Callable[[PyTree, Batch], jax.Array]
  metric: str
  higher_is_better: bool
  train: Batch
  test: Batch
  num_val: int
  weight_decay: float = 0.0

  def rows(self, batch: Batch) -> int:
    """The number of rows of a batch."""
    return int(np.shape(jax.tree.leaves(batch)[0])[0])

  def split(self, validation: bool) -> tuple[Batch, Batch]:
    """(training rows, evaluation rows): the first rows and the validation split when
    ``validation``, else all training rows and the test split."""
    if not validation:
      return self.train, self.test
    cut = self.rows(self.train) - self.num_val
    return (jax.tree.map(lambda x: x[:cut], self.train),
            jax.tree.map(lambda x: x[cut:], self.train))
