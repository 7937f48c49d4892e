"""What the benchmarks print and write: progress lines, CSV files and Markdown tables."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from aptsjax import distributed

Row = dict[str, Any]
Column = tuple[str, str, str]   # (header, key, format spec; "" for str())


def log(msg: str) -> None:
  """Prints a progress line at once, on process 0 only (the only process of a plain run).

  Args:
    msg: the line.
  """
  if distributed.is_main_process():
    print(msg, flush=True)


def write_csv(rows: Sequence[Any], path: str | Path) -> None:
  """Writes rows as CSV with a header line; writes nothing when there are no rows.

  Args:
    rows: dicts with the same keys (the first row's keys are the header) or NamedTuples of one
      type (its fields are the header).
    path: the file to write.
  """
  if not rows:
    return
  dicts = [r._asdict() if hasattr(r, "_asdict") else r for r in rows]
  with Path(path).open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(dicts[0]))
    writer.writeheader()
    writer.writerows(dicts)


def fmt(x: Any, spec: str = ",.0f") -> str:
  """Formats a table cell.

  Args:
    x: a number, or None.
    spec: a format spec.

  Returns:
    ``format(x, spec)``, or ``"n/a"`` for None.
  """
  return "n/a" if x is None else format(x, spec)


def table_head(names: Sequence[str]) -> list[str]:
  """The first two lines of a Markdown table.

  Args:
    names: the column headers.

  Returns:
    The header line and the separator line.
  """
  return ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]


def markdown_table(rows: Sequence[Row], cols: Sequence[Column],
                   missing: Mapping[str, str] | None = None) -> str:
  """A Markdown table of dict rows.

  Args:
    rows: the rows.
    cols: ``(header, key, format spec)`` per column; an empty spec prints ``str(value)``.
    missing: text for a None value, by key (others: ``fmt``'s "n/a", or "None" without a spec).

  Returns:
    The table, one line per row after the header.
  """
  missing = missing or {}
  lines = table_head([c[0] for c in cols])
  for r in rows:
    cells = [missing[k] if r[k] is None and k in missing else fmt(r[k], f) if f else str(r[k])
             for _, k, f in cols]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
