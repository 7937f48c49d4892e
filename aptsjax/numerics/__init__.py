"""Layer 0, numerics: pytree arithmetic and the L-SR1 / OBS linear algebra, no optimizer logic.

* ``tree``: inner products, norms and stacks of pytrees (no leaf is ever flattened).
* ``checks``: argument checks shared by every layer above (integer sizes, parameter dtypes).
* ``compact``: the compact representation B = gamma I + Psi M^{-1} Psi^T and its spectral form.
* ``lsr1``: the limited-memory SR1 memory (pairs, Gram matrices, update rule).
* ``obs``: the orthonormal-basis SR1 trust-region subproblem solve and the first-order step.
* ``scaling``: the diagonal RMS scaling D of ``norm="rms"`` and its change of variables.
"""

from aptsjax.numerics import checks
from aptsjax.numerics import compact
from aptsjax.numerics import lsr1
from aptsjax.numerics import obs
from aptsjax.numerics import scaling
from aptsjax.numerics import tree

__all__ = ["checks", "compact", "lsr1", "obs", "scaling", "tree"]
