"""Device meshes for aptsjax: a data axis, and optionally a model axis, over every process.

The data axis carries the subdomains (each process holds a contiguous range of them, so it loads a
contiguous range of the laid-out batch); the model axis, when there is one, shards the parameters
and every optimizer state inside one replica (``aptsjax.sharding``). A replica's devices come
from one process, consecutive in ``jax.devices()`` order, so that the model axis, which
communicates inside every forward and backward pass, stays on one host's interconnect.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType


def _by_process(devices: list) -> dict[int, list]:
  groups: dict[int, list] = {}
  for device in devices:
    groups.setdefault(device.process_index, []).append(device)
  return dict(sorted(groups.items()))


def default_num_devices(num_subdomains: int, devices: list | None = None) -> int:
  """The largest number of available devices that divides ``num_subdomains``.

  With several processes it is a multiple of the process count using the same number of devices
  on every process, so that every process takes part.
  """
  groups = _by_process(list(devices if devices is not None else jax.devices()))
  procs, per = len(groups), min(len(g) for g in groups.values())
  fits = [procs * k for k in range(1, per + 1) if num_subdomains % (procs * k) == 0]
  if not fits:
    raise ValueError(f"num_subdomains={num_subdomains} is not divisible by the {procs} processes; "
                     "every process must hold the same number of subdomains.")
  return max(fits)


def mesh_devices(num_devices: int, devices: list) -> list:
  """The devices of the mesh: ``num_devices / P`` from each of the P processes, process-major.

  Each process's devices are contiguous along the mesh axis, so each process holds a contiguous
  range of subdomains and loads a contiguous range of the laid-out batch.
  """
  groups = _by_process(devices)
  if num_devices % len(groups):
    raise ValueError(f"num_devices={num_devices} is not a multiple of the {len(groups)} "
                     "processes; every process must take part with the same number of devices.")
  per = num_devices // len(groups)
  short = [p for p, g in groups.items() if len(g) < per]
  if short:
    raise ValueError(f"num_devices={num_devices} needs {per} devices per process, but processes "
                     f"{short} have fewer; only {len(devices)} devices are available.")
  return [d for g in groups.values() for d in g[:per]]


def build_mesh(num_devices: int, model_devices: int, devices: list, axis_name: str = "data",
               model_axis: str = "model") -> jax.sharding.Mesh:
  """The trainer's mesh: 1-D ``(axis_name,)`` when ``model_devices == 1``, else 2-D.

  The 2-D mesh has shape ``(num_devices, model_devices)``: row d is replica d (data index d),
  its ``model_devices`` devices consecutive devices of one process. Both axes are
  ``AxisType.Auto``: APTS runs manual over the data axis inside ``jax.shard_map``, and over the
  model axis the compiler inserts the collectives: the model's own (e.g. the all-reduce after a
  row-sharded matmul) and the small all-reduces of the optimizer's inner products (k-sized Gram
  rows; nothing parameter-sized).

  Args:
    num_devices: D, the size of the data axis.
    model_devices: M, the size of the model axis.
    devices: the devices to choose from (every process's).
    axis_name: the data axis name.
    model_axis: the model axis name.

  Returns:
    A ``jax.sharding.Mesh``.

  Raises:
    ValueError: too few devices, or a process whose devices cannot hold whole replicas.
  """
  chosen = mesh_devices(num_devices * model_devices, devices)
  if model_devices == 1:
    return jax.sharding.Mesh(np.asarray(chosen), (axis_name,), axis_types=(AxisType.Explicit,))
  per_process = len(chosen) // len(_by_process(chosen))
  if per_process % model_devices:
    raise ValueError(f"each process takes {per_process} devices, not a multiple of "
                     f"model_devices={model_devices}: a replica must not span processes.")
  if axis_name == model_axis:
    raise ValueError(f"the data and model axes need different names, both are {axis_name!r}.")
  grid = np.asarray(chosen).reshape(num_devices, model_devices)
  return jax.sharding.Mesh(grid, (axis_name, model_axis),
                           axis_types=(AxisType.Auto, AxisType.Auto))
