"""Tools read off compiled programs (not loaded by ``import aptsjax``).

* ``comm``: the collectives of a compiled XLA program, with sizes, trip counts and mesh axes.
* ``replica_groups``: the device groups of a collective, in the HLO text's three forms.
"""
