"""Weights of the paper benchmark's progress bar: estimated seconds of each method's work.

The overall bar (``benchmarks.common.progress.Progress``) counts these estimates; its ETA is the
remaining weight at the speed observed so far, so a faster or slower machine rescales it.
"""
from __future__ import annotations

from benchmarks.paper import methods as pm

# Seconds per epoch on MNIST-5k's 4,000 rows and seconds of compilation, measured on a 2-core CPU
# (the default run, README table).
EPOCH_SECONDS = {"APTS N=2 o1": 0.59, "APTS N=4 o1": 0.32, "APTS N=6 o1": 0.34,
                 "APTS N=2 o2": 0.73, "APTS N=4 o2": 1.02, "APTS N=6 o2": 1.50,
                 "SAPTS N=2 o1": 0.37, "SAPTS N=4 o1": 0.61, "SAPTS N=6 o1": 0.82,
                 "SAPTS N=2 o2": 1.59, "SAPTS N=4 o2": 2.63, "SAPTS N=6 o2": 4.68,
                 "TR o2": 0.15, "Adam": 0.07, "SGD": 0.06}
EVAL_SECONDS = 0.05          # train loss and test accuracy after every epoch
COMPILE_SECONDS = {"o1": 7.0, "o2": 25.0, "adam": 0.5, "sgd": 0.5}


def epoch_weight(method: pm.Method, num_rows: int) -> float:
  """Estimated seconds of one epoch of ``method`` on ``num_rows`` training rows (ETA only)."""
  default = 1.0 if method.kind in ("apts", "tr") else 0.1
  return EPOCH_SECONDS.get(method.name, default) * num_rows / 4000 + EVAL_SECONDS


def compile_weight(method: pm.Method) -> float:
  """Estimated seconds of compiling ``method``'s step (ETA only)."""
  return COMPILE_SECONDS.get(method.kind, COMPILE_SECONDS[method.order])
