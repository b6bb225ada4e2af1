"""Readers that keep line numbers, so every data error can point at its line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import DataError, Problem


@dataclass(frozen=True)
class Row:
    line: int  # 1-based line number in the file
    data: Any  # the parsed JSON value (a dict for valid rows)


def iter_jsonl(path: Path) -> Iterator[Row | Problem]:
    """Yield each non-blank line parsed, or a Problem saying why that line is not JSON."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise DataError([Problem(str(path), f"cannot open: {exc.strerror}", "check the path")]) from exc
    with handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            where = f"{path.name}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Problem(where, f"not UTF-8 (byte {exc.start})", "re-save the file as UTF-8", "invalid_encoding")
                continue
            try:
                yield Row(number, json.loads(text))
            except json.JSONDecodeError as exc:
                yield Problem(
                    where,
                    f"invalid JSON: {exc.msg} at column {exc.colno}",
                    "each line must be one JSON object",
                    "invalid_json",
                )


def read_jsonl(path: Path) -> list[Row]:
    """All rows of a JSONL file; any line that is not a JSON object is reported (all of them at once)."""
    rows: list[Row] = []
    problems: list[Problem] = []
    for item in iter_jsonl(path):
        if isinstance(item, Problem):
            problems.append(item)
        elif not isinstance(item.data, dict):
            problems.append(Problem(f"{path.name}:{item.line}", "each line must be a JSON object", "", "not_an_object"))
        else:
            rows.append(item)
    if problems:
        raise DataError(problems)
    return rows
