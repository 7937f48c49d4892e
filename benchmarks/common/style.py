"""One colour, marker and line style per method, the same in every figure of every benchmark.

``method_style(name)`` depends on the name only, never on which other methods a figure shows or
in which order it draws them. The colour says the family, the order and N: APTS (full batch)
first order blues and second order purples, SAPTS (minibatches) first order oranges and second
order greens, darker for fewer subdomains; TR brown (o1) and red (o2); Adam black, SGD grey,
both dashed. The marker says the order (o1 circles, o2 squares), the parameter blocks
("x layers" diamonds, "x layers/size" plus signs and crosses) and Adam (triangle up) and SGD
(triangle down), with full-batch Adam and SGD pointing left and right. The options study's
variants ("paper", "boundary+mean", ...) have a colour and marker each; any other name gets a
colour and marker from a hash of the name.
"""
from __future__ import annotations

import re
import zlib
from typing import Any

SHADES = {  # (family, order) -> colours by N = 1, 2, 4, 6, 8 (ColorBrewer, dark to light)
    ("APTS", "o1"): ("#08306b", "#08519c", "#3182bd", "#6baed6", "#9ecae1"),
    ("APTS", "o2"): ("#3f007d", "#54278f", "#756bb1", "#9e9ac8", "#bcbddc"),
    ("SAPTS", "o1"): ("#7f2704", "#a63603", "#e6550d", "#fd8d3c", "#fdae6b"),
    ("SAPTS", "o2"): ("#00441b", "#006d2c", "#31a354", "#74c476", "#a1d99b"),
}
SHADE_OF_N = {1: 0, 2: 1, 4: 2, 6: 3, 8: 4}
SINGLE = {  # family (and order) -> (colour, marker)
    "TR o1": ("#8c564b", "o"), "TR o2": ("#d62728", "s"),
    "Adam": ("#000000", "^"), "SGD": ("#7f7f7f", "v"),
    "Adam full": ("#000000", "<"), "SGD full": ("#7f7f7f", ">"),
}
MARKERS = {  # (parameter blocks, order) -> marker
    ("", "o1"): "o", ("", "o2"): "s", ("layers", "o1"): "D", ("layers", "o2"): "d",
    ("layers/size", "o1"): "P", ("layers/size", "o2"): "X",
}
OTHER_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                  "#bcbd22", "#17becf", "#393b79", "#637939")
OTHER_MARKERS = "os^vD<>phH*"
VARIANTS = ("paper", "boundary", "split", "rms", "adam-local", "mean", "mean+adam-local",
            "mean+adam-local+rms", "boundary+mean+adam-local",
            "boundary+split+rms+mean+adam-local", "adam-region")  # benchmarks.options' variants
NAME = re.compile(r"(?P<family>S?APTS) N=(?P<n>\d+)(?: x (?P<blocks>\S+))? (?P<order>o[12])")


def method_style(name: str) -> dict[str, Any]:
  """The colour, marker and line style of a method, from its name alone.

  Args:
    name: a method as the paper benchmark names it ("APTS N=2 o1", "SAPTS N=4 x layers o1",
      "TR o2", "Adam", "SGD full", ...); any other name gets a style hashed from it.

  Returns:
    ``dict(color=..., marker=..., linestyle=...)`` for ``Axes.plot``: dashed for Adam and SGD,
    solid otherwise.
  """
  if name in SINGLE:
    color, marker = SINGLE[name]
  elif name in VARIANTS:
    i = VARIANTS.index(name)
    color, marker = OTHER_COLOURS[i % len(OTHER_COLOURS)], OTHER_MARKERS[i % len(OTHER_MARKERS)]
  else:
    m = NAME.fullmatch(name)
    shades = m and SHADES[m["family"], m["order"]]
    key = m and (m["blocks"] or "", m["order"])
    if m and int(m["n"]) in SHADE_OF_N and key in MARKERS:
      color, marker = shades[SHADE_OF_N[int(m["n"])]], MARKERS[key]
    else:
      h = zlib.crc32(name.encode())
      color = OTHER_COLOURS[h % len(OTHER_COLOURS)]
      marker = OTHER_MARKERS[h // len(OTHER_COLOURS) % len(OTHER_MARKERS)]
  dashed = name.split(" ")[0] in ("Adam", "SGD")
  return {"color": color, "marker": marker, "linestyle": "--" if dashed else "-"}


def plot_method(ax: Any, x: Any, y: Any, name: str, **kwargs: Any) -> Any:
  """Draws one method's curve in its style, at most about 10 markers along it.

  Args:
    ax: a matplotlib Axes.
    x, y: the curve.
    name: the method (``method_style``); also the label unless ``label`` is given.
    **kwargs: more ``Axes.plot`` arguments; they override the style.

  Returns:
    What ``Axes.plot`` returns.
  """
  style = {"label": name, "ms": 5, "markevery": max(1, len(x) // 10), **method_style(name),
           **kwargs}
  return ax.plot(x, y, **style)


def epoch_axis(ax: Any, label: str = "epoch") -> None:
  """Labels an epoch axis and puts its ticks on whole epochs only."""
  from matplotlib.ticker import MaxNLocator  # pylint: disable=import-outside-toplevel
  ax.set_xlabel(label)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))

