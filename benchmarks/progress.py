"""Progress reporting of the paper benchmark: an overall bar with an ETA, one bar per run.

The overall bar counts estimated seconds of work: each method's compilation and epochs are
weighted by the times measured on a 2-core CPU in the default run (the README table). tqdm's
ETA is the remaining weight at the rate observed so far, so it adapts to the machine it runs on.
Only process 0 draws; other processes stay quiet.
"""
from __future__ import annotations

import sys
from typing import Any

from aptsjax import distributed
from benchmarks import paper_methods as pm


def log(msg: str) -> None:
  """Prints a progress line at once, on process 0 only."""
  if distributed.is_main_process():
    print(msg, flush=True)


# Seconds per epoch on MNIST-5k's 4,000 rows and seconds of compilation, measured on a 2-core CPU
# (the default run, README table). They only weight the overall progress bar: its ETA is the
# remaining weight at the speed observed so far, so a faster or slower machine rescales it.
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


class Progress:
  """The overall bar (estimated seconds of work, with an ETA) and one bar per run, process 0.

  ``total``: the plan's estimated seconds; ``desc``: the overall bar's label.
  """

  def __init__(self, total: float, desc: str = "all methods"):
    self._overall = None
    if distributed.is_main_process():
      try:
        from tqdm import tqdm
      except ImportError:  # pragma: no cover
        tqdm = None
      if tqdm is not None:
        self._tqdm = tqdm
        self._overall = tqdm(total=total, desc=desc, unit="s est",
                             position=0, file=sys.stdout, mininterval=1.0,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                             "[{elapsed} elapsed, ETA {remaining}]")

  def advance(self, weight: float) -> None:
    """Marks ``weight`` estimated seconds of the plan as done (never past the plan's total)."""
    if self._overall is not None:
      self._overall.update(max(0.0, min(weight, self._overall.total - self._overall.n)))

  def run(self, total: int, desc: str) -> Any:
    """A bar over the epochs of one run (a stand-in without tqdm or on other processes)."""
    if self._overall is None:
      return _QuietBar(desc)
    return self._tqdm(total=total, desc=desc, position=1, leave=False, file=sys.stdout,
                      mininterval=1.0)

  def close(self) -> None:
    """Closes the overall bar."""
    if self._overall is not None:
      self._overall.close()


class _QuietBar:
  """Stands in for a tqdm bar: logs only when the run is done."""

  def __init__(self, desc: str):
    self.desc = desc

  def update(self, n: int = 1) -> None:
    """Nothing to draw."""

  def set_postfix_str(self, s: str) -> None:
    """Nothing to draw."""

  def close(self) -> None:
    """Logs the end of the run."""
    log(f"{self.desc} done")
