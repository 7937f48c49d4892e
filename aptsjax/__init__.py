"""aptsjax: trust-region methods and data-parallel APTS for JAX, as optax transformations."""

from aptsjax import blocks
from aptsjax import checkpoint
from aptsjax import comm
from aptsjax import data
from aptsjax import distributed
from aptsjax import hyperparams
from aptsjax import local
from aptsjax import lsr1
from aptsjax import mesh
from aptsjax.apts import APTSState
from aptsjax.apts import apts
from aptsjax.blocks import layer_blocks
from aptsjax.blocks import leaf_blocks
from aptsjax.blocks import shard_blocks
from aptsjax.local import LocalCarry
from aptsjax.local import LocalSolver
from aptsjax.local import optax_local_solver
from aptsjax.local import trust_region_local_solver
from aptsjax import obs
from aptsjax import parallel
from aptsjax import scaling
from aptsjax import sharding
from aptsjax.sharding import state_specs
from aptsjax.trust_region import GENERAL_MIN_RADIUS
from aptsjax.trust_region import Hyperparams
from aptsjax.trust_region import TrustRegionState
from aptsjax.trust_region import trust_region
from aptsjax.trust_region import value_and_grad_from_state

__version__ = "0.1.0"
