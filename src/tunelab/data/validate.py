"""Check chat JSONL files the way OpenAI's fine-tuning service does: every problem, with its line and a code.

Errors make a file unusable; warnings (ignored keys, over-long examples) do not. `load_chat_examples` is what
training uses: it raises a DataError listing every error at once, so the user fixes the file in one pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tunelab.data.formats import ROLES, SHAREGPT_ROLES, ChatExample, Format, detect_format, to_example
from tunelab.data.readers import Row, iter_rows
from tunelab.errors import DataError, Problem

FormatChoice = Literal["auto", "messages", "prompt_completion", "alpaca", "sharegpt"]
MESSAGE_KEYS = {"role", "content", "weight", "name"}  # "name" is accepted (and ignored), as OpenAI accepts it
ROW_KEYS: dict[Format, set[str]] = {
    "messages": {"messages"},
    "prompt_completion": {"prompt", "completion"},
    "alpaca": {"instruction", "input", "output", "system"},
    "sharegpt": {"conversations"},
}
FORMAT_HINT = (
    'use {"messages": [...]}, {"prompt": ..., "completion": ...}, {"instruction": ..., "input": ..., "output": ...} '
    '(Alpaca) or {"conversations": [{"from": ..., "value": ...}]} (ShareGPT)'
)


@dataclass
class ValidationReport:
    path: Path
    format: Format | None = None
    examples: list[ChatExample] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    n_rows: int = 0
    token_counts: list[int] = field(default_factory=list)
    n_truncated: int = 0
    # The keys of the rows that are in no chat format: what the file has instead (another scenario's columns?).
    other_columns: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.errors


def validate_chat_file(
    path: Path,
    fmt: FormatChoice = "auto",
    count_tokens: Callable[[ChatExample], int] | None = None,
    max_seq_len: int | None = None,
    min_examples: int = 10,
    split: str = "train",
) -> ValidationReport:
    """Read and check every row; count tokens when a counter is given (over-long examples are a warning).
    `split` is the DatasetDict split read when `path` is a saved dataset."""
    report = ValidationReport(path, format=None if fmt == "auto" else fmt)
    for item in iter_rows(path, split):
        report.n_rows += 1
        if isinstance(item, Problem):
            report.errors.append(item)
            continue
        example = _check_row(item, report, forced=fmt != "auto")
        if example is not None:
            report.examples.append(example)
    if count_tokens is not None:
        _count(report, count_tokens, max_seq_len)
    if len(report.examples) < min_examples:
        report.errors.append(
            Problem(
                path.name,
                f"{len(report.examples)} valid example(s); at least {min_examples} are needed",
                "add examples (OpenAI asks for at least 10; 50-100 good ones usually help clearly)",
                "too_few_examples",
            )
        )
    return report


def load_chat_examples(
    path: Path, fmt: FormatChoice = "auto", min_examples: int = 1, split: str = "train"
) -> list[ChatExample]:
    """The file's examples, or a DataError that lists every problem in it."""
    report = validate_chat_file(path, fmt, min_examples=min_examples, split=split)
    if report.errors:
        raise DataError(report.errors)
    return report.examples


def _check_row(item: Row, report: ValidationReport, forced: bool) -> ChatExample | None:
    row, where = item.data, item.where(report.path)
    if not isinstance(row, dict):
        report.errors.append(Problem(where, "each line must be a JSON object", "", "not_an_object"))
        return None
    found = detect_format(row)
    if found is None:
        report.other_columns.update(row)
        code = "missing_messages" if report.format in (None, "messages") else "unknown_format"
        report.errors.append(Problem(where, "no `messages` list (nor another chat format's keys)", FORMAT_HINT, code))
        return None
    if report.format is None:
        report.format = found  # the first valid row decides the file's format
    elif found != report.format:
        code = "unknown_format" if forced else "mixed_formats"
        report.errors.append(
            Problem(where, f"a {found} row in a {report.format} file", "use one format per file", code)
        )
        return None
    for key in sorted(set(row) - ROW_KEYS[found]):
        report.warnings.append(Problem(where, f"key `{key}` is ignored", "", "unrecognized_key"))
    before = len(report.errors)
    CHECKS[found](row, where, report.errors)
    return to_example(row, item.line, found) if len(report.errors) == before else None


def _check_messages(row: dict[str, Any], where: str, errors: list[Problem]) -> None:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        errors.append(Problem(where, "`messages` must be a non-empty list", "", "messages_not_list"))
        return
    for index, message in enumerate(messages):
        _check_message(message, f"{where} messages[{index}]", errors)
    assistants = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
    if not assistants:
        errors.append(
            Problem(where, "no assistant message", "each example needs a reply to learn from", "no_assistant_message")
        )
    elif all(m.get("weight", 1) == 0 for m in assistants):
        errors.append(
            Problem(where, "every assistant message has weight 0", "nothing would be trained", "no_trained_message")
        )


def _check_message(message: Any, where: str, errors: list[Problem]) -> None:
    if not isinstance(message, dict):
        errors.append(Problem(where, "a message must be an object", "", "message_not_object"))
        return
    for key in sorted(set(message) - MESSAGE_KEYS):
        errors.append(
            Problem(where, f"unrecognized key `{key}`", f"a message has {sorted(MESSAGE_KEYS)}", "unrecognized_key")
        )
    role = message.get("role")
    if role not in ROLES:
        errors.append(Problem(where, f"unknown role {role!r}", f"use one of {list(ROLES)}", "unknown_role"))
    content = message.get("content")
    if content is None:
        errors.append(Problem(where, "missing `content`", "", "missing_content"))
    elif not isinstance(content, str):
        errors.append(Problem(where, "`content` must be a string", "", "invalid_field_type"))
    elif not content.strip():
        errors.append(Problem(where, "empty `content`", "remove the message or fill it", "empty_content"))
    if "weight" in message and (role != "assistant" or message["weight"] not in (0, 1) or message["weight"] is True):
        errors.append(Problem(where, "`weight` must be 0 or 1, on assistant messages only", "", "invalid_weight"))


def _check_prompt_completion(row: dict[str, Any], where: str, errors: list[Problem]) -> None:
    for key in ("prompt", "completion"):
        if not isinstance(row[key], str):
            errors.append(Problem(where, f"`{key}` must be a string", "", "invalid_field_type"))
    if isinstance(row["completion"], str) and not row["completion"].strip():
        errors.append(Problem(where, "empty `completion`", "there is nothing to learn", "empty_content"))


def _check_alpaca(row: dict[str, Any], where: str, errors: list[Problem]) -> None:
    for key in ("instruction", "output"):
        if not isinstance(row[key], str) or not row[key].strip():
            errors.append(Problem(where, f"`{key}` must be a non-empty string", "", "invalid_field_type"))
    for key in ("input", "system"):  # optional: absent, null or empty means none
        if row.get(key) is not None and not isinstance(row[key], str):
            errors.append(Problem(where, f"`{key}` must be a string (or left out)", "", "invalid_field_type"))


def _check_sharegpt(row: dict[str, Any], where: str, errors: list[Problem]) -> None:
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        errors.append(Problem(where, "`conversations` must be a non-empty list", "", "messages_not_list"))
        return
    for index, turn in enumerate(turns):
        _check_turn(turn, f"{where} conversations[{index}]", errors)
    if not any(isinstance(t, dict) and SHAREGPT_ROLES.get(str(t.get("from"))) == "assistant" for t in turns):
        errors.append(
            Problem(where, "no `gpt` turn", "each example needs a reply to learn from", "no_assistant_message")
        )


def _check_turn(turn: Any, where: str, errors: list[Problem]) -> None:
    if not isinstance(turn, dict):
        errors.append(Problem(where, "a turn must be an object", "", "message_not_object"))
        return
    speaker = turn.get("from")
    if speaker not in SHAREGPT_ROLES:
        errors.append(
            Problem(where, f"unknown `from` {speaker!r}", f"use one of {list(SHAREGPT_ROLES)}", "unknown_role")
        )
    value = turn.get("value")
    if not isinstance(value, str):
        errors.append(Problem(where, "`value` must be a string", "", "missing_content"))
    elif not value.strip():
        errors.append(Problem(where, "empty `value`", "remove the turn or fill it", "empty_content"))


CHECKS: dict[Format, Callable[[dict[str, Any], str, list[Problem]], None]] = {
    "messages": _check_messages,
    "prompt_completion": _check_prompt_completion,
    "alpaca": _check_alpaca,
    "sharegpt": _check_sharegpt,
}


def _count(report: ValidationReport, count_tokens: Callable[[ChatExample], int], max_seq_len: int | None) -> None:
    report.token_counts = [count_tokens(e) for e in report.examples]
    if max_seq_len is None:
        return
    long_lines = [e.line for e, n in zip(report.examples, report.token_counts, strict=True) if n > max_seq_len]
    report.n_truncated = len(long_lines)
    if long_lines:
        shown = ", ".join(map(str, long_lines[:10])) + (" ..." if len(long_lines) > 10 else "")
        report.warnings.append(
            Problem(
                report.path.name,
                f"{len(long_lines)} example(s) longer than {max_seq_len} tokens "
                f"({'line' if len(long_lines) == 1 else 'lines'} {shown}) will be truncated",
                "raise train.max_seq_len or shorten them",
                "too_long",
            )
        )
