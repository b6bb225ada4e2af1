"""Property tests of the file checks a hostile upload reaches (issue 15): chat files in every format, DPO pairs and
scenario rows, made of arbitrary JSON, near-miss rows and raw bytes. Whatever the file, a check ends: it raises
nothing but tunelab's DataError, and every problem it reports has a code. TUNELAB_FUZZ_EXAMPLES sets the count
per property (CI keeps the default small; bench/fuzz_service.py runs 1,000 and more)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunelab.config import load_spec
from tunelab.errors import DataError
from tunelab.job_service.files import check_file
from tunelab.tasks import check_data

EXAMPLES = int(os.environ.get("TUNELAB_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
SCENARIOS = ["classification", "qa", "ner", "translation", "domain", "creative"]

# Any text, lone surrogates and NULs included (json.dumps escapes both, as a hostile file would).
text = st.text(st.characters(codec=None, exclude_categories=()), max_size=20)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | text
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4), max_leaves=12
)
role = st.sampled_from(["system", "user", "assistant", "tool", "developer", "", "USER"]) | text
message = st.fixed_dictionaries({"role": role, "content": text | json_values}, optional={"weight": json_values})
chat_row = st.fixed_dictionaries({"messages": st.lists(message, max_size=4)})
dpo_row = st.fixed_dictionaries(
    {
        "input": st.fixed_dictionaries({"messages": st.lists(message, max_size=3)}) | json_values,
        "preferred_output": st.lists(message, max_size=2) | json_values,
        "non_preferred_output": st.lists(message, max_size=2) | json_values,
    }
)
trl_row = st.fixed_dictionaries({"prompt": text | json_values, "chosen": text | json_values, "rejected": text})
other_format = (
    st.fixed_dictionaries({"prompt": text, "completion": text | json_values})
    | st.fixed_dictionaries({"instruction": text, "input": text, "output": text | json_values})
    | st.fixed_dictionaries(
        {"conversations": st.lists(st.fixed_dictionaries({"from": text, "value": text}), max_size=3)}
    )
)
scenario_row = st.dictionaries(
    st.sampled_from(["text", "label", "question", "context", "answer", "tokens", "tags", "source", "target", "prompt",
                     "completion", "messages"]), json_values, max_size=5)  # fmt: skip
json_line = st.one_of(chat_row, dpo_row, trl_row, other_format, scenario_row, json_values).map(json.dumps)
hostile_line = st.sampled_from(
    ["[" * 5000 + "]" * 5000, '{"a": ' * 3000 + "1" + "}" * 3000, "\ufeff{}", "", "{", "null"]
)
raw_line = st.binary(max_size=60).map(lambda b: b.decode("latin-1"))
lines = st.lists(st.one_of(json_line, hostile_line, raw_line), min_size=1, max_size=6)


def _write(folder: Path, rows: list[str], bom: bool) -> Path:
    path = folder / "fuzz.jsonl"
    data = "\n".join(rows).encode("utf-8", "surrogatepass")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data + b"\n")
    return path


@FUZZ
@given(rows=lines, bom=st.booleans())
def test_the_service_file_check_always_ends_with_coded_problems(rows: list[str], bom: bool) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = _write(Path(folder), rows, bom)
        check = check_file(path, max_line_bytes=200_000)
        # A raw row may hold newlines itself: the file's own lines are what a problem's line number counts.
        file_lines = path.read_bytes().count(b"\n")
    assert check.ok == (not check.problems)
    for problem in check.problems:
        assert isinstance(problem["code"], str) and problem["code"]
        assert problem["line"] is None or 1 <= problem["line"] <= file_lines
        json.dumps(problem).encode("utf-8")  # storable: no lone surrogate reaches the database


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_rows_are_checked_without_crashing(scenario: str) -> None:
    @FUZZ
    @given(rows=st.lists(st.one_of(scenario_row.map(json.dumps), hostile_line, json_line), min_size=1, max_size=5))
    def check(rows: list[str]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = _write(Path(folder), rows, bom=False)
            spec = _spec(scenario, path)
            try:
                result = check_data(spec)
            except DataError as exc:  # the checks' own way to refuse a file: coded problems
                problems = exc.problems
            else:
                problems = result.errors
        assert all(p.code or p.message for p in problems)

    check()


def _spec(scenario: str, path: Path) -> Any:
    return load_spec(
        None, base={"model": {"name": "embedded"}, "task": {"scenario": scenario}, "data": {"train": str(path)}}
    )
