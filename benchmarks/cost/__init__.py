"""The cost of the L-SR1 update and OBS solve, and a profile of one APTS iteration
(``python -m benchmarks.cost``)."""
