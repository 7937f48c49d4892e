"""Tests of aptsjax.flax: the NNX and Linen adapters."""
