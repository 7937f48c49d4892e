"""The study of the APTS options that chose the defaults (``python -m benchmarks.options``)."""
