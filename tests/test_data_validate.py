"""Data validation: each OpenAI-style problem is found, on its line, with its code; good files pass."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tunelab.data.formats import ChatExample
from tunelab.data.validate import load_chat_examples, validate_chat_file
from tunelab.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
GOOD: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write(tmp_path: Path, rows: list[Any], extra_good: int = 10) -> Path:
    """Bad rows first (lines 1..n), then enough good rows that the count check passes."""
    path = tmp_path / "data.jsonl"
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows] + [json.dumps(GOOD)] * extra_good
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def codes(path: Path, **kwargs: Any) -> list[tuple[str, str]]:
    report = validate_chat_file(path, **kwargs)
    return [(p.where, p.code) for p in report.errors]


def test_bundled_chat_data_is_valid() -> None:
    report = validate_chat_file(ROOT / "data/chat/train.jsonl")
    assert report.ok, report.errors
    assert report.format == "messages"
    assert len(report.examples) == report.n_rows == 798


@pytest.mark.parametrize(
    ("row", "code"),
    [
        ('{"messages": [', "invalid_json"),
        ("[1, 2]", "not_an_object"),
        ({"conversation": []}, "missing_messages"),
        ({"messages": "hi"}, "messages_not_list"),
        ({"messages": ["hi", {"role": "assistant", "content": "a"}]}, "message_not_object"),
        ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "a"}]}, "unknown_role"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "missing_content"),
        ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]}, "empty_content"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "invalid_field_type"),
        ({"messages": [{"role": "user", "content": "q", "mood": 1}, GOOD["messages"][1]]}, "unrecognized_key"),
        ({"messages": [{"role": "user", "content": "q"}]}, "no_assistant_message"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
            "no_trained_message",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]},
            "invalid_weight",
        ),
        ({"messages": [{"role": "user", "content": "q", "weight": 1}, GOOD["messages"][1]]}, "invalid_weight"),
        ({"prompt": "q", "completion": "a"}, "mixed_formats"),
    ],
)
def test_each_problem_has_its_line_and_code(tmp_path: Path, row: Any, code: str) -> None:
    path = write(tmp_path, [GOOD, row])  # line 1 is good (sets the format), line 2 is the bad row
    found = codes(path)
    assert found and all(where.startswith("data.jsonl:2") for where, _ in found), found
    assert code in {c for _, c in found}
    assert len(validate_chat_file(path).examples) == 11  # every good row is still read


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, ["{bad", {"messages": [{"role": "user", "content": "q"}]}, {"x": 1}])
    found = codes(path)
    assert [w.split(" ")[0] for w, _ in found] == ["data.jsonl:1", "data.jsonl:2", "data.jsonl:3"]
    with pytest.raises(DataError) as err:
        load_chat_examples(path)
    assert "data.jsonl:1" in str(err.value) and "data.jsonl:3" in str(err.value)


def test_too_few_examples_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, [], extra_good=3)
    assert ("data.jsonl", "too_few_examples") in codes(path)
    assert codes(path, min_examples=3) == []


def test_row_level_unknown_key_is_only_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path, [{**GOOD, "metadata": {"id": 1}}])
    report = validate_chat_file(path)
    assert report.ok
    assert [(p.where, p.code) for p in report.warnings] == [("data.jsonl:1", "unrecognized_key")]


def test_prompt_completion_format(tmp_path: Path) -> None:
    rows: list[Any] = [{"prompt": "2+2=", "completion": "4"}] * 10 + [{"prompt": "q", "completion": " "}]
    path = write(tmp_path, rows, extra_good=0)
    report = validate_chat_file(path)
    assert report.format == "prompt_completion"
    assert [(p.where, p.code) for p in report.errors] == [("data.jsonl:11", "empty_content")]
    assert report.examples[0] == ChatExample(1, prompt="2+2=", completion="4")


def test_forced_format_rejects_other_rows(tmp_path: Path) -> None:
    path = write(tmp_path, [])
    assert {c for _, c in codes(path, fmt="prompt_completion")} == {"unknown_format", "too_few_examples"}


def test_weight_zero_leaves_a_message_untrained(tmp_path: Path) -> None:
    row = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "draft", "weight": 0},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "final", "weight": 1},
        ]
    }
    example = load_chat_examples(write(tmp_path, [row]))[0]
    assert [m.trained for m in example.messages] == [False, False, False, True]


def test_long_examples_are_counted_and_warned(tmp_path: Path) -> None:
    long = {"messages": [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok"}]}
    path = write(tmp_path, [long, long])

    def count_words(example: ChatExample) -> int:
        return sum(len(m.content.split()) for m in example.messages)

    report = validate_chat_file(path, count_tokens=count_words, max_seq_len=20)
    assert report.ok
    assert report.n_truncated == 2
    assert report.token_counts[:3] == [51, 51, 2]
    assert [(p.code, "lines 1, 2" in p.message) for p in report.warnings] == [("too_long", True)]
