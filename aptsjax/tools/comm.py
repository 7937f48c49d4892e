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
inside a replica). ``device_groups(compiled)`` lists the device groups themselves.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

from aptsjax.tools import hlo
from aptsjax.tools import replica_groups as groups_lib

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_ALLREDUCE = re.compile(r"=\s*(.*?)\s+all-reduce(?:-start)?\(")
_COLLECTIVE = re.compile(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
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


def allreduce_stats(compiled: Any) -> list[AllReduce]:
  """Returns every all-reduce of a compiled program.

  Args:
    compiled: a ``jax.stages.Compiled`` (``jax.jit(f).lower(...).compile()``) or its HLO text.

  Returns:
    A list of ``AllReduce`` records; ``in_loop`` is True for an all-reduce reachable from the
    body or condition of any while loop, ``trips`` counts its runs per call.
  """
  return [AllReduce(site.computation, *hlo.shape_elements(site.match.group(1)), site.in_loop,
                    site.trips)
          for site in hlo.sites(hlo.hlo_text(compiled), _ALLREDUCE)]


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
  arrays = hlo.array_shapes(shape_text)
  if start and kind == "all-gather":
    arrays = arrays[len(arrays) // 2:]    # (operands, outputs)
  elif start and kind == "collective-permute":
    arrays = arrays[1:2]                  # (operand, output, contexts...)
  elements, dtypes = hlo.shape_elements(" ".join(f"{d}[{s}]" for d, s in arrays))
  return elements, dtypes, tuple(tuple(int(d) for d in s.split(",") if d) for _, s in arrays)


def _device_count(text: str, mesh: Any) -> int | None:
  """The program's device count: its ``num_partitions``, else the mesh's size, else None."""
  partitions = _PARTITIONS.search(text)
  return int(partitions.group(1)) if partitions else (mesh.size if mesh is not None else None)


def _site_groups(site: hlo.Site, count: int | None) -> list[list[int]]:
  """The device groups of a collective (every device in one group when its line names none)."""
  groups = groups_lib.replica_groups(site.line[site.match.end():], count)
  if groups is None:
    groups = [list(range(count))] if count else []
  return groups


def _group_size(kind: str, groups: list[list[int]]) -> int:
  """Devices per group; for a collective-permute 2 if it moves data, 1 for self-pairs only."""
  if kind == "collective-permute":
    return 2 if any(len(set(g)) > 1 for g in groups) else 1
  return max((len(g) for g in groups), default=1)


def device_groups(compiled: Any, kinds: Sequence[str] = COLLECTIVES,
                  num_devices: int | None = None) -> list[list[list[int]]]:
  """Returns the device groups of every collective of the given kinds.

  Args:
    compiled: a ``jax.stages.Compiled`` or its HLO text.
    kinds: the kinds of ``COLLECTIVES`` to list (an ``-start`` form counts as its kind).
    num_devices: the program's device count, for groups that name every device
      (``replica_groups={}``); default its ``num_partitions``.

  Returns:
    Per collective, in the order of the HLO text, its groups of logical device ids (id i is
    ``mesh.devices.flat[i]`` on a mesh); for a collective-permute its (source, target) pairs.

  Raises:
    ValueError: device groups in an unknown form.
  """
  text = hlo.hlo_text(compiled)
  count = num_devices if num_devices is not None else _device_count(text, None)
  return [_site_groups(site, count) for site in hlo.sites(text, _COLLECTIVE)
          if site.match.group(2) in kinds]


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
  text = hlo.hlo_text(compiled)
  count = _device_count(text, mesh)
  frames = hlo.stack_frames(text)
  out = []
  for site in hlo.sites(text, _COLLECTIVE):
    kind, start = site.match.group(2), bool(site.match.group(3))
    groups = _site_groups(site, count)
    axes = (None if mesh is None else
            groups_lib.spanned_axes(groups, tuple(mesh.devices.shape), tuple(mesh.axis_names)))
    op_name = _OP_NAME.search(site.line)
    frame = _FRAME.search(site.line)
    out.append(Collective(kind, site.computation, *_result(kind, start, site.match.group(1)),
                          site.in_loop, site.trips, axes, _group_size(kind, groups),
                          op_name.group(1) if op_name else "",
                          tuple(frames.get(int(frame.group(1)), ())) if frame else ()))
  return out
