"""Tests of benchmarks/: the quick modes (smoke runs, marked slow) and the helpers' units."""
