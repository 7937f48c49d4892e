"""Streams: H minibatches per APTS update, read one after the other by the local steps.

Local SGD and DiLoCo let every worker take H steps over successive minibatches of its own rows
between two exchanges. ``apts`` does the same when its batch is a ``Stream``: local step h of
subdomain i reads subdomain i's rows of minibatch h, and the evaluation at theta^k (the losses,
g^k) and the global ratio test read minibatch 0 (docs/method.md, "Streams").

A ``Stream`` stacks the H minibatches along a second axis, so that its leaves keep the row axis
first, ``(rows, H, ...)``: splitting the rows into subdomains, sharding them over devices and
counting them work as for a plain batch, and subdomain i's rows of every minibatch are the same
block of rows. For simulated workers, minibatch h is the concatenation over the workers of each
worker's h-th minibatch (worker i's rows at ``[i b, (i + 1) b)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Batch = Any


class Stream(NamedTuple):
  """H minibatches of equal shapes, stacked along the second axis of every leaf.

  Attributes:
    minibatches: a batch pytree whose leaves have shape ``(rows, H, ...)``: row r of minibatch
      h is ``leaf[r, h]``.
  """
  minibatches: Batch

  @property
  def length(self) -> int:
    """H, the number of minibatches."""
    return int(np.shape(jax.tree.leaves(self.minibatches)[0])[1])


def stream(minibatches: Sequence[Batch]) -> Stream:
  """Stacks H minibatches (pytrees of equal structure and shapes) into a ``Stream``.

  Args:
    minibatches: H >= 1 batches, each a pytree of arrays sharing a leading row axis; NumPy
      leaves stay NumPy, JAX leaves become JAX.

  Returns:
    The ``Stream`` whose leaves are ``stack(leaves, axis=1)``, shape ``(rows, H, ...)``.

  Raises:
    ValueError: no minibatch, or minibatches of different structures or shapes.
  """
  minibatches = list(minibatches)
  if not minibatches:
    raise ValueError("a stream needs at least one minibatch")
  first = jax.tree.structure(minibatches[0])
  shapes = [np.shape(x) for x in jax.tree.leaves(minibatches[0])]
  if not shapes or any(len(s) == 0 for s in shapes):
    raise ValueError("every minibatch leaf needs a leading row axis")
  for h, mb in enumerate(minibatches[1:], 1):
    if (jax.tree.structure(mb) != first
        or [np.shape(x) for x in jax.tree.leaves(mb)] != shapes):
      raise ValueError(f"minibatch {h} differs from minibatch 0 in structure or shapes: every "
                       "minibatch of a stream needs the same rows and leaves.")

  def stack(*leaves):
    if all(isinstance(x, np.ndarray) for x in leaves):
      return np.stack(leaves, axis=1)
    return jnp.stack([jnp.asarray(x) for x in leaves], axis=1)
  return Stream(jax.tree.map(stack, *minibatches))


def minibatch(leaves: Batch, h: Any, axis: int = 1) -> Batch:
  """Minibatch ``h`` (an int or a traced index) of stacked stream leaves whose minibatch axis
  is ``axis`` (1 for a ``Stream``'s leaves, 2 after ``split_subdomains``)."""
  return jax.tree.map(lambda x: jax.lax.index_in_dim(x, h, axis, keepdims=False)
                      if isinstance(h, int) else jax.lax.dynamic_index_in_dim(
                          x, h, axis, keepdims=False), leaves)
