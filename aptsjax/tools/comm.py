"""Communication accounting read off compiled XLA programs.

``allreduce_stats(compiled)`` lists every all-reduce of a compiled (or lowered-and-compiled)
function with the number of elements it reduces, whether it sits inside a while loop, and how
many times it runs per call: loops with a trip count XLA knows (``fori_loop``, such as the global
phase of APTS) multiply it, a loop whose trip count depends on the data (the APTS local
iterations) makes it unknown. This is how the tests check that the APTS local iterations
communicate nothing, and how the communication benchmark counts all-reduced floats per
iteration.

``collective_stats(compiled, mesh)`` does the same for every kind of collective (all-reduce,
all-gather, reduce-scatter, all-to-all, collective-permute, in their synchronous and ``-start``
forms) and tells which mesh axes each one spans, read from its device groups. On a data x model
mesh this separates what the data axis carries (APTS's all-reduces, between replicas) from what
the model axis carries (the model's own collectives and the optimizer's small inner products,
inside a replica).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from aptsjax.tools import replica_groups as _hlo_groups

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_CALLEE = re.compile(r"(?:body|condition|to_apply|calls|true_computation|false_computation)="
                     r"%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_WHILE_BODY = re.compile(r"\bwhile\(.*?body=%?([\w.\-]+)")
_WHILE_CONDITION = re.compile(r"\bwhile\(.*?condition=%?([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_ALLREDUCE = re.compile(r"=\s*(.*?)\s+all-reduce(?:-start)?\(")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"([a-z][a-z0-9]*)\[([\d,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_PARTITIONS = re.compile(r"num_partitions=(\d+)")


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


def _looped(comps: dict[str, list[str]]) -> set[str]:
  """The computations reachable from the body or condition of a while loop."""
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
  return looped


class _Site(NamedTuple):
  """An instruction matching a pattern, with where it sits and how often it runs."""
  computation: str
  line: str
  match: re.Match
  in_loop: bool
  trips: int | None


def _sites(text: str, pattern: re.Pattern) -> list[_Site]:
  """Every instruction of an HLO module matching ``pattern``, with its loop status and trips."""
  comps, entry = _parse(text)
  executions = _executions(comps, entry)
  looped = _looped(comps)
  return [_Site(name, line, match, name in looped, executions[name])
          for name, lines in comps.items() for line in lines
          for match in [pattern.search(line)] if match]


def _text(compiled: Any) -> str:
  return compiled if isinstance(compiled, str) else compiled.as_text()


def allreduce_stats(compiled: Any) -> list[AllReduce]:
  """Returns every all-reduce of a compiled program.

  Args:
    compiled: a ``jax.stages.Compiled`` (``jax.jit(f).lower(...).compile()``) or its HLO text.

  Returns:
    A list of ``AllReduce`` records; ``in_loop`` is True for an all-reduce reachable from the
    body or condition of any while loop, ``trips`` counts its runs per call.
  """
  return [AllReduce(site.computation, *_elements(site.match.group(1)), site.in_loop, site.trips)
          for site in _sites(_text(compiled), _ALLREDUCE)]


class Collective(NamedTuple):
  """One collective instruction.

  Attributes:
    kind: one of ``COLLECTIVES`` (an ``-start`` form counts as its synchronous kind).
    computation: the HLO computation that holds it.
    elements: the number of elements of its result on each device: the reduced array of an
      all-reduce, the gathered array of an all-gather, the scattered piece of a
      reduce-scatter, the received array of an all-to-all or collective-permute.
    dtypes: their dtype(s).
    shapes: the shape of each array of the result (several when XLA combined collectives).
    in_loop: whether it is reachable from the body or condition of a while loop.
    trips: runs per call of the program, as in ``AllReduce``.
    axes: the mesh axes its device groups span, in mesh order (``()``: each device alone, e.g.
      a collective-permute of self-pairs); None without a mesh.
    group_size: devices per group (the largest group); for a collective-permute, 2 when it
      moves data between devices, 1 when every pair is a self-pair.
    op_name: the JAX operation it comes from (HLO metadata; ``""`` if none).
    source: the user source locations (``file:line``, innermost first) JAX recorded for it.
  """
  kind: str
  computation: str
  elements: int
  dtypes: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  in_loop: bool
  trips: int | None
  axes: tuple[str, ...] | None
  group_size: int
  op_name: str
  source: tuple[str, ...]


def _result(kind: str, start: bool, shape_text: str
            ) -> tuple[int, tuple[str, ...], tuple[tuple[int, ...], ...]]:
  """Elements, dtypes and shapes of a collective's result (the output part of a ``-start``)."""
  arrays = _SHAPE.findall(shape_text)
  if start and kind == "all-gather":
    arrays = arrays[len(arrays) // 2:]    # (operands, outputs)
  elif start and kind == "collective-permute":
    arrays = arrays[1:2]                  # (operand, output, contexts...)
  elements, dtypes = _elements(" ".join(f"{d}[{s}]" for d, s in arrays))
  return elements, dtypes, tuple(tuple(int(d) for d in s.split(",") if d) for _, s in arrays)


def collective_stats(compiled: Any, mesh: Any = None) -> list[Collective]:
  """Returns every collective of a compiled program with the mesh axes it spans.

  The device ids in the groups of a collective are logical ids: id i is the i-th device of the
  program's device assignment, which for a program jitted on a mesh (``NamedSharding``,
  ``jax.shard_map``) is ``mesh.devices.flat[i]``. So a group's ids map to mesh coordinates by
  their flat position, and the axes along which those coordinates differ are the axes the
  collective spans: on a (data, model) mesh a ``psum`` over "data" spans ("data",), the
  all-reduce after a row-sharded matmul ("model",).

  Args:
    compiled: a ``jax.stages.Compiled`` or its HLO text.
    mesh: the ``jax.sharding.Mesh`` the program was compiled for; None leaves ``axes`` None.

  Returns:
    A list of ``Collective`` records, in the order of the HLO text.

  Raises:
    ValueError: device groups in an unknown form, or ids outside ``mesh``.
  """
  text = _text(compiled)
  partitions = _PARTITIONS.search(text)
  count = int(partitions.group(1)) if partitions else (mesh.size if mesh is not None else None)
  frames = _hlo_groups.stack_frames(text)
  out = []
  for site in _sites(text, _COLLECTIVE):
    kind, start = site.match.group(2), bool(site.match.group(3))
    groups = _hlo_groups.replica_groups(site.line[site.match.end():], count)
    if groups is None:
      groups = [list(range(count))] if count else []
    if kind == "collective-permute":
      size = 2 if any(len(set(g)) > 1 for g in groups) else 1
    else:
      size = max((len(g) for g in groups), default=1)
    axes = (None if mesh is None else
            _hlo_groups.spanned_axes(groups, tuple(mesh.devices.shape), tuple(mesh.axis_names)))
    op_name = _OP_NAME.search(site.line)
    frame = _FRAME.search(site.line)
    out.append(Collective(kind, site.computation, *_result(kind, start, site.match.group(1)),
                          site.in_loop, site.trips, axes, size,
                          op_name.group(1) if op_name else "",
                          tuple(frames.get(int(frame.group(1)), ())) if frame else ()))
  return out
