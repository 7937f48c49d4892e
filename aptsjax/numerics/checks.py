"""Checks of static arguments shared by the optimizers and the data helpers (construction and
trace time): integer sizes, parameter dtypes, empty batches. Each raises ValueError naming the
argument and what to pass instead."""

from __future__ import annotations

import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def as_int(name: str, value: Any, minimum: int) -> int:
  """Returns ``value`` as a Python int, or raises ValueError naming the argument.

  Args:
    name: the argument's name, for the message.
    value: an integer (Python or numpy; not a bool, a float or a string).
    minimum: the smallest value allowed.
  """
  if isinstance(value, jax.core.Tracer):
    raise ValueError(f"{name} must be a Python integer fixed at construction, got a traced "
                     "value (optax.inject_hyperparams is not supported: sizes shape the state).")
  try:
    result = None if isinstance(value, bool) else operator.index(value)
  except TypeError:
    result = None
  if result is None or result < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
  return result


SECOND_ORDER_DTYPES = ("float32", "float64")


def check_params(params: PyTree, second_order: bool) -> None:
  """Raises ValueError unless ``params`` can be optimised (at ``init``, before any tracing).

  Every leaf must be a floating array. The first-order method also runs in bfloat16 and
  float16 (its norms accumulate in float32); the second-order one needs float32 or float64
  (its small dense eigenproblems have no half-precision kernels).

  Args:
    params: the parameter pytree.
    second_order: whether the L-SR1 model is in use.
  """
  leaves = jax.tree.leaves(params)
  if not leaves:
    raise ValueError("params must contain at least one array.")
  dtypes = {jnp.result_type(leaf) for leaf in leaves}
  bad = sorted(str(d) for d in dtypes if not jnp.issubdtype(d, jnp.floating))
  if bad:
    raise ValueError(f"params must be floating arrays, got leaves of dtype {', '.join(bad)}: "
                     "cast them with jax.tree.map(lambda x: x.astype(jnp.float32), params).")
  half = sorted(str(d) for d in dtypes if str(d) not in SECOND_ORDER_DTYPES)
  if second_order and half:
    raise ValueError(f"second_order=True supports params of dtype "
                     f"{' or '.join(SECOND_ORDER_DTYPES)}, got {', '.join(half)}: pass "
                     "second_order=False (the first-order method runs in half precision) or cast "
                     "the params to float32.")


def empty_batch(batch: Any) -> bool:
  """Whether every leaf of ``batch`` has a leading axis of size 0 (and there is a leaf)."""
  shapes = [np.shape(leaf) for leaf in jax.tree.leaves(batch)]
  return bool(shapes) and all(len(shape) >= 1 and shape[0] == 0 for shape in shapes)
