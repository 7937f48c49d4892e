"""The documentation covers every public module, its references to docs/method.md sections
exist, and the repository is self-contained (no reference to documents outside it).

The site build (``mkdocs build --strict``): tests/docs/test_build.py.
"""
import pkgutil
import re
import subprocess
from pathlib import Path

import aptsjax

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

# Documents that live outside the repository must never be referred to. The pattern is built from
# pieces so that this file does not match it itself.
OUTSIDE = re.compile("|".join(re.escape(a + b) for a, b in [
    ("METHOD", ".md"), ("API", ".md"), ("ISSUE", "-NOTES"), ("STYLE", ".md"),
    ("design", " notes"), ("/work", "/shared"), ("../", "shared"), ("farm", "-bench"),
    ("farm", "-studio")]))
# A reference to a section of the method page, e.g.  docs/method.md, "Overlap layout".
METHOD_SECTION = re.compile(r'docs/method\.md, "([^"]+)"')


def _repository_files() -> list[Path]:
  """Tracked files in a git checkout, else every file outside .git and virtual environments."""
  try:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    names = [n for n in listed.stdout.decode().split("\0") if n]
    if names:
      return [ROOT / n for n in names if (ROOT / n).is_file()]
  except (OSError, subprocess.CalledProcessError):
    pass
  skip = {".git", ".venv", ".ci-venv", "site", "results", "__pycache__", ".pytest_cache",
          ".hypothesis"}
  return [p for p in ROOT.rglob("*")
          if p.is_file() and not skip.intersection(p.relative_to(ROOT).parts)]


def _text_files() -> dict[str, str]:
  texts = {}
  for path in _repository_files():
    try:
      texts[str(path.relative_to(ROOT))] = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
      continue  # images and other binary files
  return texts


def test_no_reference_to_documents_outside_the_repository():
  hits = [f"{name}:{line_no}: {line.strip()}"
          for name, text in _text_files().items()
          for line_no, line in enumerate(text.splitlines(), start=1) if OUTSIDE.search(line)]
  assert not hits, "references to documents outside the repository:\n" + "\n".join(hits)


def test_method_section_references_exist():
  headings = {m.group(1).strip() for m in
              re.finditer(r"^#{1,6}\s+(.+?)\s*$", (DOCS / "method.md").read_text(), re.M)}
  missing = [f"{name}: {ref}" for name, text in _text_files().items()
             for ref in METHOD_SECTION.findall(text) if ref not in headings]
  assert not missing, ("references to sections that docs/method.md lacks:\n" + "\n".join(missing)
                       + f"\nheadings: {sorted(headings)}")


def public_modules() -> list[str]:
  """Every module (not package) of aptsjax whose dotted name has no part starting with "_"."""
  names = [m.name for m in pkgutil.walk_packages(aptsjax.__path__, "aptsjax.") if not m.ispkg]
  return sorted(n for n in names if not any(part.startswith("_") for part in n.split(".")))


def test_every_public_module_has_an_api_page():
  """Each public module (subpackages walked: aptsjax.optim.trust_region, ...; a subpackage's
  ``__init__`` needs no page of its own) has an entry ``::: aptsjax.X.Y`` on a docs page, and that
  page is in the mkdocs.yml nav."""
  modules = public_modules()
  assert "aptsjax.optim.trust_region" in modules and "aptsjax.optim.apts" in modules
  pages = {p: p.read_text() for p in DOCS.rglob("*.md")}
  entries = {m: p for p, text in pages.items()
             for m in re.findall(r"^:::\s*(aptsjax(?:\.\w+)*)\s*$", text, re.M)}
  missing = [m for m in modules if m not in entries]
  assert not missing, f"public modules without an API reference entry (::: aptsjax.X): {missing}"
  nav = (ROOT / "mkdocs.yml").read_text()
  unlisted = sorted({str(entries[m].relative_to(DOCS)) for m in modules
                     if str(entries[m].relative_to(DOCS)) not in nav})
  assert not unlisted, f"API pages missing from the mkdocs.yml nav: {unlisted}"
