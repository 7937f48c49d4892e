"""aptsjax: trust-region methods and data-parallel APTS for JAX, as optax transformations."""

from aptsjax import lsr1
from aptsjax import obs

__version__ = "0.1.0"
