"""The package as a whole (aptsjax/__init__.py): the layers import only downwards, the public
names resolve, the module names of earlier releases still work, and ``import aptsjax`` loads
neither the HLO readers nor Flax."""
import ast
import importlib
import subprocess
import sys

import pytest

import aptsjax
from tests.helpers import ROOT

# Each subpackage (or top-level module) and the aptsjax layers it may import from.
LAYERS = {
    "numerics": {"numerics"},
    "data": {"numerics", "data"},
    "optim": {"numerics", "data", "optim"},
    "parallel": {"numerics", "data", "optim", "parallel"},
    "flax": {"numerics", "data", "optim", "parallel", "flax"},
    "tools": {"tools"},
}


def imported_layers(path) -> set[str]:
  """The aptsjax layers (first name after ``aptsjax.``) that a source file imports."""
  layers = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "aptsjax":
      parts = node.module.split(".")
      layers |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
    elif isinstance(node, ast.Import):
      layers |= {a.name.split(".")[1] for a in node.names
                 if a.name.startswith("aptsjax.") and a.name.count(".")}
  return layers


def test_every_import_points_down_a_layer():
  package = ROOT / "aptsjax"
  offenders = []
  for path in sorted(package.rglob("*.py")):
    relative = path.relative_to(package)
    if relative.parts == ("__init__.py",):
      continue   # the curated top level gathers every layer
    layer = relative.parts[0].removesuffix(".py")
    assert layer in LAYERS, f"{relative}: a module outside the known layers {sorted(LAYERS)}"
    upward = imported_layers(path) - LAYERS[layer]
    if upward:
      offenders.append(f"aptsjax/{relative} imports {sorted(upward)}")
  assert not offenders, "imports up a layer:\n" + "\n".join(offenders)


def test_public_names_resolve():
  for name in aptsjax.__all__:
    assert getattr(aptsjax, name) is not None, name
  assert aptsjax.trust_region is aptsjax.optim.trust_region.trust_region
  assert aptsjax.apts_trainer is aptsjax.parallel.trainer.apts_trainer


@pytest.mark.parametrize("old, new", [
    ("lsr1", "aptsjax.numerics.lsr1"), ("obs", "aptsjax.numerics.obs"),
    ("compact", "aptsjax.numerics.compact"), ("scaling", "aptsjax.numerics.scaling"),
    ("blocks", "aptsjax.optim.blocks"), ("local", "aptsjax.optim.local"),
    ("hyperparams", "aptsjax.optim.config"), ("mesh", "aptsjax.parallel.mesh"),
    ("sharding", "aptsjax.parallel.sharding"), ("distributed", "aptsjax.parallel.distributed"),
    ("checkpoint", "aptsjax.parallel.checkpoint"), ("launch", "aptsjax.parallel.launch"),
    ("flax_utils", "aptsjax.flax"), ("comm", "aptsjax.tools.comm")])
def test_module_names_of_earlier_releases(old, new):
  assert getattr(aptsjax, old) is importlib.import_module(new)


def test_import_loads_neither_the_hlo_readers_nor_flax():
  code = ("import sys, aptsjax; print(sorted(m for m in sys.modules if m.split('.')[0] == 'flax'"
          " or m.startswith(('aptsjax.tools', 'aptsjax.flax'))))")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=True)
  assert result.stdout.strip() == "[]", result.stdout
