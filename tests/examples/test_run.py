"""The example scripts run as written.

Each script of examples/ runs with ``--quick`` as a user would run it (a subprocess from the
repository root, inheriting tests/conftest.py's XLA flags: 4 host CPU devices, low optimisation
level); examples/multiprocess.py runs as 2 processes x 2 devices under ``python -m
aptsjax.parallel.launch``. The runs are started beside the in-process tests (tests/background.py).
"""
import os
import subprocess
import sys

import pytest

from tests import background
from tests.examples import EXAMPLES
from tests.helpers import ROOT, launch, printed, show

pytestmark = [pytest.mark.examples, pytest.mark.slow]

TIMEOUT = 180.0  # seconds per example run; --quick runs take 3-15 s each on 2 CPU cores


def example_env() -> dict[str, str]:
  """This environment (conftest's XLA flags), with this checkout first on the import path.

  A script's own directory, not the working directory, starts ``sys.path``, so without this
  the examples would import whichever aptsjax is installed rather than the one under test.
  """
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  return env


def run_quick(name: str) -> subprocess.CompletedProcess:
  """Runs ``examples/<name> --quick`` as a user would (multiprocess.py: 2 processes x 2 devices)."""
  command = [sys.executable, f"examples/{name}", "--quick"]
  if name == "multiprocess.py":
    return launch(*command, timeout=TIMEOUT, env=example_env())
  return background.run(command, cwd=ROOT, timeout=TIMEOUT, env=example_env())


HERE = "tests/examples/test_run.py::"
for _name in EXAMPLES:   # one background job per script, read by its test
  background.job(f"examples/{_name} --quick",
                 HERE + ("test_multiprocess_example_runs" if _name == "multiprocess.py" else
                         f"test_example_runs[{_name}]"))(lambda name=_name: run_quick(name))


@pytest.mark.parametrize("name", sorted(set(EXAMPLES) - {"multiprocess.py"}))
def test_example_runs(name):
  result = background.result(f"examples/{name} --quick")
  assert result.returncode == 0, (f"examples/{name} --quick exited with {result.returncode}:\n"
                                  f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
  assert result.stdout.strip(), f"examples/{name} printed nothing"
  assert_no_library_warning(name, result.stdout + result.stderr)


def assert_no_library_warning(name: str, output: str) -> None:
  """An example as written triggers none of aptsjax's own warnings (dropped rows, skipped steps)."""
  warned = [line for line in output.splitlines() if "Warning:" in line and "aptsjax" in line]
  assert not warned, f"examples/{name} triggers aptsjax warnings:\n" + "\n".join(warned)


@pytest.mark.multiprocess
def test_multiprocess_example_runs():
  result = background.result("examples/multiprocess.py --quick")
  assert result.returncode == 0, show(result)
  assert printed(result.stdout, 0, "SAPTS N=4 on 2 process"), show(result)
  assert "[process 1] SAPTS" not in result.stdout, "only process 0 should print the results"
  assert_no_library_warning("multiprocess.py", result.stdout + result.stderr)
