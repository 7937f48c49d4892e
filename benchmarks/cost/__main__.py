"""``python -m benchmarks.cost``: L-SR1/OBS cost and the APTS profile (``.core_cost``)."""
from benchmarks.cost import core_cost

core_cost.main()
