"""The paper's experiments (``python -m benchmarks.paper``) and the authors' code side by side."""
