"""How a compiled executable touches large stored arrays, read from its optimized HLO text.

``stack_traffic`` counts, in the entry computation, the operations that read a *stack* (an entry
parameter of a given shape, such as the L-SR1 pairs S or Y) in full, and those that write a new
array of the stack's shape from one (a copy). An access through a slice, dynamic-slice or gather
reads only a part, and a dynamic-update-slice or scatter of a stack (alone or as the root of a
fusion) updates it in place; neither counts. A bitcast of a stack is the same buffer, and so is
an array of the stack's shape written from one (a copy, whose later reads count too). Loops and
calls that take a stack count as one full read (the L-SR1 update and the OBS solve carry none).
Stacks are known by their shape only: at memory 1 or 2 (a stack of shape (..., 1, n) or
(..., 2, n)) a product [S Y] C with as many columns has that shape as well and counts as a copy.

This is a structural count, independent of timing noise and of XLA's cost model, which counts
every operand of an operation (n-vectors included) and, on CPU, a fused in-place scatter as a
full read and a full write.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

from aptsjax.tools import hlo

Access = Literal["full", "in-place", "partial"]
_IN_PLACE = ("dynamic-update-slice", "scatter")
_PARTIAL = ("slice", "dynamic-slice", "gather")
_SAME_BUFFER = ("bitcast",)
_NOT_ACCESSES = ("parameter", "constant", "tuple", "get-tuple-element")


class Traffic(NamedTuple):
  """Full reads and full-size writes of the stacks of an executable.

  Attributes:
    reads: operations that read a stack in full.
    copies: full-size writes of a stack's shape from one (copies).
    passes: ``(reads + copies) / stacks``: how many times all stacks are read or written in
      full (one read of each stack is 1.0).
  """
  reads: int
  copies: int
  passes: float


def instructions(text: str) -> tuple[dict[str, list[hlo.Instruction]], str]:
  """Every computation of an HLO module as a list of instructions.

  Args:
    text: the HLO text of a module.

  Returns:
    ``(computations, entry)``: each computation's instructions by name, and the entry's name.

  Raises:
    ValueError: no ENTRY computation.
  """
  comps, entry = hlo.parse_computations(text)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text.")
  return {name: [i for line in lines if (i := hlo.parse_instruction(line)) is not None]
          for name, lines in comps.items()}, entry


def _parameter_access(body: list[hlo.Instruction], index: int) -> Access:
  """How a fused computation uses its parameter ``index`` (the widest access wins)."""
  users: dict[str, list[tuple[hlo.Instruction, int]]] = {}
  for instr in body:
    for pos, operand in enumerate(instr.operands):
      users.setdefault(operand, []).append((instr, pos))
  found: set[str] = set()
  todo = [i.name for i in body if i.opcode == "parameter" and i.raw.strip() == str(index)]
  while todo:
    for instr, pos in users.get(todo.pop(), []):
      if instr.opcode in _SAME_BUFFER:
        todo.append(instr.name)
      else:
        found.add(_direct_access(instr, pos))
  for kind in ("full", "in-place", "partial"):
    if kind in found:
      return kind
  return "partial"   # unused parameter


def _direct_access(instr: hlo.Instruction, pos: int) -> Access:
  """How an unfused instruction accesses its operand ``pos``."""
  if instr.opcode in _IN_PLACE and pos == 0:
    return "in-place"
  return "partial" if instr.opcode in _PARTIAL and pos == 0 else "full"


def operand_access(instr: hlo.Instruction, pos: int,
                   computations: dict[str, list[hlo.Instruction]]) -> Access:
  """How an instruction accesses one of its operands.

  Args:
    instr: the instruction.
    pos: the operand's position.
    computations: the module's computations (``instructions``), to look into fusions.

  Returns:
    ``"in-place"`` (the first operand of a dynamic-update-slice or scatter), ``"partial"`` (the
    first operand of a slice, dynamic-slice or gather), else ``"full"``; a fusion as its body
    uses the parameter.
  """
  if instr.opcode == "fusion" and instr.calls in computations:
    return _parameter_access(computations[instr.calls], pos)
  return _direct_access(instr, pos)


def stack_traffic(compiled: Any, shape: tuple[int, ...]) -> Traffic:
  """Counts full reads and copies of the entry parameters of ``shape`` (see the module docstring).

  Args:
    compiled: a ``jax.stages.Compiled`` or its optimized HLO text (``compiled.as_text()``).
    shape: the dims of a stack, e.g. ``(N, k, n)``.

  Returns:
    A ``Traffic``.

  Raises:
    ValueError: the entry computation has no parameter of ``shape``.
  """
  computations, entry = instructions(hlo.hlo_text(compiled))
  shape = tuple(shape)
  stacks = {i.name for i in computations[entry] if i.opcode == "parameter" and i.dims == (shape,)}
  if not stacks:
    raise ValueError(f"the entry computation has no parameter of shape {shape}.")
  count = len(stacks)
  reads = copies = 0
  for instr in computations[entry]:
    on_stack = [p for p, o in enumerate(instr.operands) if o in stacks]
    if not on_stack or instr.opcode in _NOT_ACCESSES:
      continue
    if instr.opcode in _SAME_BUFFER:
      stacks.add(instr.name)
      continue
    kinds = [operand_access(instr, p, computations) for p in on_stack]
    reads += kinds.count("full")
    written = sum(d == shape for d in instr.dims)
    if written:
      stacks.add(instr.name)
      copies += max(0, written - kinds.count("in-place"))
  return Traffic(reads=reads, copies=copies, passes=(reads + copies) / count)
