"""Every example script is listed and documented, and every snippet shown in README.md and docs/
is a section of one.

README.md cannot include files, so each of its python blocks names its source section in a
preceding ``<!-- example: examples/FILE.py:SECTION -->`` comment and must equal it; docs pages
include sections with pymdownx.snippets lines, which must name existing sections. The scripts'
runs: tests/examples/test_run.py.
"""
import ast
import difflib
import re

import pytest

from tests.examples import EXAMPLES
from tests.examples import SHARED
from tests.helpers import ROOT, example_section

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
