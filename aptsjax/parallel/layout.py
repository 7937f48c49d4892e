"""The trainer's batch layout on a mesh: subdomain i's rows on the data index that holds it.

Every process computes the same global layout (``aptsjax.data.overlap_layout``) and loads only
the rows of its own subdomains, a contiguous range of the laid-out batch (``aptsjax.mesh``).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from aptsjax import data
from aptsjax.parallel import distributed


class BatchLayout:
  """``process_rows`` / ``shard_local_batch`` / ``shard_batch`` of a trainer on ``mesh``.

  The first batch's shapes are compared across processes once (``distributed.check_same``).
  """

  def __init__(self, mesh: jax.sharding.Mesh, axis_name: str, num_subdomains: int,
               overlap: float, remainder: str):
    self.num_subdomains, self.overlap, self.remainder = num_subdomains, overlap, remainder
    self.rows = NamedSharding(mesh, P(axis_name))
    replicas = mesh.devices.reshape(mesh.shape[axis_name], -1)   # one row per data index
    self._mine = [i for i, replica in enumerate(replicas)
                  if any(d.process_index == jax.process_index() for d in replica)]
    self._per_device = num_subdomains // len(replicas)
    self._checked = False   # the first batch's shapes, across processes

  def process_rows(self, num_rows: int) -> np.ndarray:
    """The rows of a ``num_rows``-row global batch that this process's devices hold, in order."""
    blocks = data.overlap_layout(num_rows, self.num_subdomains, self.overlap)
    blocks = blocks.reshape(self.num_subdomains, -1)
    return blocks[self._mine[0] * self._per_device:
                  (self._mine[-1] + 1) * self._per_device].reshape(-1)

  def shard_local_batch(self, local: Any, num_rows: int) -> Any:
    """This process's rows (``take_rows(batch, process_rows(num_rows))``) as a global batch."""
    own, shared = data.layout_sizes(num_rows, self.num_subdomains, self.overlap)
    data.check_remainder(num_rows, self.num_subdomains, self.overlap, self.remainder,
                         stacklevel=3)
    total = self.num_subdomains * (own + shared)
    want = len(self._mine) * self._per_device * (own + shared)
    if data.row_count(local) != want:
      raise ValueError(f"this process must supply {want} rows (process_rows({num_rows})), got "
                       f"{data.row_count(local)}")
    shape = lambda x: (total,) + tuple(np.shape(x)[1:])
    if not self._checked:
      distributed.check_same({"rows": num_rows, "batch": jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(shape(x), x.dtype), local)}, "batch")
      self._checked = True
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        self.rows, np.asarray(x), shape(x)), local)

  def shard_batch(self, batch: Any) -> Any:
    """The global batch (the same on every process) laid out and sharded; reads only this
    process's rows."""
    count = data.row_count(batch)
    return self.shard_local_batch(data.take_rows(batch, self.process_rows(count)), count)
