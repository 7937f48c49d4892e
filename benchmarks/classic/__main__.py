"""``python -m benchmarks.classic``: classic problems, float64 (``.trust_region``)."""
from benchmarks.classic import trust_region

trust_region.main()
