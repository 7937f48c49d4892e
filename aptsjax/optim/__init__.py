"""Layer 1, optimizers: trust region and APTS as optax transformations (one device or inside a
user's ``shard_map``/``pmap``); they import only ``aptsjax.numerics`` and ``aptsjax.data``.
"""

from aptsjax.optim import apts
from aptsjax.optim import blocks
from aptsjax.optim import local
from aptsjax.optim import config
from aptsjax.optim import trust_region

__all__ = ["apts", "blocks", "local", "config", "trust_region"]
