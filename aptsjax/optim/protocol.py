"""What the layers above the optimizers may read of their states.

Every state of this package is a NamedTuple pytree with optax's field names for the objective:
``value`` (the loss at the current parameters, on the last batch) and ``grad`` (its gradient),
so ``optax.tree.get(state, "value")`` and ``optax.value_and_grad_from_state`` find them, also
inside ``optax.chain``.

A state whose leaves partly carry a leading subdomain axis (``aptsjax.apts``: one local
problem per subdomain, sharded over the data axis) names those fields in the class attribute
``PER_SUBDOMAIN``; ``per_subdomain_fields`` is the one reader of that attribute, used by the
sharding rules and the ``pmap`` conversion of ``aptsjax.parallel``.
"""

from __future__ import annotations

from typing import Any


def per_subdomain_fields(state: Any) -> tuple[str, ...]:
  """The fields of ``state`` whose leaves have a leading subdomain axis (N, or N x J).

  Args:
    state: an optimizer state (any pytree; only NamedTuples can declare such fields).

  Returns:
    The names listed by the state's class attribute ``PER_SUBDOMAIN``; ``()`` for a state that
    has none (``aptsjax.trust_region``, optax states), whose leaves are all replicated.

  Raises:
    ValueError: ``PER_SUBDOMAIN`` names a field the state does not have.
  """
  names = tuple(getattr(type(state), "PER_SUBDOMAIN", ()))
  missing = [n for n in names if n not in getattr(state, "_fields", ())]
  if missing:
    raise ValueError(f"{type(state).__name__}.PER_SUBDOMAIN names {missing}, which are not "
                     f"fields of the state ({getattr(state, '_fields', ())}).")
  return names
