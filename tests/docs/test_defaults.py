"""docs/defaults.md is the one list of the defaults: its tables must equal the settings objects
(``TrustRegionConfig()``, ``.paper()``, ``APTSConfig()``, ``.paper()``) and the constructors'
``inspect.signature`` defaults, so that changing a default fails here until the page is updated.

The page's tables are read as they are written: a settings table has a ``field`` column and one
column per settings object, named by a code span (`` `TrustRegionConfig()` ``) that is evaluated;
an arguments table has the columns ``function``, ``argument`` and ``default``. Every cell value is
the Python literal (or expression) in its first code span; bold marks, in a settings table's
first value column, exactly the fields where that object differs from the second (the paper's).
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

import aptsjax
from aptsjax import APTSConfig, TrustRegionConfig

PAGE = Path(__file__).resolve().parents[2] / "docs" / "defaults.md"
NAMESPACE = {"TrustRegionConfig": TrustRegionConfig, "APTSConfig": APTSConfig}
CODE = re.compile(r"`([^`]*)`")
REQUIRED = "required"


@dataclasses.dataclass
class Table:
  line: int               # 1-based line of the header
  header: list[str]
  rows: list[list[str]]


def _cells(line: str) -> list[str]:
  return [c.strip() for c in line.strip().strip("|").split("|")]


def tables(text: str) -> list[Table]:
  """Every Markdown table of ``text`` (header, rows; the separator row dropped)."""
  found, block, start = [], [], 0
  for number, line in enumerate(text.splitlines() + [""], start=1):
    if line.lstrip().startswith("|"):
      if not block:
        start = number
      block.append(_cells(line))
    elif block:
      found.append(Table(start, block[0], [r for r in block[2:]]))
      block = []
  return found


def code(cell: str) -> str | None:
  match = CODE.search(cell)
  return match.group(1) if match else None


def value(cell: str) -> Any:
  text = code(cell)
  if text is None:
    raise ValueError(f"no code span in cell {cell!r}")
  return eval(text, {"__builtins__": {}}, dict(NAMESPACE))  # noqa: S307 (the page's literals)


def same(a: Any, b: Any) -> bool:
  """Equal and of the same type (``True`` is not ``1``, ``0`` is not ``0.0``)."""
  return type(a) is type(b) and a == b


def resolve(dotted: str) -> Any:
  obj = aptsjax
  for part in dotted.split(".")[1:]:
    obj = getattr(obj, part)
  return obj


def settings_mismatches(table: Table) -> list[str]:
  columns = {}
  for index, cell in enumerate(table.header):
    text = code(cell)
    if index and text is not None:
      obj = value(cell)
      if isinstance(obj, (TrustRegionConfig, APTSConfig)):
        columns[index] = (text, obj)
  if not columns:
    return [f"line {table.line}: a settings table without a settings column"]
  kinds = {type(obj) for _, obj in columns.values()}
  if len(kinds) != 1:
    return [f"line {table.line}: columns of different settings classes {kinds}"]
  config_type = kinds.pop()
  problems = []
  listed = [code(row[0]) for row in table.rows]
  if sorted(listed) != sorted(config_type._fields):
    problems.append(f"line {table.line}: {config_type.__name__} fields listed {listed}, "
                    f"the class has {list(config_type._fields)}")
  first, second = sorted(columns)[:2] if len(columns) > 1 else (sorted(columns)[0], None)
  for offset, row in enumerate(table.rows, start=table.line + 2):
    field = code(row[0])
    if field not in config_type._fields:
      continue
    for index, (name, obj) in columns.items():
      actual = getattr(obj, field)
      try:
        written = value(row[index])
      except Exception as error:  # noqa: BLE001 (reported with the line)
        problems.append(f"line {offset}: {name}.{field}: cannot read {row[index]!r}: {error}")
        continue
      if not same(written, actual):
        problems.append(f"line {offset}: {name}.{field} is {actual!r}, the page says "
                        f"{written!r}")
    if second is not None:
      differs = getattr(columns[first][1], field) != getattr(columns[second][1], field)
      bold = "**" in row[first]
      if differs != bold:
        problems.append(f"line {offset}: {field}: {columns[first][0]} "
                        f"{'differs from' if differs else 'equals'} {columns[second][0]}, "
                        f"but the page {'does not mark' if differs else 'marks'} it in bold")
  return problems


def argument_mismatches(table: Table) -> tuple[list[str], dict[str, set[str]]]:
  names = [c.lower() for c in table.header]
  at = {key: names.index(key) for key in ("function", "argument", "default")}
  problems, seen = [], {}
  for offset, row in enumerate(table.rows, start=table.line + 2):
    function, argument = code(row[at["function"]]), code(row[at["argument"]])
    try:
      parameters = inspect.signature(resolve(function)).parameters
    except (AttributeError, TypeError, ValueError) as error:
      problems.append(f"line {offset}: cannot read the signature of {function}: {error}")
      continue
    seen.setdefault(function, set()).add(argument)
    if argument not in parameters:
      problems.append(f"line {offset}: {function} has no argument {argument!r}")
      continue
    actual = parameters[argument].default
    cell = row[at["default"]]
    if cell.strip() == REQUIRED:
      if actual is not inspect.Parameter.empty:
        problems.append(f"line {offset}: {function}({argument}=...) defaults to {actual!r}, "
                        "the page says it is required")
      continue
    if actual is inspect.Parameter.empty:
      problems.append(f"line {offset}: {function}'s {argument} is required, the page gives "
                      f"{cell!r}")
      continue
    written = value(cell)
    if not same(written, actual):
      problems.append(f"line {offset}: {function}({argument}=...) defaults to {actual!r}, the "
                      f"page says {written!r}")
  for function, listed in seen.items():
    try:
      parameters = inspect.signature(resolve(function)).parameters.values()
    except (AttributeError, TypeError, ValueError):
      continue
    missing = [p.name for p in parameters if p.default is not inspect.Parameter.empty
               and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in listed]
    if missing:
      problems.append(f"{function}: arguments with defaults missing from the page: {missing}")
  return problems, seen


def mismatches(text: str) -> list[str]:
  """Every difference between the page's tables and the code (empty when they agree)."""
  problems, settings, functions = [], [], {}
  for table in tables(text):
    first = table.header[0].lower()
    if first == "field":
      settings.append(table)
      problems += settings_mismatches(table)
    elif first == "function":
      found, seen = argument_mismatches(table)
      problems += found
      for function, listed in seen.items():
        functions.setdefault(function, set()).update(listed)
  covered = {type(value(cell)) for table in settings for cell in table.header[1:]
             if code(cell) and isinstance(value(cell), (TrustRegionConfig, APTSConfig))}
  if covered != {TrustRegionConfig, APTSConfig}:
    problems.append(f"settings tables cover {covered}, not both TrustRegionConfig and APTSConfig")
  columns = {code(cell) for table in settings for cell in table.header[1:] if code(cell)}
  for needed in ("TrustRegionConfig()", "TrustRegionConfig.paper()", "APTSConfig()",
                 "APTSConfig.paper()"):
    if needed not in columns:
      problems.append(f"no column for {needed}")
  for function, arguments in {"aptsjax.trust_region": {"memory", "second_order", "has_aux"},
                              "aptsjax.apts": {"num_subdomains", "second_order", "memory",
                                               "has_aux"},
                              "aptsjax.apts_trainer": {"num_devices", "overlap"},
                              "aptsjax.value_and_grad_from_state": {"has_aux"}}.items():
    absent = arguments - functions.get(function, set())
    if absent:
      problems.append(f"{function}: {sorted(absent)} not in the arguments table")
  return problems


def test_defaults_page_matches_the_code():
  problems = mismatches(PAGE.read_text(encoding="utf-8"))
  assert not problems, ("docs/defaults.md disagrees with the code; update the page:\n"
                        + "\n".join(problems))


def test_the_defaults_differ_from_the_paper_where_the_pages_say():
  """What the pages say in words (README, index, choosing, method): the paper's region with the
  floor 1e-6, the mean, adam_tr, the carried local radius, global steps and the consistency term
  by batch kind, radii per parameter; no learning rate is read by default."""
  differ = [f for f in APTSConfig._fields if getattr(APTSConfig(), f) != getattr(
      APTSConfig.paper(), f)]
  assert differ == ["trust_region", "combine", "local_solver", "local_radius", "global_steps",
                    "consistency", "radius_units"]
  assert APTSConfig().resolve(False).consistency and not APTSConfig().resolve(True).consistency
  assert APTSConfig().trust_region == TrustRegionConfig.paper()._replace(min_radius=1e-6)
  assert APTSConfig().local_solver == "adam_tr" and APTSConfig().local_lr == 1e-3


def _replace_in_row(text: str, field: str, old: str, new: str) -> str:
  lines = text.splitlines()
  for i, line in enumerate(lines):
    if line.startswith(f"| `{field}` |") and old in line:
      lines[i] = line.replace(old, new, 1)
      return "\n".join(lines)
  raise AssertionError(f"no row {field!r} with {old!r}")


@pytest.mark.parametrize("field, old, new", [
    ("eta1", "`0.25`", "`0.3`"),                       # a wrong constant
    ("min_radius", "**`1e-10`**", "**`1e-8`**"),       # trust_region's floor
    ("combine", '**`"mean"`**', '`"mean"`'),            # a difference not marked
    ("local_steps", "`5`", "`5.0`"),                   # right value, wrong type
    ("local_lr", "`0.001`", "`0.01`"),
    ("has_aux", "`False`", "`True`"),                  # a constructor argument
    ("overlap", "`0.0`", "`0.05`"),
])
def test_a_wrong_value_on_the_page_is_caught(field, old, new):
  text = PAGE.read_text(encoding="utf-8")
  if field in ("has_aux", "overlap"):   # rows of the arguments table: | function | argument |
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if f"| `{field}` | {old}" in line)
    lines[i] = lines[i].replace(f"| `{field}` | {old}", f"| `{field}` | {new}", 1)
    text = "\n".join(lines)
  else:
    text = _replace_in_row(text, field, old, new)
  assert mismatches(text), f"changing {field} from {old} to {new} went unnoticed"


def test_a_missing_field_is_caught():
  text = "\n".join(line for line in PAGE.read_text(encoding="utf-8").splitlines()
                   if not line.startswith("| `block_bound` |"))
  assert any("block_bound" in p for p in mismatches(text))
