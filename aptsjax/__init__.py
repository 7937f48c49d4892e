"""aptsjax: trust-region methods and data-parallel APTS for JAX, as optax transformations.

The package is layered; every import points down:

* ``aptsjax.numerics``: pytree arithmetic, L-SR1, OBS, the RMS scaling;
* ``aptsjax.data``: subdomain layouts and minibatches (host-side, NumPy);
* ``aptsjax.optim``: ``trust_region`` and ``apts`` with their settings, local solvers and
  parameter blocks;
* ``aptsjax.parallel``: meshes, state shardings, the jitted trainer, processes, checkpoints;
* ``aptsjax.flax``: the Flax NNX and Linen adapters;
* ``aptsjax.tools``: readers of compiled programs (collectives), loaded only when imported.

The names below are the public API; modules of earlier releases (``aptsjax.lsr1``,
``aptsjax.comm``, ...) are still reachable as attributes (docs/changelog.md lists the moves).
"""

import importlib as _importlib

from aptsjax import data
from aptsjax import numerics
from aptsjax import optim
from aptsjax import parallel
from aptsjax.numerics import compact
from aptsjax.numerics import lsr1
from aptsjax.numerics import obs
from aptsjax.numerics import scaling
from aptsjax.optim import blocks
from aptsjax.optim import local
from aptsjax.optim.apts import APTSState
from aptsjax.optim.apts import apts
from aptsjax.optim.blocks import layer_blocks
from aptsjax.optim.blocks import leaf_blocks
from aptsjax.optim.blocks import shard_blocks
from aptsjax.optim.local import LocalCarry
from aptsjax.optim.local import LocalSolver
from aptsjax.optim.local_solvers import optax_local_solver
from aptsjax.optim.local_solvers import trust_region_local_solver
from aptsjax.optim.config import APTSConfig
from aptsjax.optim.config import GENERAL_MIN_RADIUS
from aptsjax.optim.config import TrustRegionConfig
from aptsjax.optim.guard import warn_on_skip
from aptsjax.optim.trust_region import TrustRegionState
from aptsjax.optim.trust_region import trust_region
from aptsjax.optim.trust_region import value_and_grad_from_state
from aptsjax.parallel import checkpoint
from aptsjax.parallel import distributed
from aptsjax.parallel import mesh
from aptsjax.parallel import sharding
from aptsjax.parallel.sharding import state_specs
from aptsjax.parallel.trainer import Trainer
from aptsjax.parallel.trainer import apts_trainer

__version__ = "0.1.0"

# Modules loaded on first access only (framework adapters and HLO readers), and the module
# names of earlier releases.
_LAZY = {
    "flax": "aptsjax.flax",
    "tools": "aptsjax.tools",
    "comm": "aptsjax.tools.comm",
    "flax_utils": "aptsjax.flax",
    "hyperparams": "aptsjax.optim.config",
    "launch": "aptsjax.parallel.launch",
}


def __getattr__(name: str):
  if name in _LAZY:
    return _importlib.import_module(_LAZY[name])
  raise AttributeError(f"module 'aptsjax' has no attribute {name!r}")


__all__ = [
    "APTSConfig", "APTSState", "GENERAL_MIN_RADIUS", "LocalCarry", "LocalSolver", "Trainer",
    "TrustRegionConfig", "TrustRegionState", "apts", "apts_trainer", "blocks", "checkpoint", "compact", "data",
    "distributed", "layer_blocks", "leaf_blocks", "local", "lsr1", "mesh", "numerics", "obs",
    "optax_local_solver", "optim", "parallel", "scaling", "shard_blocks", "sharding",
    "state_specs", "trust_region", "trust_region_local_solver", "value_and_grad_from_state",
    "warn_on_skip",
]
