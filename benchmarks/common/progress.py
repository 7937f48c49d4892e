"""Progress of a long benchmark: an overall bar with an ETA, and one bar per run.

The overall bar counts estimated seconds of work (the caller's weights, e.g.
``benchmarks.paper.eta``). tqdm's ETA is the remaining weight at the rate observed so far, so it
adapts to the machine it runs on. Bars are drawn on stderr, and only when stderr is a terminal
and on process 0: redirected to a file, a run writes no carriage returns, only the callers' own
line per finished run and one closing line with the share of the plan done and the time taken.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

from aptsjax import distributed
from benchmarks.common.output import log

T = TypeVar("T")


def draws(stream: TextIO | None = None) -> bool:
  """Whether to draw bars: on process 0, tqdm installed, ``stream`` (stderr) a terminal."""
  stream = sys.stderr if stream is None else stream
  try:
    import tqdm  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:  # pragma: no cover
    return False
  isatty = getattr(stream, "isatty", None)
  return bool(isatty and isatty()) and distributed.is_main_process()


class Progress:
  """The overall bar (estimated seconds of work, with an ETA) and one bar per run.

  ``total``: the plan's estimated seconds; ``desc``: the overall bar's label. Without a
  terminal, ``close`` logs one line instead of the bar.
  """

  def __init__(self, total: float, desc: str = "all methods"):
    self._overall = None
    self.total, self.done, self.desc, self._start = total, 0.0, desc, time.perf_counter()
    if draws():
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self._tqdm = tqdm
      self._overall = tqdm(total=total, desc=desc, unit="s est",
                           position=0, file=sys.stderr, mininterval=1.0,
                           bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                           "[{elapsed} elapsed, ETA {remaining}]")

  def advance(self, weight: float) -> None:
    """Marks ``weight`` estimated seconds of the plan as done (never past the plan's total)."""
    step = max(0.0, min(weight, self.total - self.done))
    self.done += step
    if self._overall is not None:
      self._overall.update(step)

  def run(self, total: int, desc: str) -> Any:
    """A bar over the epochs of one run (a silent stand-in without a terminal)."""
    if self._overall is None:
      return _QuietBar()
    return self._tqdm(total=total, desc=desc, position=1, leave=False, file=sys.stderr,
                      mininterval=1.0)

  def close(self) -> None:
    """Closes the overall bar; without a terminal, logs the share of the plan done."""
    if self._overall is not None:
      self._overall.close()
    else:
      share = 100.0 * self.done / self.total if self.total else 100.0
      log(f"{self.desc}: {share:.0f}% of the planned work done in "
          f"{time.perf_counter() - self._start:.0f} s")


def track(items: Iterable[T], desc: str) -> Iterator[T]:
  """Iterates ``items`` under a bar on a terminal; otherwise logs one line when done."""
  if draws():
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    yield from tqdm(items, desc=desc, file=sys.stderr)
    return
  start, count = time.perf_counter(), 0
  for count, item in enumerate(items, 1):
    yield item
  log(f"{desc}: {count} done in {time.perf_counter() - start:.0f} s")


class _QuietBar:
  """Stands in for a tqdm bar without a terminal: draws nothing (the caller logs the run)."""

  def update(self, n: int = 1) -> None:
    """Nothing to draw."""

  def set_postfix_str(self, s: str) -> None:
    """Nothing to draw."""

  def close(self) -> None:
    """Nothing to draw."""
