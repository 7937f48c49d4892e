"""Tests of aptsjax.parallel: the trainer, meshes, shardings, checkpoints, processes."""
