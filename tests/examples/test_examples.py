"""The example scripts run as written, and every snippet shown in README.md and docs/ is theirs.

Each script of examples/ runs with ``--quick`` as a user would run it (a subprocess from the
repository root, inheriting tests/conftest.py's XLA flags: 4 host CPU devices, low optimisation
level); examples/multiprocess.py runs as 2 processes x 2 devices under ``python -m
aptsjax.launch``. README.md cannot include files, so each of its python blocks names its source
section in a preceding ``<!-- example: examples/FILE.py:SECTION -->`` comment and must equal it;
docs pages include sections with pymdownx.snippets lines, which must name existing sections.
"""
import ast
import difflib
import os
import re
import subprocess
import sys
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import ROOT, example_section, launch, printed, show

# Every example script and the sections the README and the docs may include from it.
EXAMPLES = {
    "trust_region_full_batch.py": ["step"],
    "sapts_minibatch.py": ["trainer"],
    "options.py": ["options"],
    "shard_map.py": ["shard_map"],
    "pmap.py": ["pmap"],
    "flax_nnx.py": ["nnx"],
    "flax_linen.py": ["linen"],
    "multiprocess.py": ["multiprocess"],
    "checkpoint_resume.py": ["checkpoint"],
    "model_parallel.py": ["mesh"],
}
SHARED = ("circle.py", "cpu_devices.py")  # modules the scripts import, not scripts themselves
TIMEOUT = 180.0  # seconds per example run; --quick runs take 3-15 s each on 2 CPU cores
README_MARKER = re.compile(r"<!-- example: (examples/[\w/]+\.py):(\w+) -->")
DOCS_INCLUDE = re.compile(r'--8<--\s+"(examples/[^"]+?):(\w+)"')


def test_every_example_is_listed():
  found = sorted(p.name for p in (ROOT / "examples").glob("*.py") if p.name not in SHARED)
  assert found == sorted(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_docstring_and_sections(name):
  path = ROOT / "examples" / name
  doc = ast.get_docstring(ast.parse(path.read_text())) or ""
  assert f"python examples/{name}" in doc, f"{name}: the docstring must give the command to run it"
  for section in EXAMPLES[name]:
    assert example_section(path, section).strip(), f"{name}: section {section} is empty"


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
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                        env=example_env())


def selected_examples(items: list[pytest.Item]) -> set[str]:
  """The examples whose run tests this session will run (all of them unless deselected)."""
  names = set()
  for item in items:
    if getattr(item, "originalname", "") == "test_example_runs":
      names.add(item.callspec.params["name"])
    elif getattr(item, "originalname", "") == "test_multiprocess_example_runs":
      names.add("multiprocess.py")
  return names


@pytest.fixture(scope="module")
def quick_runs(request: pytest.FixtureRequest) -> dict[str, Future]:
  """The selected examples' --quick runs, two at a time (compilation is mostly single-threaded)."""
  wanted = selected_examples(request.session.items)
  # The slowest first, so that the two workers finish at about the same time.
  order = sorted(wanted, key=lambda name: (name not in ("multiprocess.py", "pmap.py"), name))
  with ThreadPoolExecutor(max_workers=2) as pool:
    yield {name: pool.submit(run_quick, name) for name in order}


@pytest.mark.parametrize("name", sorted(set(EXAMPLES) - {"multiprocess.py"}))
def test_example_runs(quick_runs, name):
  result = quick_runs[name].result()
  assert result.returncode == 0, (f"examples/{name} --quick exited with {result.returncode}:\n"
                                  f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
  assert result.stdout.strip(), f"examples/{name} printed nothing"
  assert_no_library_warning(name, result.stdout + result.stderr)


def assert_no_library_warning(name: str, output: str) -> None:
  """An example as written triggers none of aptsjax's own warnings (dropped rows, skipped steps)."""
  warned = [line for line in output.splitlines() if "Warning:" in line and "aptsjax" in line]
  assert not warned, f"examples/{name} triggers aptsjax warnings:\n" + "\n".join(warned)


def test_multiprocess_example_runs(quick_runs):
  result = quick_runs["multiprocess.py"].result()
  assert result.returncode == 0, show(result)
  assert printed(result.stdout, 0, "SAPTS N=4 on 2 process"), show(result)
  assert "[process 1] SAPTS" not in result.stdout, "only process 0 should print the results"
  assert_no_library_warning("multiprocess.py", result.stdout + result.stderr)


def readme_blocks() -> list[tuple[int, str, str]]:
  """``(line number, marker line, code)`` of every python block of README.md."""
  lines = (ROOT / "README.md").read_text().splitlines()
  blocks = []
  for i, line in enumerate(lines):
    if line.strip() == "```python":
      end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
      marker = lines[i - 1].strip() if i else ""
      blocks.append((i + 1, marker, "\n".join(lines[i + 1:end]) + "\n"))
  return blocks


def differences(shown: str, source: str, label: str) -> str:
  return "".join(difflib.unified_diff(source.splitlines(True), shown.splitlines(True),
                                      f"{label} (example)", f"{label} (README.md)"))


def test_readme_python_blocks_are_example_sections():
  blocks = readme_blocks()
  assert blocks, "README.md has no python blocks"
  for line, marker, code in blocks:
    match = README_MARKER.fullmatch(marker)
    assert match, (f"README.md line {line}: a python block must follow a line "
                   f"'<!-- example: examples/FILE.py:SECTION -->', found {marker!r}")
    path, section = match.groups()
    source = example_section(ROOT / path, section)
    assert code == source, (f"README.md line {line} differs from {path}:{section}; copy the "
                            f"section into the README:\n"
                            + differences(code, source, f"{path}:{section}"))


def test_docs_includes_name_existing_sections():
  for page in sorted((ROOT / "docs").rglob("*.md")):
    for path, section in DOCS_INCLUDE.findall(page.read_text()):
      assert (ROOT / path).is_file(), f"{page.relative_to(ROOT)} includes missing {path}"
      example_section(ROOT / path, section)   # raises naming the file and the section
