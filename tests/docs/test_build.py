"""The documentation site builds cleanly: ``mkdocs build --strict`` from the repository root (the
pages include code from ``examples/`` by paths relative to it). Strict mode turns every warning
into a failure: a missing snippet file or section, a broken link or anchor, a docstring griffe
cannot match to its signature. The build runs beside the in-process tests (tests/background.py).
"""
import os
import sys

import pytest

from tests import background
from tests.helpers import ROOT

pytestmark = [pytest.mark.docs, pytest.mark.slow]


@background.job("mkdocs build --strict", "tests/docs/test_build.py::")
def build():
  site = background.scratch("site")
  env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
  result = background.run(
      [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
      cwd=ROOT, timeout=300, env=env)
  return site, result


def test_mkdocs_build_strict():
  site, result = background.result("mkdocs build --strict")
  assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
  assert (site / "index.html").is_file()
  assert (site / "method" / "index.html").is_file()
