"""The paper's fully connected networks (Flax Linen) and pure helpers.

* `mnist_mlp`: 784-512-256-10, 535,818 parameters.
* `cifar_mlp`: 3072-512-512-10, 1,841,162 parameters.
* `mnist1d_mlp`: 40-100-100-10.

ReLU between layers, logits out; the loss is the mean softmax cross-entropy.
Parameters are handled as the plain "params" collection (the dict inside
``{"params": ...}``), the pytree an optax transformation updates.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
import math
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = Any
Batch = tuple[jax.Array, jax.Array]


class MLP(nn.Module):
  """Fully connected network: Dense layers with ReLU, no output activation.

  Attributes:
    features: output width of each Dense layer; the last is the number of
      classes.
  """
  features: Sequence[int] = (512, 256, 10)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps inputs of shape (..., input_dim) to logits (..., features[-1])."""
    for i, width in enumerate(self.features):
      x = nn.Dense(width, name=f"dense_{i}")(x)
      if i + 1 < len(self.features):
        x = nn.relu(x)
    return x


def mnist_mlp() -> MLP:
  """The paper's MNIST network 784-512-256-10 (535,818 parameters)."""
  return MLP(features=(512, 256, 10))


def cifar_mlp() -> MLP:
  """The paper's CIFAR-10 network 3072-512-512-10 (1,841,162 parameters)."""
  return MLP(features=(512, 512, 10))


def mnist1d_mlp() -> MLP:
  """The MNIST-1D network 40-100-100-10 (15,210 parameters)."""
  return MLP(features=(100, 100, 10))


_MODELS: dict[str, Callable[[], MLP]] = {
    "mnist5k": mnist_mlp,
    "mnist": mnist_mlp,
    "cifar10": cifar_mlp,
    "mnist1d": mnist1d_mlp,
}


def for_dataset(name: str) -> MLP:
  """Returns the network used for a data set name of `benchmarks.common.datasets`.

  Args:
    name: "mnist5k", "mnist", "cifar10" or "mnist1d".

  Returns:
    The MLP.
  """
  if name not in _MODELS:
    raise ValueError(f"no model for data set {name!r}; choose one of {', '.join(_MODELS)}")
  return _MODELS[name]()


def init_params(model: nn.Module, input_dim: int, seed: int = 0,
                dtype: Any = jnp.float32) -> Params:
  """Initializes the model's parameters (Flax's default initializers).

  Args:
    model: the module.
    input_dim: number of input features.
    seed: PRNG seed.
    dtype: dtype of the dummy input (parameters follow Flax's param_dtype).

  Returns:
    The "params" collection.
  """
  variables = model.init(jax.random.key(seed), jnp.zeros((1, input_dim), dtype))
  return variables["params"]


def count_params(params: Params) -> int:
  """Total number of scalars in a parameter pytree.

  Args:
    params: arrays, or shape structs such as `jax.eval_shape` returns.

  Returns:
    The sum of the leaves' sizes.
  """
  return int(sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params)))


def cross_entropy_loss(model: nn.Module) -> Callable[[Params, Batch], jax.Array]:
  """Builds the training objective of `model`.

  Args:
    model: a module mapping features to logits.

  Returns:
    loss_fn(params, batch) with batch = (x, y), x of shape (rows, features)
    and y int labels (rows,): the mean softmax cross-entropy over rows.
  """
  def loss_fn(params: Params, batch: Batch) -> jax.Array:
    x, y = batch
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss_fn


@partial(jax.jit, static_argnums=0)
def _num_correct(model: nn.Module, params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
  """Number of rows whose arg-max logit equals the label."""
  logits = model.apply({"params": params}, x)
  return jnp.sum(jnp.argmax(logits, axis=-1) == y)


def accuracy(model: nn.Module, params: Params, x: Any, y: Any,
             batch_size: int | None = None) -> float:
  """Fraction of rows classified correctly.

  Args:
    model: the module.
    params: its "params" collection.
    x: features (rows, features).
    y: int labels (rows,).
    batch_size: rows per evaluation chunk; default all rows at once.

  Returns:
    Accuracy in [0, 1] as a Python float.
  """
  rows = len(y)
  step = rows if batch_size is None else batch_size
  correct = sum(int(_num_correct(model, params, x[i:i + step], y[i:i + step]))
                for i in range(0, rows, step))
  return correct / rows
