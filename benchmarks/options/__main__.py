"""``python -m benchmarks.options``: the options study (``benchmarks.options.ablation``)."""
from benchmarks.options import ablation

ablation.main()
