"""Device groups of HLO collectives, parsed from the instruction text.

XLA prints the devices a collective runs over in three forms, all of which name logical device
ids (with ``use_global_device_ids=true``, as inside ``jax.shard_map`` and SPMD programs: the
position of a device in the program's device assignment):

* explicit lists: ``replica_groups={{0,2},{1,3}}`` (``{}``: every device in one group);
* iota lists: ``replica_groups=[2,2]<=[4]`` or ``[2,2]<=[2,2]T(1,0)``: ``iota(prod(dims))``
  reshaped to ``dims``, transposed by ``T(...)`` and reshaped to ``[groups, group size]``;
* mesh axes: ``replica_groups=mesh['a'=2,'b'=2], device_ids=([2,2]T(1,0)) {'b'}``: the devices
  of a mesh (ids laid out as ``device_ids`` says, ``iota`` when absent) grouped along the
  listed axes (or sub-axes ``'b':(pre)size``, whose coordinate is ``(coordinate // pre) % size``).

A collective-permute names ``source_target_pairs={{0,1},{1,0}}`` instead.
"""

from __future__ import annotations

import itertools
import re

import numpy as np

from aptsjax.tools.hlo import closing

_IOTA = re.compile(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_MESH_AXIS = re.compile(r"'?([^'=,\s]+)'?=(\d+)")
_GROUP_AXIS = re.compile(r"'?([^':,\s]+)'?(?::\((\d+)\)(\d+))?")
_LIST = re.compile(r"\{([\d,\s]*)\}")


def _ints(text: str) -> list[int]:
  """The integers of a comma-separated list."""
  return [int(t) for t in text.replace(" ", "").split(",") if t]


def iota_ids(reshape: list[int], perm: list[int] | None) -> np.ndarray:
  """The device ids of an iota list: ``iota(prod(reshape)).reshape(reshape).transpose(perm)``.

  Args:
    reshape: the dims the ids are laid out in.
    perm: the transposition ``T(...)``, or None.

  Returns:
    The ids, flattened.
  """
  ids = np.arange(int(np.prod(reshape))).reshape(reshape)
  return (ids.transpose(perm) if perm else ids).reshape(-1)


def _device_ids(text: str, count: int) -> np.ndarray:
  """The ``device_ids=(...)`` list of a mesh: an iota form ``[dims]T(perm)`` or explicit ids."""
  text = text.strip()
  if not text:
    return np.arange(count)
  iota = re.fullmatch(r"(?:\[[\d,]+\]<=)?\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
  if iota:
    ids = iota_ids(_ints(iota.group(1)), _ints(iota.group(2)) if iota.group(2) else None)
  else:
    ids = np.asarray(_ints(re.sub(r"[{}\[\]]", ",", text)))
  if ids.size != count:
    raise ValueError(f"HLO mesh device_ids {text!r} list {ids.size} ids for {count} devices.")
  return ids


def _mesh_groups(text: str) -> list[list[int]]:
  """Groups of a ``mesh[...]...{axes}`` replica group list (``text`` starts at ``mesh[``)."""
  close = closing(text, text.index("["), "[]")
  axes = [(name, int(size)) for name, size in _MESH_AXIS.findall(text[text.index("[") + 1:close])]
  names = [a for a, _ in axes]
  shape = [s for _, s in axes]
  rest = text[close + 1:]
  ids_text = ""
  found = re.match(r"\s*,\s*device_ids=", rest)
  if found:
    open_at = found.end()
    end = closing(rest, open_at)
    ids_text, rest = rest[open_at + 1:end], rest[end + 1:]
  ids = _device_ids(ids_text, int(np.prod(shape))).reshape(shape)
  brace = rest.index("{")
  grouped: dict[int, tuple[int, int] | None] = {}
  for name, pre, size in _GROUP_AXIS.findall(rest[brace + 1:closing(rest, brace, "{}")]):
    if name not in names:
      raise ValueError(f"HLO replica groups name axis {name!r}, not one of the mesh's {names}.")
    grouped[names.index(name)] = (int(pre), int(size)) if pre else None
  groups: dict[tuple, list[int]] = {}
  for index in itertools.product(*(range(s) for s in shape)):
    key = []
    for dim, c in enumerate(index):
      if dim not in grouped:
        key.append(c)
      elif grouped[dim] is not None:
        pre, size = grouped[dim]
        key.append((c // (pre * size), c % pre))
    groups.setdefault(tuple(key), []).append(int(ids[index]))
  return list(groups.values())


def replica_groups(line: str, num_devices: int | None = None) -> list[list[int]] | None:
  """The device groups of a collective's HLO line, or None if it names none.

  Args:
    line: one HLO instruction.
    num_devices: the program's device count, for ``replica_groups={}`` (every device).

  Returns:
    One list of logical device ids per group; for a collective-permute, its (source, target)
    pairs.

  Raises:
    ValueError: groups in a form this parser does not know.
  """
  pairs = re.search(r"source_target_pairs=\{", line)
  if pairs:
    body = line[pairs.end() - 1:closing(line, pairs.end() - 1, "{}") + 1]
    return [_ints(g) for g in _LIST.findall(body[1:-1])]
  found = re.search(r"replica_groups=", line)
  if not found:
    return None
  text = line[found.end():]
  if text.startswith("mesh["):
    return _mesh_groups(text)
  if text.startswith("{"):
    body = text[1:closing(text, 0, "{}")]
    groups = [_ints(g) for g in _LIST.findall(body)]
    if groups:
      return groups
    if num_devices is None:
      raise ValueError("replica_groups={} (every device) needs the program's device count.")
    return [list(range(num_devices))]
  iota = _IOTA.match(text)
  if iota:
    shape = _ints(iota.group(1))
    ids = iota_ids(_ints(iota.group(2)), _ints(iota.group(3)) if iota.group(3) else None)
    return ids.reshape(shape[0], -1).tolist()
  raise ValueError(f"unknown replica_groups form in HLO line: {text[:120]!r}")


def spanned_axes(groups: list[list[int]], shape: tuple[int, ...],
                 names: tuple[str, ...]) -> tuple[str, ...]:
  """The mesh axes along which the devices of some group differ, in mesh order.

  Args:
    groups: lists of logical device ids (or source-target pairs); id i is the device at flat
      position i of a mesh of ``shape``.
    shape: the mesh shape.
    names: its axis names.

  Returns:
    The names of the axes along which some group's devices differ.

  Raises:
    ValueError: an id outside the mesh.
  """
  size = int(np.prod(shape))
  varies = np.zeros(len(shape), bool)
  for group in groups:
    if any(not 0 <= i < size for i in group):
      raise ValueError(f"device ids {group} of an HLO collective are outside a mesh of "
                       f"{size} devices; pass the mesh the program was compiled for.")
    coords = np.asarray(np.unravel_index(np.asarray(group, int), shape)).T
    varies |= np.any(coords != coords[:1], axis=0)
  return tuple(n for n, v in zip(names, varies) if v)
