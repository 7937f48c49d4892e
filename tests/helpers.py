"""Shared helpers of the benchmark smoke tests and the multi-process tests."""
import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def read_csv(path: Path) -> list[dict[str, str]]:
  """Rows of a CSV written by a benchmark (must exist and be non-empty)."""
  assert path.is_file(), path
  with path.open() as f:
    rows = list(csv.DictReader(f))
  assert rows, path
  return rows


def launch(*command: str, timeout: float = 240.0) -> subprocess.CompletedProcess:
  """Runs ``command`` as 2 processes x 2 host CPU devices with ``python -m aptsjax.launch``.

  The processes inherit this environment (tests/conftest.py's XLA flags; the launcher replaces
  the device count) and run from the repository root; output is captured as text.
  """
  argv = [sys.executable, "-m", "aptsjax.launch", "--num-processes", "2",
          "--devices-per-process", "2", "--timeout", str(timeout), "--", *command]
  return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout + 30,
                        env=dict(os.environ))


def show(result: subprocess.CompletedProcess, lines: int = 40) -> str:
  """The tail of a launched run's output, without gloo's connection chatter."""
  kept = [l for l in result.stdout.splitlines() if "Gloo" not in l]
  return "\n".join(kept[-lines:]) + "\n" + result.stderr[-2000:]
