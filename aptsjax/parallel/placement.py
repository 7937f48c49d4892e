"""Where the trainer's parameters and optimizer states live on its mesh.

On a 1-D mesh (data axis only) the parameters are replicated and an optimizer state is sharded
over the data axis on its per-subdomain leaves (``aptsjax.state_specs``). On a 2-D mesh the
parameters are also sharded over the model axis as their PartitionSpecs say, and with them every
parameter-shaped state leaf (``aptsjax.sharding``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from aptsjax.parallel import sharding

PyTree = Any


def expand_specs(param_specs: PyTree, params: PyTree) -> PyTree:
  """``param_specs`` (a pytree like ``params``, or a prefix of it such as ``P()``) as one full
  PartitionSpec per parameter leaf."""
  return jax.tree.map(lambda s, part: jax.tree.map(
      lambda x: P(*sharding.full_spec(s, np.ndim(x))), part),
      param_specs, params, is_leaf=lambda s: isinstance(s, P))


class Placement:
  """Parameter and state shardings on ``mesh``, the model axis sharding the parameters when
  ``model_axis`` is not None.

  On a 2-D mesh the parameter specs are read (or expanded from ``param_specs``) and checked at
  the first use, then kept in ``specs``: every later step, state and checkpoint uses the same.
  """

  def __init__(self, mesh: jax.sharding.Mesh, axis_name: str, model_axis: str | None = None,
               param_specs: PyTree | None = None):
    self.mesh, self.axis_name, self.model_axis = mesh, axis_name, model_axis
    self._given = param_specs
    self.specs: PyTree | None = None   # the parameter specs, fixed by the first init / step

  def param_specs(self, params: PyTree) -> PyTree:
    """The parameter specs (2-D mesh), read from the first params and kept."""
    if self.specs is None:
      values = sharding.pure(params)
      found = (sharding.param_specs(params) if self._given is None
               else expand_specs(self._given, values))
      sharding.check_specs(found, values, self.mesh, (self.model_axis,))
      self.specs = found
    return self.specs

  def replicate(self, params: PyTree) -> PyTree:
    """``params`` on the mesh: replicated, over the model axis sharded as their specs say.
    Host arrays must hold the same values on every process."""
    if self.model_axis is None:
      return jax.device_put(params, NamedSharding(self.mesh, P()))
    specs = self.param_specs(params)  # read before the Variables (and their metadata) are dropped
    return jax.device_put(sharding.pure(params), sharding.shardings(specs, self.mesh))

  def state_shardings(self, state: NamedTuple, params: PyTree | None = None) -> PyTree:
    """NamedShardings of ``state`` (or its shape structs) on the mesh (``params`` default:
    ``state.grad``, read on a 2-D mesh only)."""
    if self.model_axis is None:
      return sharding.shardings(sharding.state_specs(state, self.axis_name), self.mesh)
    params = state.grad if params is None else params
    return sharding.shardings(sharding.state_specs(state, self.axis_name, params,
                                                   self.param_specs(params)), self.mesh)

  def step_shardings(self, params: PyTree, state: NamedTuple) -> tuple[PyTree, PyTree]:
    """The train step's output shardings on a 2-D mesh: params and state placed as they came."""
    data = NamedSharding(self.mesh, P(self.axis_name))
    return (sharding.shardings(self.param_specs(params), self.mesh),
            sharding.output_specs(state, self.state_shardings(state, params), self.axis_name,
                                  data))
