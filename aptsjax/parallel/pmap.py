"""APTS states in ``jax.pmap`` form: a leading device axis on every leaf, and back.

Under ``jax.shard_map`` (``aptsjax.parallel.apts_trainer``) a state keeps its global layout and is
sharded by ``aptsjax.state_specs``; ``jax.pmap`` wants the device axis in the arrays instead.
Which fields carry a leading subdomain axis is read from ``aptsjax.optim.protocol``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from aptsjax.optim.protocol import per_subdomain_fields


def _map_fields(state: NamedTuple, per_subdomain: Callable[[Any], Any],
                other: Callable[[Any], Any]) -> NamedTuple:
  """``state`` with ``per_subdomain`` applied to the leaves of its per-subdomain fields and
  ``other`` to the rest."""
  per = per_subdomain_fields(state)
  return type(state)(**{name: jax.tree.map(per_subdomain if name in per else other, value)
                        for name, value in state._asdict().items()})


def pmap_state(state: NamedTuple, num_devices: int) -> NamedTuple:
  """Reshapes a global state to ``jax.pmap`` form (a leading device axis on every leaf).

  Per-subdomain leaves (N, ...) become (D, N / D, ...): device d holds subdomains
  [d N / D, (d + 1) N / D), the same ones it holds under ``jax.shard_map``; the other leaves are
  replicated to (D, ...).

  Raises:
    ValueError: N is not divisible by ``num_devices``.
  """
  def split(x):
    if x.shape[0] % num_devices:
      raise ValueError(f"{x.shape[0]} subdomains do not divide over {num_devices} devices.")
    return jnp.reshape(x, (num_devices, x.shape[0] // num_devices) + x.shape[1:])

  return _map_fields(state, split,
                     lambda x: jnp.broadcast_to(x, (num_devices,) + jnp.shape(x)))


def unpmap_state(state: NamedTuple) -> NamedTuple:
  """The inverse of ``pmap_state``: merges the device axis back into the global layout."""
  return _map_fields(state, lambda x: jnp.reshape(x, (-1,) + x.shape[2:]), lambda x: x[0])
