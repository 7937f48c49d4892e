"""The trust-region method on classic problems vs scipy and optax (``python -m benchmarks.classic``)."""
