"""How a compiled executable touches large stored arrays, read from its optimized HLO text.

``stack_traffic`` counts, in the entry computation of ``compiled.as_text()``, the operations
that read a *stack* (an entry parameter of a given shape, such as the L-SR1 pairs S or Y) in
full, and those that write a new array of the stack's shape from one (a copy). An access
through a slice, dynamic-slice or gather reads only a part, and a dynamic-update-slice or
scatter of a stack (alone or as the root of a fusion) updates it in place; neither counts. A
bitcast of a stack is the same buffer, and so is an array of the stack's shape written from one
(a copy, whose later reads count too). Loops and calls that take a stack count as one full read
(the L-SR1 update and the OBS solve carry none). Stacks are known by their shape only: at
memory 1 or 2 (a stack of shape (..., 1, n) or (..., 2, n)) a product [S Y] C with as many columns has
that shape as well and counts as a copy.

This is a structural count, independent of timing noise and of XLA's cost model, which counts
every operand of an operation (n-vectors included) and, on CPU, a fused in-place scatter as a
full read and a full write.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_IN_PLACE = ("dynamic-update-slice", "scatter")
_PARTIAL = ("slice", "dynamic-slice", "gather")
_SAME_BUFFER = ("bitcast",)
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\w+\[([\d,]*)\]")


class Instr(NamedTuple):
  """One HLO instruction: its name, result dims (one tuple per array of the result), opcode,
  operand names, raw operand text and the computation it calls (fusions), if any."""
  name: str
  dims: tuple[tuple[int, ...], ...]
  opcode: str
  operands: tuple[str, ...]
  raw: str
  calls: str | None
  root: bool


class Traffic(NamedTuple):
  """Full reads and full-size writes (copies) of the stacks; ``passes`` over all of them."""
  reads: int
  copies: int
  passes: float


def _closing(text: str, start: int) -> int:
  """Index of the parenthesis closing the one at ``start``."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return i
  raise ValueError(f"unbalanced parentheses in HLO line: {text[:120]!r}")


def _instruction(line: str) -> Instr | None:
  match = _INSTR.match(line)
  if match is None:
    return None
  name, rest = match.groups()
  end = _closing(rest, 0) + 1 if rest.startswith("(") else rest.index(" ")
  kind, rest = rest[:end], rest[end:].lstrip()
  op = re.match(r"([\w\-]+)\(", rest)
  if op is None:
    return None
  close = _closing(rest, op.end() - 1)
  raw = rest[op.end():close]
  calls = re.search(r"calls=%?([\w.\-]+)", rest[close:])
  dims = tuple(tuple(int(d) for d in m.split(",") if d) for m in _ARRAY.findall(kind))
  return Instr(name=name, dims=dims, opcode=op.group(1),
               operands=tuple(re.findall(r"%([\w.\-]+)", raw)), raw=raw,
               calls=calls.group(1) if calls else None, root=line.lstrip().startswith("ROOT"))


def parse(text: str) -> tuple[dict[str, list[Instr]], str]:
  """Returns ``(computations, entry)``: each computation's instructions, and the entry's name."""
  computations: dict[str, list[Instr]] = {}
  entry, current = None, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      current = header.group(2)
      computations[current] = []
      entry = current if header.group(1) else entry
    elif line.startswith("}"):
      current = None
    elif current is not None and (instr := _instruction(line)) is not None:
      computations[current].append(instr)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text.")
  return computations, entry


def _param_access(body: list[Instr], index: int) -> str:
  """How a fused computation uses its parameter ``index``: 'full', 'in-place' or 'partial'."""
  users = {}
  for instr in body:
    for pos, operand in enumerate(instr.operands):
      users.setdefault(operand, []).append((instr, pos))
  params = [i.name for i in body if i.opcode == "parameter" and i.raw.strip() == str(index)]
  found, todo = set(), list(params)
  while todo:
    for instr, pos in users.get(todo.pop(), []):
      if instr.opcode in _SAME_BUFFER:
        todo.append(instr.name)
      elif instr.opcode in _IN_PLACE and pos == 0:
        found.add("in-place")
      elif instr.opcode in _PARTIAL and pos == 0:
        found.add("partial")
      else:
        found.add("full")
  for kind in ("full", "in-place", "partial"):
    if kind in found:
      return kind
  return "partial"   # unused parameter


def _access(instr: Instr, pos: int, computations: dict[str, list[Instr]]) -> str:
  """How ``instr`` accesses its operand ``pos``: 'full', 'in-place' or 'partial'."""
  if instr.opcode == "fusion" and instr.calls in computations:
    return _param_access(computations[instr.calls], pos)
  if instr.opcode in _IN_PLACE and pos == 0:
    return "in-place"
  return "partial" if instr.opcode in _PARTIAL and pos == 0 else "full"


def stack_traffic(text: str, shape: tuple[int, ...]) -> Traffic:
  """Counts full reads and copies of the entry parameters of ``shape`` (see the module docstring).

  Args:
    text: the optimized HLO of an executable (``compiled.as_text()``).
    shape: the dims of a stack, e.g. ``(N, k, n)``.

  Returns:
    A ``Traffic``; ``passes`` = (reads + copies) / the number of stacks, i.e. how many times
    all of them are read or written in full (one read of each stack is 1.0).
  """
  computations, entry = parse(text)
  shape = tuple(shape)
  stacks = {i.name for i in computations[entry] if i.opcode == "parameter" and i.dims == (shape,)}
  if not stacks:
    raise ValueError(f"the entry computation has no parameter of shape {shape}.")
  count = len(stacks)
  reads = copies = 0
  for instr in computations[entry]:
    on_stack = [p for p, o in enumerate(instr.operands) if o in stacks]
    if not on_stack or instr.opcode in ("parameter", "constant", "tuple", "get-tuple-element"):
      continue
    if instr.opcode in _SAME_BUFFER:
      stacks.add(instr.name)
      continue
    kinds = [_access(instr, p, computations) for p in on_stack]
    reads += kinds.count("full")
    written = sum(d == shape for d in instr.dims)
    if written:
      stacks.add(instr.name)
      copies += max(0, written - kinds.count("in-place"))
  return Traffic(reads=reads, copies=copies, passes=(reads + copies) / count)
