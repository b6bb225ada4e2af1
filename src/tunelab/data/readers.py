"""Readers that keep line numbers, so every data error can point at its line."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import DataError, Problem

MAX_DEPTH = 64  # a chat row with tools nests about 10 deep; json's own parser gives up near 1,000
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


@dataclass(frozen=True)
class Row:
    line: int  # 1-based line number in the file (JSONL, CSV), or the 0-based row index in a dataset (Parquet, Arrow)
    data: Any  # the parsed JSON value (a dict for valid rows)
    place: str = ""  # set for dataset rows: the shard or split the row index counts in

    def where(self, path: Path) -> str:
        """Where the row is, as errors name it: `file.jsonl:12`, or `shard.parquet row 11` (as `dataset[11]`)."""
        return f"{self.place} row {self.line}" if self.place else f"{path.name}:{self.line}"


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
                # utf-8-sig: a byte order mark at the start of the file (Azure's docs ask for one) is not content.
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield Problem(where, f"not UTF-8 (byte {exc.start})", "re-save the file as UTF-8", "invalid_encoding")
                continue
            yield _parsed(number, where, text)


def _parsed(number: int, where: str, text: str) -> Row | Problem:
    # The depth is checked on the text first: json's parser recurses, and a line of brackets would end it (and
    # whoever reads the file) with a RecursionError rather than an error about that line.
    if _nesting(text) > MAX_DEPTH:
        return Problem(where, f"JSON nested more than {MAX_DEPTH} levels deep", "flatten the row", "json_too_deep")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return Problem(where, f"invalid JSON: {json_cause(exc, text)}", "each line must be one JSON object",
                       "invalid_json")  # fmt: skip
    if _has_lone_surrogate(value):
        # "\ud800" is valid JSON but no text: tokenizers and UTF-8 writers fail on it at training time.
        return Problem(where, "a string holds a lone UTF-16 surrogate (an escape like \\ud800)",
                       "remove or fix the escape", "invalid_encoding")  # fmt: skip
    return Row(number, value)


def _nesting(text: str) -> int:
    """The deepest bracket nesting outside strings, without recursion (strings are cut out first)."""
    depth = deepest = 0
    for char in _BRACKETS.findall(_STRINGS.sub('""', text)):
        depth += 1 if char in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


# json's messages for the usual mistakes, in plain words (its own end in "at", e.g. "Invalid control character at").
JSON_CAUSES = {
    "Unterminated string starting at": "unterminated string (the line may be cut off)",
    "Expecting value": "a value is missing (the line may be cut off, or have a trailing comma)",
    "Expecting property name enclosed in double quotes": "a key is not in double quotes (or there is a trailing comma)",
    "Expecting ',' delimiter": "a comma is missing between two items (or the line is cut off)",
    "Expecting ':' delimiter": "a colon is missing after a key",
    "Extra data": "more than one JSON value on the line",
}


def json_cause(exc: json.JSONDecodeError, text: str) -> str:
    """What is wrong with a line, and at which column."""
    if exc.msg == "Invalid control character at":
        # A raw newline inside a string is what a line cut off in the middle of a string looks like.
        rest = text[exc.pos :].strip()
        cause = (
            "unterminated string (the line may be cut off)"
            if not rest
            else "a raw control character (tab, newline) inside a string; write it as \\t or \\n"
        )
    else:
        cause = JSON_CAUSES.get(exc.msg, exc.msg.removesuffix(" at").lower())
    return f"{cause}, at column {exc.colno}"


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


FORMATS = {".jsonl": "JSON Lines", ".json": "JSON Lines", ".csv": "CSV", ".parquet": "Parquet"}


def file_format(path: Path) -> str:
    """The name of a data file's format, from its extension (named in every error about the file)."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            [Problem(str(path), f"unknown file type {path.suffix!r}", "use .jsonl, .csv or .parquet", "unknown_format")]
        )
    return fmt


def read_records(path: Path, split: str = "train") -> list[Row]:
    """Rows of a JSONL, CSV or Parquet file, Parquet shards (a folder or a glob) or a `save_to_disk` folder, as
    dicts, each with its line (CSV, JSONL) or row index (datasets). `split` picks a DatasetDict's split."""
    if is_dataset(path):
        return read_dataset(path, split)
    fmt = file_format(path)
    if not path.is_file():
        raise DataError([Problem(str(path), f"no such {fmt} file", "check data.train / data.validation")])
    if fmt == "CSV":
        return _read_csv(path)
    if fmt == "Parquet":
        return _read_parquet(path)
    return read_jsonl(path)


def iter_rows(path: Path, split: str = "train") -> Iterator[Row | Problem]:
    """Every row of a data file, or a Problem for each JSONL line that is not JSON (the rest are still read).
    Any file that is not CSV or Parquet is read as JSONL, whatever its name (the job service stores uploads
    without an extension)."""
    if is_dataset(path) or path.suffix.lower() in (".csv", ".parquet"):
        yield from read_records(path, split)
    else:
        yield from iter_jsonl(path)


def is_dataset(path: Path) -> bool:
    """A Hugging Face dataset on disk: a folder (`save_to_disk`, or Parquet shards) or a glob of Parquet files."""
    return path.is_dir() or (not path.is_file() and any(c in str(path) for c in "*?["))


def _read_csv(path: Path) -> list[Row]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        try:
            # line_num after a record is the line it ended on; a header occupies line 1.
            return [Row(reader.line_num, dict(record)) for record in reader]
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(
                [Problem(f"{path.name}:{reader.line_num}", f"CSV: {exc}", "save the file as UTF-8 CSV")]
            ) from exc


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq  # imported here: only Parquet users pay for it

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError([Problem(path.name, f"Parquet: {exc}", "check that the file is Parquet")]) from exc
    return [Row(i, _without_nulls(record), path.name) for i, record in enumerate(table.to_pylist())]


def _without_nulls(value: Any) -> Any:
    """A dataset row with its null fields left out. Arrow gives every struct the union of the keys seen, so a key
    that a JSON row leaves out (an optional `weight`, `input` or `system`) comes back as null: absent it was."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


# The split a DatasetDict gives for each of data.train / data.validation: the first name it has, in this order.
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev")}


def read_dataset(path: Path, split: str) -> list[Row]:
    """Rows of Parquet shards (a folder or a glob of *.parquet, read in name order) or of a `save_to_disk` folder.
    Only Arrow/Parquet data and JSON metadata are read: nothing is unpickled, no dataset script runs."""
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return _read_saved(path, split)
    shards = sorted(path.glob("*.parquet")) if path.is_dir() else sorted(path.parent.glob(path.name))
    if not shards:
        raise DataError(
            [
                Problem(
                    str(path),
                    "neither a `save_to_disk` folder (no dataset_dict.json or state.json) nor Parquet shards",
                    "give a folder written by Dataset.save_to_disk, a folder of *.parquet files, or a glob",
                    "unknown_format",
                )
            ]
        )
    return [row for shard in shards for row in _read_parquet(shard)]


def saved_split(path: Path, split: str) -> str | None:
    """The split of a saved DatasetDict that `data.train` (or `data.validation`) reads; None for a plain Dataset."""
    index = path / "dataset_dict.json"
    if not index.is_file():
        return None
    splits: list[str] = json.loads(index.read_text(encoding="utf-8")).get("splits", [])
    found = next((s for s in SPLIT_NAMES.get(split, (split,)) if s in splits), None)
    if found is None and len(splits) == 1:
        found = splits[0]  # the only split there is
    if found is None:
        raise DataError(
            [
                Problem(
                    str(path),
                    f"a DatasetDict with splits {splits} and none named {list(SPLIT_NAMES.get(split, (split,)))}",
                    f"point data.{split} at one split's folder, e.g. {path / splits[0]}" if splits else "",
                    "unknown_split",
                )
            ]
        )
    return found


def _read_saved(path: Path, split: str) -> list[Row]:
    import datasets  # imported here: only users of saved datasets pay for it

    chosen = saved_split(path, split)
    try:
        loaded = datasets.load_from_disk(str(path / chosen if chosen else path))
    except (OSError, ValueError) as exc:
        raise DataError([Problem(str(path), f"cannot load the saved dataset: {exc}", "save it again")]) from exc
    if not isinstance(loaded, datasets.Dataset):
        raise DataError([Problem(str(path), "not one dataset split", "point at one split's folder")])
    place = f"{path.name}[{chosen}]" if chosen else path.name
    return [Row(i, _without_nulls(record), place) for i, record in enumerate(loaded.to_list())]


def mapped(data: Any, columns: dict[str, str]) -> Any:
    """A row with the scenario's fields taken from the columns named in `data.columns` ({field: column})."""
    if not columns or not isinstance(data, dict):
        return data
    return {**data, **{field: data[column] for field, column in columns.items() if column in data}}
