"""Tools read off compiled programs (not loaded by ``import aptsjax``).

* ``hlo``: the one reader of HLO text: computations, the call graph, loops and how often each
  computation runs, instructions, source locations.
* ``comm``: the collectives of a compiled XLA program, with sizes, trip counts and mesh axes.
* ``replica_groups``: the device groups of a collective, in the HLO text's three forms.
* ``traffic``: how often an executable reads or copies large stored arrays in full.
"""
