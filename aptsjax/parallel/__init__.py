"""Layer 2, devices and processes: meshes, state shardings, the jitted APTS trainer, multi-process
start-up and checkpoints. Imports the optimizers; nothing below imports it.
"""

from aptsjax.parallel import checkpoint
from aptsjax.parallel import distributed
from aptsjax.parallel import layout
from aptsjax.parallel import mesh
from aptsjax.parallel import placement
from aptsjax.parallel import pmap
from aptsjax.parallel import sharding
from aptsjax.parallel import step
from aptsjax.parallel import trainer
from aptsjax.parallel.mesh import default_num_devices
from aptsjax.parallel.mesh import mesh_devices
from aptsjax.parallel.pmap import pmap_state
from aptsjax.parallel.pmap import unpmap_state
from aptsjax.parallel.sharding import state_specs
from aptsjax.parallel.trainer import CPU_COMPILER_OPTIONS
from aptsjax.parallel.trainer import METRICS
from aptsjax.parallel.trainer import Trainer
from aptsjax.parallel.trainer import apts_trainer
from aptsjax.parallel.trainer import numpy_tree

__all__ = ["CPU_COMPILER_OPTIONS", "METRICS", "Trainer", "apts_trainer", "checkpoint",
           "default_num_devices", "distributed", "layout", "mesh", "mesh_devices", "numpy_tree",
           "placement", "pmap", "pmap_state", "sharding", "state_specs", "step", "trainer",
           "unpmap_state"]
