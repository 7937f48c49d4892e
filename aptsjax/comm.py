"""Communication accounting read off compiled XLA programs.

``allreduce_stats(compiled)`` lists every all-reduce of a compiled (or lowered-and-compiled)
function with the number of elements it reduces, and whether it sits inside a while loop. This is
how the tests check that the APTS local iterations communicate nothing, and how the
communication benchmark counts all-reduced floats per iteration.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_CALLEE = re.compile(r"(?:body|condition|to_apply|calls|true_computation|false_computation)="
                     r"%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_WHILE_BODY = re.compile(r"\bwhile\(.*?body=%?([\w.\-]+)")
_ALLREDUCE = re.compile(r"=\s*(.*?)\s+all-reduce(?:-start)?\(")
_SHAPE = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")


class AllReduce(NamedTuple):
  """One all-reduce instruction: its computation, element count, dtype(s) and loop status."""
  computation: str
  elements: int
  dtypes: tuple[str, ...]
  in_loop: bool


def _elements(shape_text: str) -> tuple[int, tuple[str, ...]]:
  total, dtypes = 0, []
  for dtype, dims in _SHAPE.findall(shape_text):
    size = 1
    for d in dims.split(","):
      if d:
        size *= int(d)
    total += size
    dtypes.append(dtype)
  return total, tuple(dtypes)


def _parse(text: str) -> tuple[dict[str, list[str]], str | None]:
  comps: dict[str, list[str]] = {}
  entry, current = None, None
  for line in text.splitlines():
    match = _COMPUTATION.match(line.strip())
    if match and line.rstrip().endswith("{"):
      current = match.group(1)
      comps[current] = []
      if line.lstrip().startswith("ENTRY"):
        entry = current
    elif line.strip() == "}":
      current = None
    elif current is not None:
      comps[current].append(line)
  return comps, entry


def _callees(lines: list[str]) -> set[str]:
  out = set()
  for line in lines:
    out.update(_CALLEE.findall(line))
    for group in _BRANCHES.findall(line):
      out.update(name.strip().lstrip("%") for name in group.split(",") if name.strip())
  return out


def allreduce_stats(compiled: Any) -> list[AllReduce]:
  """Returns every all-reduce of a compiled program.

  Args:
    compiled: a ``jax.stages.Compiled`` (``jax.jit(f).lower(...).compile()``) or its HLO text.

  Returns:
    A list of ``AllReduce`` records; ``in_loop`` is True for an all-reduce reachable from the
    body or condition of any while loop.
  """
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  comps, _ = _parse(text)
  graph = {name: _callees(lines) for name, lines in comps.items()}
  looped: set[str] = set()
  stack = [b for lines in comps.values() for line in lines for b in _WHILE_BODY.findall(line)]
  stack += [c for lines in comps.values() for line in lines if " while(" in line
            for c in re.findall(r"condition=%?([\w.\-]+)", line)]
  while stack:
    name = stack.pop()
    if name in looped or name not in graph:
      continue
    looped.add(name)
    stack.extend(graph[name])
  records = []
  for name, lines in comps.items():
    for line in lines:
      match = _ALLREDUCE.search(line)
      if match:
        elements, dtypes = _elements(match.group(1))
        records.append(AllReduce(name, elements, dtypes, name in looped))
  return records

