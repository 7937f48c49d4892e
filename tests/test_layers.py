"""Every import inside the package points down a layer (docs/architecture.md).

numerics < data < optim < parallel < flax; tools stands apart (it imports no other layer).
Read off the source with ``ast`` (imports inside functions included), so a new upward import
fails here before it can form a cycle.
"""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "aptsjax"
LAYERS = {"numerics": 0, "data": 1, "optim": 2, "parallel": 3, "flax": 4}


def layer_of(module: str) -> str:
  """``aptsjax.optim.apts`` -> ``optim``; the package's own ``__init__`` -> ``aptsjax``."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "aptsjax"


def module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(PACKAGE.parent).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def imported(tree: ast.AST) -> list[str]:
  """The aptsjax modules (or packages) a module's import statements name."""
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names if a.name.startswith("aptsjax")]
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aptsjax"):
      if node.module == "aptsjax":
        names += [f"aptsjax.{a.name}" for a in node.names]
      else:
        names.append(node.module)
  return names


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_point_down(path):
  source = module_name(path)
  src_layer = layer_of(source)
  for target in imported(ast.parse(path.read_text())):
    dst_layer = layer_of(target)
    if src_layer == "tools" or dst_layer == "tools":
      assert src_layer == dst_layer == "tools", f"{source} imports {target}: tools stand apart"
      continue
    assert src_layer in LAYERS and dst_layer in LAYERS, (source, target)
    assert LAYERS[dst_layer] <= LAYERS[src_layer], (
        f"{source} (layer {src_layer}) imports {target} (layer {dst_layer}), a layer above it")


def test_every_layer_has_modules():
  found = {layer_of(module_name(p)) for p in MODULES}
  assert found == set(LAYERS) | {"tools"}, found
