"""kvctl's output: one schema per command, printed as a table, JSON or YAML.

A command builds its result once, as plain data (a record: a dict; a listing: a list of
dicts), and this module prints that data. ``-o json`` and ``-o yaml`` print it as it is; the
table form prints the same keys with the same values in the same units: a listing as columns
headed by its keys in capitals (``NBYTES``), a record as ``key: value`` lines, a nested listing
as a section (``tiers:`` then its columns), a watched event as ``key=value`` pairs on one line.
Only the spelling of a value changes: booleans as yes/no, a missing value as ``-``, seconds
(``*_s``) and percentages (``*_pct``) to one decimal, lists joined with commas. Block hashes are
decimal everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

import yaml

Cell = Callable[[object], str]


def cell(key: str, value) -> str:
    """One value as a table shows it."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}" if key.endswith(("_s", "_pct")) else f"{value:.3f}".rstrip("0").rstrip(".")
    if isinstance(value, (list, tuple)):
        return ",".join(cell(key, v) for v in value) if value else "-"
    return str(value)


def columns(rows: list[dict], keys: Iterable[str], cells: dict[str, Cell] | None = None) -> str:
    """``rows`` as aligned columns headed by ``keys`` in capitals (the header alone when empty)."""
    keys = list(keys)
    cells = cells or {}
    body = [[cells[k](r[k]) if k in cells else cell(k, r[k]) for k in keys] for r in rows]
    header = [k.upper() for k in keys]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *body])


def record(data: dict) -> str:
    """A record as ``key: value`` lines; a non-empty list value as ``key:`` and one ``  - item``
    line per item."""
    lines = []
    for key, value in data.items():
        if isinstance(value, list) and value:
            lines.append(f"{key}:")
            lines += [f"  - {cell(key, v)}" for v in value]
        else:
            lines.append(f"{key}: {cell(key, value)}")
    return "\n".join(lines)


def pairs(data: dict) -> str:
    """A record on one line as ``key=value`` pairs (a watched event)."""
    return "  ".join(f"{k}={cell(k, v)}" for k, v in data.items())


def emit(output: str, data, table: str) -> None:
    """Print ``data`` as JSON (indented) or YAML, or ``table``, the table form of the same data."""
    if output == "json":
        print(json.dumps(data, indent=2))
    elif output == "yaml":
        print(yaml.safe_dump(data, sort_keys=False), end="")
    else:
        print(table)


def emit_record(output: str, data: dict) -> None:
    emit(output, data, record(data))


def emit_rows(output: str, rows: list[dict], keys: Iterable[str], cells: dict[str, Cell] | None = None) -> None:
    emit(output, rows, columns(rows, keys, cells))


def emit_event(output: str, fields: dict) -> None:
    """One event of a stream: a JSON line, a YAML document, or ``key=value`` pairs."""
    if output == "json":
        print(json.dumps(fields), flush=True)
    elif output == "yaml":
        print("---\n" + yaml.safe_dump(fields, sort_keys=False), end="", flush=True)
    else:
        print(pairs(fields), flush=True)
