"""Progress of a long benchmark: an overall bar with an ETA, and one bar per run.

The overall bar counts estimated seconds of work (the caller's weights, e.g.
``benchmarks.paper.eta``). tqdm's ETA is the remaining weight at the rate observed so far, so it
adapts to the machine it runs on. Only process 0 draws; other processes stay quiet.
"""
from __future__ import annotations

import sys
from typing import Any

from aptsjax import distributed
from benchmarks.common.output import log


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
