"""Shared helpers of the benchmark smoke tests, the multi-process tests and the example tests:
subprocess runs (through tests/background.py), CSV rows, example sections, launched output."""
import csv
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, NamedTuple

from tests import background

ROOT = Path(__file__).resolve().parents[1]


def read_csv(path: Path) -> list[dict[str, str]]:
  """Rows of a CSV written by a benchmark (must exist and be non-empty)."""
  assert path.is_file(), path
  with path.open() as f:
    rows = list(csv.DictReader(f))
  assert rows, path
  return rows


def launch(*command: str, timeout: float = 240.0,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  """Runs ``command`` as 2 processes x 2 host CPU devices with ``python -m aptsjax.parallel.launch``.

  The processes inherit ``env`` (default: this environment, with tests/conftest.py's XLA flags;
  the launcher replaces the device count) and run from the repository root; output is captured
  as text.
  """
  argv = [sys.executable, "-m", "aptsjax.parallel.launch", "--num-processes", "2",
          "--devices-per-process", "2", "--timeout", str(timeout), "--", *command]
  return background.run(argv, cwd=ROOT, timeout=timeout + 30,
                        env=dict(os.environ if env is None else env))


class QuickRun(NamedTuple):
  """A benchmark run by ``quick_benchmark``: the process, its output folder and quick.json."""
  result: subprocess.CompletedProcess
  out: Path
  record: dict[str, Any]


def quick_benchmark(module: str, *args: str, timeout: float = 600.0) -> QuickRun:
  """Runs ``benchmarks.<module>.main([*args, "--out", OUT])`` in a subprocess from the repository
  root (tests/benchmarks/quick.py; this environment, so 4 host CPU devices) into a fresh OUT.

  Raises:
    AssertionError: the run failed (its output's tail in the message).
  """
  out = background.scratch(module)
  argv = [sys.executable, "-m", "tests.benchmarks.quick", module, str(out), *args]
  result = background.run(argv, cwd=ROOT, timeout=timeout, env=dict(os.environ))
  assert result.returncode == 0, f"benchmarks.{module} {' '.join(args)} failed:\n" + show(result)
  return QuickRun(result, out, json.loads((out / "quick.json").read_text()))


def quick_job(module: str, *args: str) -> str:
  """Registers ``quick_benchmark(module, *args)`` as a background job for the quick-mode tests
  of tests/benchmarks/test_<name>.py (``test_quick_mode...``), ``name`` the last component of
  ``module`` (``"paper.paper"``: test_paper.py); returns the job's name."""
  name = " ".join([f"benchmarks.{module}", *args])
  test = module.rsplit(".", 1)[-1]
  background.job(name, f"tests/benchmarks/test_{test}.py::test_quick_mode")(
      lambda: quick_benchmark(module, *args))
  return name


def show(result: subprocess.CompletedProcess, lines: int = 40) -> str:
  """The tail of a launched run's output, without gloo's connection chatter."""
  kept = [l for l in result.stdout.splitlines() if "Gloo" not in l]
  return "\n".join(kept[-lines:]) + "\n" + result.stderr[-2000:]


def example_section(path: Path, name: str) -> str:
  """The text of section ``name`` of an example script, as the docs and README show it.

  A section lies between the lines ``# --8<-- [start:name]`` and ``# --8<-- [end:name]``
  (pymdownx.snippets markers); the marker lines are left out and the text is dedented.

  Raises:
    ValueError: the file lacks the section, or has its markers more than once or out of order.
  """
  lines = Path(path).read_text().splitlines()
  marks = {kind: [i for i, line in enumerate(lines) if line.strip() == f"# --8<-- [{kind}:{name}]"]
           for kind in ("start", "end")}
  if len(marks["start"]) != 1 or len(marks["end"]) != 1 or marks["start"][0] > marks["end"][0]:
    raise ValueError(f"{path} needs one '# --8<-- [start:{name}]' line followed by one "
                     f"'# --8<-- [end:{name}]' line; found start at {marks['start']}, "
                     f"end at {marks['end']}")
  body = lines[marks["start"][0] + 1:marks["end"][0]]
  return textwrap.dedent("\n".join(body) + "\n")


def printed(output: str, process: int, message: str) -> bool:
  """Whether process ``process`` of a launched run printed a line containing ``message``.

  gloo's C++ logging shares each process's stdout and can land between the launcher's
  ``[process i]`` prefix and the message on the same line, so anything may stand between them.
  """
  return re.search(rf"^\[process {process}\] .*{re.escape(message)}", output, re.M) is not None
