"""Tests of aptsjax.optim: trust_region, apts, their settings, local solvers, blocks, the radius
rules, the optax contract and the golden trajectories."""
