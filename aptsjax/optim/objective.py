"""The user's loss as the optimizers evaluate it: checks, the cast to the parameters' dtype and
an optional auxiliary output.

``loss_fn(params, batch)`` returns a scalar, or with ``has_aux=True`` a pair ``(loss, aux)``
(``jax.value_and_grad(..., has_aux=True)``'s convention) whose ``aux`` is any pytree the
optimizers carry along untouched: the aux of the point an update ends at is kept in the state
(``state.aux``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from aptsjax.numerics import checks
from aptsjax.numerics import tree as tree_lib

PyTree = Any
LossFn = Callable[[PyTree, Any], Any]


def _call(loss_fn: LossFn, params: PyTree, batch: Any) -> Any:
  if batch is None:
    try:
      return loss_fn(params, batch)
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise ValueError(
          "update() was called without batch= and loss_fn(params, None) failed "
          f"({type(e).__name__}: {e}). Pass the batch the gradient was computed on: "
          "tx.update(grads, state, params, batch=batch), or for nnx.Optimizer "
          "optimizer.update(model, grads, batch=batch).") from e
  if checks.empty_batch(batch):
    raise ValueError("the batch has 0 rows: the loss of an empty batch is not defined; "
                     "skip empty batches (e.g. the tail of a data loader).")
  return loss_fn(params, batch)


def evaluate(loss_fn: LossFn, params: PyTree, batch: Any, has_aux: bool = False
             ) -> tuple[jax.Array, PyTree]:
  """``(loss, aux)``: the loss cast to the parameters' dtype and the aux (None without it).

  The cast makes mixed precision consistent: float32 parameters with float64 data (under
  ``jax_enable_x64``) give a float32 loss, like their float32 gradient.

  Raises:
    ValueError: (at trace time) a loss that is not a scalar; a pair returned without
      ``has_aux=True`` or a non-pair with it; ``batch`` None and ``loss_fn(params, None)``
      failing (``update`` called without ``batch=``); an empty batch (every leaf 0 rows).
  """
  out = _call(loss_fn, params, batch)
  if has_aux:
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
      raise ValueError("has_aux=True: loss_fn must return a pair (loss, aux), got "
                       f"{type(out).__name__}.")
    value, aux = out
  else:
    if isinstance(out, (tuple, list)):
      raise ValueError(f"loss_fn returned a {type(out).__name__} of {len(out)} items: if it "
                       "returns (loss, aux), pass has_aux=True (the aux of the current point "
                       "is then kept in state.aux).")
    value, aux = out, None
  if jnp.shape(value) != ():
    raise ValueError(f"loss_fn must return a scalar loss, got shape {jnp.shape(value)}.")
  return jnp.asarray(value).astype(tree_lib.tree_dtype(params)), aux


def scalar_loss(loss_fn: LossFn, params: PyTree, batch: Any, has_aux: bool = False
                ) -> jax.Array:
  """The loss alone (``evaluate`` without the aux)."""
  return evaluate(loss_fn, params, batch, has_aux)[0]


def value_and_grad(loss_fn: LossFn, batch: Any, has_aux: bool = False
                   ) -> Callable[[PyTree], tuple[Any, PyTree]]:
  """``params -> (value, grad)`` on ``batch``; ``value`` is the loss, or ``(loss, aux)`` with
  ``has_aux`` (JAX's convention)."""
  if has_aux:
    return jax.value_and_grad(lambda p: evaluate(loss_fn, p, batch, True), has_aux=True)
  return jax.value_and_grad(lambda p: scalar_loss(loss_fn, p, batch))


def split(value: Any, has_aux: bool) -> tuple[jax.Array, PyTree]:
  """``(loss, aux)`` from a ``value_and_grad`` value (aux None without ``has_aux``)."""
  return value if has_aux else (value, None)
