"""One colour and marker per method in every figure, and whole epochs on every epoch axis
(benchmarks.common.style): drawn figures of the paper and options benchmarks from fabricated
rows (tests/benchmarks/rows.py), no training."""
import itertools

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import matplotlib  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from benchmarks.common.style import method_style  # noqa: E402
from benchmarks.options import ablation, report  # noqa: E402
from benchmarks.paper import methods as pm  # noqa: E402
from benchmarks.paper import paper  # noqa: E402
from tests.benchmarks.rows import fabricate  # noqa: E402

matplotlib.use("Agg")


@pytest.fixture
def figures(monkeypatch):
  """The figures the benchmarks draw, kept open instead of closed."""
  kept = []
  monkeypatch.setattr(plt, "close", kept.append)
  return kept


def options_rows(rows: list[dict], setting: str) -> list[dict]:
  """The options study's rows: ``setting`` with the "paper" variant, and Adam and SGD."""
  return [{**r, "setting": r["method"] if r["kind"] in ("adam", "sgd") else setting,
           "variant": "lr 0.01" if r["kind"] in ("adam", "sgd") else "paper",
           "val_acc": r["test_acc"], "radius_mean": 0.1,
           "allreduce_bytes": 4 * r["allreduce_floats"]}
          for r in rows if r["method"] in (setting, "Adam", "SGD")]


def styles(fig) -> dict[str, tuple[str, str]]:
  """label -> (colour, marker) of every labelled line of a figure; one style per label."""
  out: dict[str, tuple[str, str]] = {}
  for ax in fig.axes:
    for line in ax.get_lines():
      if not line.get_label().startswith("_"):
        style = (to_hex(line.get_color()), line.get_marker())
        assert out.setdefault(line.get_label(), style) == style, line.get_label()
  return out


def test_every_method_has_its_own_style_independent_of_the_others():
  names = [m.name for m in pm.all_methods() + pm.extra_methods()] + ["TR o1"]
  pairs = {n: (method_style(n)["color"], method_style(n)["marker"]) for n in names}
  assert len(set(pairs.values())) == len(names)
  for order in (paper.QUICK_METHODS, sorted(names), names[::-1]):  # any subset, any order
    assert {n: (method_style(n)["color"], method_style(n)["marker"]) for n in order} == {
        n: pairs[n] for n in order}
  for o in ("o1", "o2"):  # a panel of the paper's figures: distinct colours
    panel = [n for n in names if n.endswith(o) and " x " not in n] + ["Adam", "SGD"]
    assert len({method_style(n)["color"] for n in panel}) == len(panel)
  variants = list(ablation.DEFAULT_VARIANTS) + list(ablation.QUICK_VARIANTS)
  assert len({method_style(v)["color"] for v in set(variants)}) == len(set(variants))


def test_same_method_same_style_in_both_paper_figures_and_the_options_figure(tmp_path, figures):
  rows = fabricate()
  assert paper.plot(rows, "full", tmp_path / "full.png", "full")
  assert paper.plot(rows, "minibatch", tmp_path / "mini.png", "minibatch")
  report.plot(options_rows(rows, "SAPTS N=2 o1"), tmp_path)
  full, mini, val_acc = (styles(f) for f in figures[:3])
  assert set(full) == {"APTS N=2 o1", "TR o2", "Adam", "SGD"}
  assert set(mini) == {"SAPTS N=2 o1", "SAPTS N=2 o2", "Adam", "SGD"}
  for name in ("Adam", "SGD"):
    assert full[name] == mini[name] == val_acc[f"{name} lr 0.01"]
  assert len(set(full.values())) == 4 and len(set(mini.values())) == 4
  for label, style in itertools.chain(full.items(), mini.items()):
    assert style == (method_style(label)["color"], method_style(label)["marker"])


def test_epoch_axes_have_whole_epoch_ticks(tmp_path, figures):
  rows = fabricate()
  paper.plot(rows, "full", tmp_path / "full.png", "full")
  report.plot(options_rows(rows, "APTS N=2 o1"), tmp_path)
  assert len(figures) == 3
  for fig in figures:
    fig.canvas.draw()
    for ax in fig.axes:
      if ax.get_visible() and ax.get_xlabel() == "epoch":
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and np.allclose(ticks, np.round(ticks)), ticks
