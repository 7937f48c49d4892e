"""``python -m benchmarks.paper``: the paper benchmark (``benchmarks.paper.paper``)."""
from benchmarks.paper import paper

paper.main()
