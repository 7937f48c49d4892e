"""The tasks of the efficiency benchmarks, by name: ``get(name) -> Task``.

* ``mnist_mlp``: MNIST-5k (4,000 training rows, 1,000 test), the paper's 784-512-256-10 MLP,
  mean softmax cross-entropy, accuracy; the last 500 training rows are the validation split.
* ``mnist1d_mlp``: MNIST-1D (4,000 / 1,000 generated rows, 40 features), its 40-100-100-10 MLP;
  validation: the last 10% of the training rows, at least 500.
* ``mnist_cnn`` and ``char_transformer``: from ``benchmarks.efficiency.nnx_tasks`` when that
  module exists (functions of the same names); resolved only when asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import datasets, models
from benchmarks.efficiency.task import Task

NNX_MODULE = "benchmarks.efficiency.nnx_tasks"
NNX_TASKS = ("mnist_cnn", "char_transformer")


def accuracy_fn(module: Any) -> Callable[[Any, Any], jax.Array]:
  """The fraction of rows whose arg-max logit is the label.

  Args:
    module: a Flax Linen module mapping features to logits.

  Returns:
    ``metric_fn(params, (x, y)) -> scalar`` in [0, 1].
  """
  def metric_fn(params: Any, batch: Any) -> jax.Array:
    x, y = batch
    logits = module.apply({"params": params}, x)
    return jnp.mean(jnp.argmax(logits, axis=-1) == y)
  return metric_fn


def mlp_task(name: str, ds: datasets.Dataset, module: Any, num_val: int) -> Task:
  """A classification task of an MLP on a data set held in memory.

  Args:
    name: the task's name.
    ds: the data set (flat float32 features, int32 labels).
    module: the MLP (``benchmarks.common.models``).
    num_val: training rows held out at the end for selection.

  Returns:
    The Task: cross-entropy loss, accuracy metric.
  """
  return Task(name=name,
              init=lambda seed: models.init_params(module, ds.num_features, seed=seed),
              loss_fn=models.cross_entropy_loss(module), metric_fn=accuracy_fn(module),
              metric="accuracy", higher_is_better=True,
              train=(ds.x_train, ds.y_train), test=(ds.x_test, ds.y_test), num_val=num_val)


def mnist_mlp() -> Task:
  """MNIST-5k with the paper's MLP; the last 500 training rows validate."""
  return mlp_task("mnist_mlp", datasets.load_mnist5k(), models.mnist_mlp(),
                  datasets.MNIST5K_NUM_VAL)


def mnist1d_mlp() -> Task:
  """MNIST-1D with its MLP; the last 10% of the training rows (at least 500) validate."""
  ds = datasets.load_mnist1d()
  return mlp_task("mnist1d_mlp", ds, models.mnist1d_mlp(), max(len(ds.y_train) // 10, 500))


def nnx_task(name: str) -> Callable[[], Task]:
  """A task of ``benchmarks.efficiency.nnx_tasks``, imported when called.

  Args:
    name: the function of that module that builds the task.

  Returns:
    A zero-argument builder; calling it raises ImportError when the module is missing.
  """
  def build() -> Task:
    return getattr(importlib.import_module(NNX_MODULE), name)()
  return build


TASKS: dict[str, Callable[[], Task]] = {
    "mnist_mlp": mnist_mlp, "mnist1d_mlp": mnist1d_mlp,
    **{name: nnx_task(name) for name in NNX_TASKS}}


def available() -> list[str]:
  """The names ``get`` can build here: the MLP tasks, and the NNX ones when their module
  exists."""
  has_nnx = importlib.util.find_spec(NNX_MODULE) is not None
  return [name for name in TASKS if has_nnx or name not in NNX_TASKS]


def get(name: str) -> Task:
  """Builds a task by name.

  Args:
    name: one of ``TASKS``.

  Returns:
    The Task.

  Raises:
    ValueError: an unknown name, or an NNX task while ``nnx_tasks`` does not exist.
  """
  if name not in available():
    raise ValueError(f"unknown or unavailable task {name!r}; choose one of "
                     f"{', '.join(available())}")
  return TASKS[name]()


def first_rows(task: Task, rows: int) -> Task:
  """The task on its first ``rows`` training rows (the validation split kept at their end).

  Args:
    task: the task.
    rows: training rows to keep; more than the task has keeps them all.

  Returns:
    The task with fewer training rows; ``num_val`` shrinks to a quarter of them when needed.
  """
  rows = min(rows, task.rows(task.train))
  train = jax.tree.map(lambda x: np.asarray(x)[:rows], task.train)
  return task._replace(train=train, num_val=min(task.num_val, rows // 4))
