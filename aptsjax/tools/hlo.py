"""The HLO text of a compiled XLA program, read: computations, calls, loops and instructions.

``compiled.as_text()`` prints a module as computations (``%name (params) -> type {`` ... ``}``,
one ``ENTRY``), each a list of instructions ``%x = shape opcode(operands), attributes``. This
module is the one reader of that text the other tools build on:

* ``parse_computations`` splits a module into its computations (lines) and names the entry;
* ``callees`` / ``call_sites`` read the call graph (``calls=``, ``to_apply=``, ``body=``,
  ``branch_computations=``, ...), ``executions`` how often each computation runs per call of the
  program (the known trip counts of ``while`` loops multiply; an unknown one makes it None), and
  ``looped`` which computations sit inside a loop;
* ``sites`` finds every instruction matching a pattern with where it sits and how often it runs;
* ``parse_instruction`` splits one instruction into name, result dims, opcode and operands;
* ``stack_frames`` maps ``stack_frame_id`` to the user source locations JAX recorded.
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
_CONDITION = re.compile(r"condition=%?([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_SHAPE = re.compile(r"([a-z][a-z0-9]*)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\w+\[([\d,]*)\]")
_FRAME_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")

Computations = dict[str, list[str]]


def hlo_text(compiled: Any) -> str:
  """The HLO text of a program.

  Args:
    compiled: a ``jax.stages.Compiled`` (``jax.jit(f).lower(...).compile()``) or its HLO text.

  Returns:
    ``compiled.as_text()``, or ``compiled`` itself when it is a string.
  """
  return compiled if isinstance(compiled, str) else compiled.as_text()


def closing(text: str, start: int, pair: str = "()") -> int:
  """The index of the bracket that closes the one at ``text[start]``.

  Args:
    text: a piece of HLO text.
    start: the index of an opening bracket ``pair[0]``.
    pair: the opening and closing bracket, e.g. ``"()"``, ``"{}"``, ``"[]"``.

  Returns:
    The index of the matching ``pair[1]``.

  Raises:
    ValueError: the brackets do not balance.
  """
  depth = 0
  for i in range(start, len(text)):
    depth += {pair[0]: 1, pair[1]: -1}.get(text[i], 0)
    if depth == 0:
      return i
  raise ValueError(f"unbalanced {pair} in HLO text: {text[start:start + 120]!r}")


def shape_elements(shape_text: str) -> tuple[int, tuple[str, ...]]:
  """Elements and dtypes of the arrays a shape names (``f32[2,3]``, ``(f32[4], s32[])``).

  Args:
    shape_text: the shape part of an instruction.

  Returns:
    ``(elements, dtypes)``: the elements of all arrays together, and each array's dtype.
  """
  total, dtypes = 0, []
  for dtype, dims in _SHAPE.findall(shape_text):
    size = 1
    for d in dims.split(","):
      if d:
        size *= int(d)
    total += size
    dtypes.append(dtype)
  return total, tuple(dtypes)


def array_shapes(shape_text: str) -> list[tuple[str, str]]:
  """The ``(dtype, dims)`` pairs of the arrays a shape names, dims as printed (``"2,3"``).

  Args:
    shape_text: the shape part of an instruction.

  Returns:
    One ``(dtype, dims)`` pair per array, in order.
  """
  return _SHAPE.findall(shape_text)


def parse_computations(text: str) -> tuple[Computations, str | None]:
  """Splits an HLO module into its computations.

  Args:
    text: the HLO text of a module.

  Returns:
    ``(computations, entry)``: each computation's instruction lines by name, and the name of
    the ``ENTRY`` computation (None if there is none).
  """
  comps: Computations = {}
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


def callees(lines: list[str]) -> set[str]:
  """The computations that instruction lines call (fusions, reductions, loops, branches).

  Args:
    lines: instruction lines of a computation.

  Returns:
    The names of the computations they call.
  """
  out = set()
  for line in lines:
    out.update(_CALLEE.findall(line))
    for group in _BRANCHES.findall(line):
      out.update(name.strip().lstrip("%") for name in group.split(",") if name.strip())
  return out


def call_sites(lines: list[str]) -> list[tuple[str, int | None]]:
  """The computations called from ``lines`` with how often each runs per run of ``lines``.

  Args:
    lines: instruction lines of a computation.

  Returns:
    ``(callee, runs)`` pairs: a while loop's body runs its known trip count n times and its
    condition n + 1 times (None for both when XLA does not know n); any other callee once.
  """
  out: list[tuple[str, int | None]] = []
  for line in lines:
    bodies = _WHILE_BODY.findall(line)
    if " while(" in line and bodies:
      trip = _TRIP_COUNT.search(line)
      n = int(trip.group(1)) if trip else None
      out.append((bodies[0], n))
      out += [(c, None if n is None else n + 1) for c in _WHILE_CONDITION.findall(line)]
      continue
    out += [(c, 1) for c in callees([line])]
  return out


def executions(comps: Computations, entry: str | None) -> dict[str, int | None]:
  """Runs of each computation per call of ``entry``.

  Args:
    comps: the computations of a module (``parse_computations``).
    entry: the name of its entry computation.

  Returns:
    Runs per call by computation name; None inside a loop of unknown length. Both branches of a
    conditional count (an upper bound); an uncalled computation counts as running once.
  """
  parents: dict[str, list[tuple[str, int | None]]] = {}
  for name, lines in comps.items():
    for child, factor in call_sites(lines):
      parents.setdefault(child, []).append((name, factor))
  memo: dict[str, int | None] = {}

  def runs(name: str) -> int | None:
    """Runs of ``name``: the sum over its call sites of the caller's runs times the site's."""
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


def looped(comps: Computations) -> set[str]:
  """The computations reachable from the body or condition of a while loop.

  Args:
    comps: the computations of a module (``parse_computations``).

  Returns:
    Their names.
  """
  graph = {name: callees(lines) for name, lines in comps.items()}
  inside: set[str] = set()
  stack = [b for lines in comps.values() for line in lines for b in _WHILE_BODY.findall(line)]
  stack += [c for lines in comps.values() for line in lines if " while(" in line
            for c in _CONDITION.findall(line)]
  while stack:
    name = stack.pop()
    if name in inside or name not in graph:
      continue
    inside.add(name)
    stack.extend(graph[name])
  return inside


class Site(NamedTuple):
  """An instruction matching a pattern, with where it sits and how often it runs.

  Attributes:
    computation: the computation that holds it.
    line: its line of HLO text.
    match: the pattern's match in ``line``.
    in_loop: whether its computation is reachable from the body or condition of a while loop.
    trips: runs per call of the program (``executions``; None inside a loop of unknown length).
  """
  computation: str
  line: str
  match: re.Match
  in_loop: bool
  trips: int | None


def sites(text: str, pattern: re.Pattern) -> list[Site]:
  """Every instruction of an HLO module matching ``pattern``, with its loop status and trips.

  Args:
    text: the HLO text of a module.
    pattern: searched in each instruction line.

  Returns:
    One ``Site`` per matching line, in the order of the text.
  """
  comps, entry = parse_computations(text)
  runs = executions(comps, entry)
  inside = looped(comps)
  return [Site(name, line, match, name in inside, runs[name])
          for name, lines in comps.items() for line in lines
          for match in [pattern.search(line)] if match]


class Instruction(NamedTuple):
  """One HLO instruction, split.

  Attributes:
    name: its name (without ``%``).
    dims: the dims of each array of its result.
    opcode: e.g. ``fusion``, ``dynamic-update-slice``, ``parameter``.
    operands: the names of its operands.
    raw: the text between its opcode's parentheses.
    calls: the computation it calls (``calls=``, fusions), or None.
    root: whether it is its computation's ``ROOT``.
  """
  name: str
  dims: tuple[tuple[int, ...], ...]
  opcode: str
  operands: tuple[str, ...]
  raw: str
  calls: str | None
  root: bool


def parse_instruction(line: str) -> Instruction | None:
  """Splits one instruction line.

  Args:
    line: a line of a computation.

  Returns:
    The ``Instruction``, or None for a line that is not one.
  """
  match = _INSTRUCTION.match(line)
  if match is None:
    return None
  name, rest = match.groups()
  end = closing(rest, 0) + 1 if rest.startswith("(") else rest.index(" ")
  kind, rest = rest[:end], rest[end:].lstrip()
  op = re.match(r"([\w\-]+)\(", rest)
  if op is None:
    return None
  close = closing(rest, op.end() - 1)
  raw = rest[op.end():close]
  calls = re.search(r"calls=%?([\w.\-]+)", rest[close:])
  dims = tuple(tuple(int(d) for d in m.split(",") if d) for m in _ARRAY.findall(kind))
  return Instruction(name=name, dims=dims, opcode=op.group(1),
                     operands=tuple(re.findall(r"%([\w.\-]+)", raw)), raw=raw,
                     calls=calls.group(1) if calls else None,
                     root=line.lstrip().startswith("ROOT"))


def _frame_tables(text: str) -> dict[str, dict[int, str]]:
  """The rows of the module's ``FileNames``, ``FileLocations`` and ``StackFrames`` tables."""
  sections: dict[str, dict[int, str]] = {}
  current = None
  for line in text.splitlines():
    head = line.strip()
    if head in _FRAME_TABLES:
      current = head
      sections[current] = {}
    elif not head or head.startswith(("%", "ENTRY", "HloModule")):
      current = None
    elif current is not None:
      number, _, value = head.partition(" ")
      if number.isdigit():
        sections[current][int(number)] = value
  return sections


def stack_frames(text: str) -> dict[int, list[str]]:
  """Source locations (``file:line``, innermost first) of each ``stack_frame_id`` of a module.

  Read from the module's ``FileNames``, ``FileLocations`` and ``StackFrames`` tables (JAX
  records the user frames of the call stack that built each operation).

  Args:
    text: the HLO text of a module.

  Returns:
    The chain of distinct source locations of each frame id.
  """
  sections = _frame_tables(text)
  files = {k: v.strip('"') for k, v in sections.get("FileNames", {}).items()}
  locations = {}
  for k, v in sections.get("FileLocations", {}).items():
    f = re.search(r"file_name_id=(\d+)", v)
    ln = re.search(r"\bline=(\d+)", v)
    if f and ln:
      locations[k] = f"{files.get(int(f.group(1)), '?')}:{ln.group(1)}"
  frames = {}
  for k, v in sections.get("StackFrames", {}).items():
    loc = re.search(r"file_location_id=(\d+)", v)
    parent = re.search(r"parent_frame_id=(\d+)", v)
    # XLA prints a frame's parent as the parent's id + 1 (1: no parent).
    frames[k] = (int(loc.group(1)) if loc else 0, int(parent.group(1)) - 1 if parent else 0)
  out = {}
  for k in frames:
    chain, seen, frame = [], set(), k
    while frame in frames and frame not in seen:
      seen.add(frame)
      where = locations.get(frames[frame][0])
      if where and (not chain or chain[-1] != where):
        chain.append(where)
      frame = frames[frame][1]
    out[k] = chain
  return out
