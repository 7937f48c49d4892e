"""Runs a benchmark's ``main`` for the smoke tests, in its own process, and records what it did.

    python -m tests.benchmarks.quick MODULE OUT [ARG ...]

calls ``benchmarks.MODULE.main([ARG ..., "--out", OUT])`` and writes ``OUT/quick.json``: the value
``main`` returned (rows as JSON objects), the number of devices, and, for the benchmarks with an
overall progress bar (``benchmarks.common.progress``), the work it planned and the work it reported
done. The smoke tests
start these runs beside the in-process tests (tests/background.py) and read the files.
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any


def jsonable(value: Any) -> Any:
  """numpy scalars and arrays as Python numbers and lists; anything else as its repr."""
  if hasattr(value, "tolist"):
    return value.tolist()
  return repr(value)


def main(argv: list[str]) -> int:
  name, out, *args = argv
  module = importlib.import_module(f"benchmarks.{name}")
  plan, done = [], []
  progress = sys.modules.get("benchmarks.common.progress")
  if progress is not None:   # record the overall bar's plan and the work it was told is done
    init, advance = progress.Progress.__init__, progress.Progress.advance
    progress.Progress.__init__ = lambda self, total, *a, **k: (plan.append(total),
                                                                init(self, total, *a, **k))[1]
    progress.Progress.advance = lambda self, w: (done.append(w), advance(self, w))[1]
  returned = module.main([*args, "--out", out])
  Path(out).mkdir(parents=True, exist_ok=True)
  record = {"returned": returned, "plan": plan, "done": sum(done),
            "devices": importlib.import_module("jax").device_count()}
  (Path(out) / "quick.json").write_text(json.dumps(record, default=jsonable))
  return 0


if __name__ == "__main__":   # run from the repository root: python -m puts it first on the path
  sys.exit(main(sys.argv[1:]))
