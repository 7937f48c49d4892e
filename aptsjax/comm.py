"""Communication accounting read off compiled XLA programs.

``allreduce_stats(compiled)`` lists every all-reduce of a compiled (or lowered-and-compiled)
function with the number of elements it reduces, whether it sits inside a while loop, and how
many times it runs per call: loops with a trip count XLA knows (``fori_loop``, such as the global
phase of APTS) multiply it, a loop whose trip count depends on the data (the APTS local
iterations) makes it unknown. This is how the tests check that the APTS local iterations
communicate nothing, and how the communication benchmark counts all-reduced floats per
iteration.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_CALLEE = re.compile(r"(?:body|condition|to_apply|calls|true_computation|false_computation)="
                     r"%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_WHILE_BODY = re.compile(r"\bwhile\(.*?body=%?([\w.\-]+)")
_WHILE_CONDITION = re.compile(r"\bwhile\(.*?condition=%?([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_ALLREDUCE = re.compile(r"=\s*(.*?)\s+all-reduce(?:-start)?\(")
_SHAPE = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")


class AllReduce(NamedTuple):
  """One all-reduce instruction.

  Attributes:
    computation: the HLO computation that holds it.
    elements: the number of elements it reduces.
    dtypes: their dtype(s).
    in_loop: whether it is reachable from the body or condition of a while loop.
    trips: how many times it runs per call of the program: 1 outside loops, the product of the
      known trip counts of the loops around it, None inside a loop whose trip count XLA does not
      know (a data-dependent ``while_loop``). Both branches of a conditional count (an upper
      bound).
  """
  computation: str
  elements: int
  dtypes: tuple[str, ...]
  in_loop: bool
  trips: int | None


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


def _call_sites(lines: list[str]) -> list[tuple[str, int | None]]:
  """The computations called from ``lines`` with how often each runs per run of ``lines``."""
  out: list[tuple[str, int | None]] = []
  for line in lines:
    bodies = _WHILE_BODY.findall(line)
    if " while(" in line and bodies:
      trip = _TRIP_COUNT.search(line)
      n = int(trip.group(1)) if trip else None
      out.append((bodies[0], n))
      out += [(c, None if n is None else n + 1) for c in _WHILE_CONDITION.findall(line)]
      continue
    out += [(c, 1) for c in _callees([line])]
  return out


def _executions(comps: dict[str, list[str]], entry: str | None) -> dict[str, int | None]:
  """Runs of each computation per call of ``entry`` (None: inside a loop of unknown length)."""
  parents: dict[str, list[tuple[str, int | None]]] = {}
  for name, lines in comps.items():
    for child, factor in _call_sites(lines):
      parents.setdefault(child, []).append((name, factor))
  memo: dict[str, int | None] = {}

  def runs(name: str) -> int | None:
    if name not in memo:
      memo[name] = 0   # a cycle cannot occur in HLO; this only guards the recursion
      if name == entry or name not in parents:
        total: int | None = 1
      else:
        total = 0
        for parent, factor in parents[name]:
          count = runs(parent)
          total = None if total is None or count is None or factor is None else total + count * factor
      memo[name] = total
    return memo[name]

  return {name: runs(name) for name in comps}


def allreduce_stats(compiled: Any) -> list[AllReduce]:
  """Returns every all-reduce of a compiled program.

  Args:
    compiled: a ``jax.stages.Compiled`` (``jax.jit(f).lower(...).compile()``) or its HLO text.

  Returns:
    A list of ``AllReduce`` records; ``in_loop`` is True for an all-reduce reachable from the
    body or condition of any while loop, ``trips`` counts its runs per call.
  """
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  comps, entry = _parse(text)
  executions = _executions(comps, entry)
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
        records.append(AllReduce(name, elements, dtypes, name in looped, executions[name]))
  return records

