"""One to many devices with one argument: mesh, batch sharding and a jitted APTS train step.

    trainer = aptsjax.parallel.apts_trainer(loss_fn, num_subdomains=4, num_devices=4)
    state = trainer.init(params)
    batch = trainer.shard_batch(batch)            # overlap layout + sharding over the devices
    params, state = trainer.step(params, state, batch)

With ``num_devices=1`` the same code runs ``aptsjax.apts(axis_name=None)`` under ``jax.jit``;
with D > 1 it runs ``aptsjax.apts(axis_name="data")`` under ``jax.shard_map`` on a 1-D mesh of
D devices (check_vma=True), the state sharded by ``aptsjax.state_specs``. Subdomain i holds the
same rows whatever D is, so the results agree up to float rounding. For ``jax.pmap`` users,
``pmap_state`` / ``unpmap_state`` convert a state to per-device form and back.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from aptsjax.apts import apts
from aptsjax.apts import state_specs
from aptsjax import data

PyTree = Any


def _per_subdomain(state: NamedTuple) -> tuple[str, ...]:
  return getattr(type(state), "PER_SUBDOMAIN", ())


def pmap_state(state: NamedTuple, num_devices: int) -> NamedTuple:
  """Reshapes a global state to ``jax.pmap`` form (a leading device axis on every leaf).

  Per-subdomain leaves (N, ...) become (D, N / D, ...): device d holds subdomains
  [d N / D, (d + 1) N / D), the same ones it holds under ``jax.shard_map``; the other leaves are
  replicated to (D, ...).
  """
  per = _per_subdomain(state)

  def convert(name, value):
    if name in per:
      def split(x):
        if x.shape[0] % num_devices:
          raise ValueError(f"{x.shape[0]} subdomains do not divide over {num_devices} devices.")
        return jnp.reshape(x, (num_devices, x.shape[0] // num_devices) + x.shape[1:])
      return jax.tree.map(split, value)
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_devices,) + jnp.shape(x)), value)

  return type(state)(**{k: convert(k, v) for k, v in state._asdict().items()})


def unpmap_state(state: NamedTuple) -> NamedTuple:
  """The inverse of ``pmap_state``: merges the device axis back into the global layout."""
  per = _per_subdomain(state)

  def convert(name, value):
    if name in per:
      return jax.tree.map(lambda x: jnp.reshape(x, (-1,) + x.shape[2:]), value)
    return jax.tree.map(lambda x: x[0], value)

  return type(state)(**{k: convert(k, v) for k, v in state._asdict().items()})


class Trainer(NamedTuple):
  """A jitted APTS training step on one or several devices (see ``apts_trainer``).

  Attributes:
    tx: the ``aptsjax.apts`` transformation in use.
    mesh: the device mesh (None on one device).
    axis_name: the mesh axis name (None on one device).
    num_subdomains: N.
    overlap: the fraction of shared rows in the subdomain layout.
    init: ``params -> state``, placed on the devices.
    shard_batch: ``batch -> batch`` laid out by ``aptsjax.data.overlapping_subdomains`` and
      sharded over the devices (rows of subdomain i on the device that holds i).
    step: ``(params, state, batch) -> (params, state)``, jitted; ``batch`` from ``shard_batch``.
  """
  tx: optax.GradientTransformationExtraArgs
  mesh: jax.sharding.Mesh | None
  axis_name: str | None
  num_subdomains: int
  overlap: float
  init: Callable[[PyTree], NamedTuple]
  shard_batch: Callable[[Any], Any]
  step: Callable[..., tuple[PyTree, NamedTuple]]


def default_num_devices(num_subdomains: int, devices: list | None = None) -> int:
  """The largest number of available devices that divides ``num_subdomains``."""
  count = len(devices if devices is not None else jax.devices())
  return max(d for d in range(1, min(count, num_subdomains) + 1) if num_subdomains % d == 0)


def apts_trainer(loss_fn: Callable[[PyTree, Any], jax.Array], num_subdomains: int, *,
                 num_devices: int | None = None, overlap: float = 0.0, axis_name: str = "data",
                 devices: list | None = None, **apts_kwargs: Any) -> Trainer:
  """Builds the mesh, the batch layout and a jitted APTS train step.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, a mean over the rows of batch.
    num_subdomains: N, the total number of subdomains.
    num_devices: D, dividing N; default: the largest that divides N among ``devices``.
    overlap: shared rows / own rows of the subdomain layout, in [0, 1) (METHOD.md section 5).
    axis_name: the mesh axis name.
    devices: the devices to use (default ``jax.devices()``, all processes' devices).
    **apts_kwargs: passed to ``aptsjax.apts`` (local_steps, second_order, memory, ...).

  Returns:
    A ``Trainer``.
  """
  devices = list(devices if devices is not None else jax.devices())
  num_devices = num_devices or default_num_devices(num_subdomains, devices)
  if num_devices > len(devices):
    raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices are available.")
  if num_subdomains % num_devices:
    raise ValueError(f"num_subdomains={num_subdomains} is not divisible by "
                     f"num_devices={num_devices}.")
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f"overlap must be in [0, 1), got {overlap}.")
  multi = num_devices > 1
  tx = apts(loss_fn, num_subdomains=num_subdomains,
                     axis_name=axis_name if multi else None, **apts_kwargs)

  def layout(batch):
    return data.overlapping_subdomains(batch, num_subdomains, overlap)

  def one_step(params, state, batch):
    updates, state = tx.update(None, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  if not multi:
    return Trainer(tx=tx, mesh=None, axis_name=None, num_subdomains=num_subdomains,
                   overlap=overlap, init=tx.init, shard_batch=layout,
                   step=jax.jit(one_step))

  mesh = jax.make_mesh((num_devices,), (axis_name,), devices=devices[:num_devices])
  replicated = NamedSharding(mesh, P())
  rows = NamedSharding(mesh, P(axis_name))

  def init(params):
    state = tx.init(params)
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                             state_specs(state, axis_name))
    return jax.device_put(state, shardings)

  def shard_batch(batch):
    return jax.device_put(layout(batch), rows)

  @jax.jit
  def step(params, state, batch):
    specs = state_specs(state, axis_name)
    params = jax.device_put(params, replicated)
    return jax.shard_map(one_step, mesh=mesh, in_specs=(P(), specs, P(axis_name)),
                         out_specs=(P(), specs))(params, state, batch)

  return Trainer(tx=tx, mesh=mesh, axis_name=axis_name, num_subdomains=num_subdomains,
                 overlap=overlap, init=init, shard_batch=shard_batch, step=step)


def numpy_tree(tree: PyTree) -> PyTree:
  """Fetches a (replicated or sharded) pytree to host numpy arrays."""
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
