"""The documentation site builds cleanly: ``mkdocs build --strict`` from the repository root (the
pages include code from ``examples/`` by paths relative to it). Strict mode turns every warning
into a failure: a missing snippet file or section, a broken link or anchor, a docstring griffe
cannot match to its signature.
"""
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = [pytest.mark.docs, pytest.mark.slow]


def test_mkdocs_build_strict(tmp_path):
  env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
  result = subprocess.run(
      [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
  assert (tmp_path / "site" / "index.html").is_file()
  assert (tmp_path / "site" / "method" / "index.html").is_file()
