"""Preference pairs for DPO: the formats people bring, and the rows the loop trains on.

- OpenAI's DPO format: {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": ...}],
  "non_preferred_output": [{"role": "assistant", "content": ...}]}
- TRL's formats: {"prompt": str, "chosen": str, "rejected": str} (plain text: the answer continues the prompt, no
  chat template), or the same keys holding message lists (conversational).

A pair becomes one row (or, packed, several pairs share a row): the preferred sequence, then the rejected one,
each with restarting positions so that neither attends to the other. Every token carries its sequence id
(2 * pair for the preferred answer, 2 * pair + 1 for the rejected one), which is how the objective sums
log-probabilities per answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.formats import ROLES, ChatExample, Message
from tunelab.data.packing import Row, best_fit
from tunelab.data.readers import iter_jsonl
from tunelab.data.render import Tokenized
from tunelab.errors import Problem

OPENAI_KEYS = ("input", "preferred_output", "non_preferred_output")
TRL_KEYS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class Pair:
    chosen: ChatExample
    rejected: ChatExample


def parse_pair(row: dict[str, Any], line: int) -> Pair:
    """One row in either format. Raises ValueError naming the field and how to fix it."""
    if all(k in row for k in OPENAI_KEYS):
        prompt = _messages(_field(row, "input", dict).get("messages"), "input.messages")
        chosen = _single_reply(row["preferred_output"], "preferred_output")
        rejected = _single_reply(row["non_preferred_output"], "non_preferred_output")
        return Pair(ChatExample(line, [*prompt, chosen]), ChatExample(line, [*prompt, rejected]))
    if all(k in row for k in TRL_KEYS):
        return _trl_pair(row, line)
    raise ValueError(
        "not a preference pair: give OpenAI's DPO keys "
        f"{list(OPENAI_KEYS)} or TRL's {list(TRL_KEYS)} (found {sorted(row)[:8]})"
    )


def looks_like_pairs(row: dict[str, Any]) -> bool:
    """Whether a row is meant as a preference pair (so a file is checked as one, not as chat)."""
    return "preferred_output" in row or "non_preferred_output" in row or ("chosen" in row and "rejected" in row)


def check_pairs_file(path: Path) -> tuple[int, list[Problem]]:
    """(valid pairs, every problem with its line): what the job service checks when a DPO file is uploaded."""
    count, problems = 0, []
    for item in iter_jsonl(path):
        if isinstance(item, Problem):
            problems.append(item)
            continue
        try:
            if not isinstance(item.data, dict):
                raise ValueError("each line must be one JSON object")
            parse_pair(item.data, item.line)
            count += 1
        except ValueError as exc:
            problems.append(Problem(f"{path.name}:{item.line}", str(exc), code="invalid_pair"))
    return count, problems


def _trl_pair(row: dict[str, Any], line: int) -> Pair:
    if all(isinstance(row[k], str) for k in TRL_KEYS):
        if not row["chosen"].strip() or not row["rejected"].strip():
            raise ValueError("`chosen` and `rejected` must not be empty")
        return Pair(
            ChatExample(line, prompt=row["prompt"], completion=row["chosen"]),
            ChatExample(line, prompt=row["prompt"], completion=row["rejected"]),
        )
    if all(isinstance(row[k], list) for k in TRL_KEYS):
        prompt = _messages(row["prompt"], "prompt")
        chosen = _single_reply(row["chosen"], "chosen")
        rejected = _single_reply(row["rejected"], "rejected")
        return Pair(ChatExample(line, [*prompt, chosen]), ChatExample(line, [*prompt, rejected]))
    raise ValueError("`prompt`, `chosen` and `rejected` must all be strings or all be lists of messages")


def _field(row: dict[str, Any], key: str, kind: type) -> Any:
    value = row[key]
    if not isinstance(value, kind):
        raise ValueError(f"`{key}` must be a {'JSON object' if kind is dict else kind.__name__}")
    return value


def _messages(value: Any, where: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"`{where}` must be a non-empty list of messages")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"`{where}[{i}]` must be {{'role': one of {list(ROLES)}, 'content': a string}}")
        messages.append(Message(m["role"], m["content"], trained=False))
    if messages[-1].role == "assistant":
        raise ValueError(f"`{where}` must end with a user message: the answers come from the output fields")
    return messages


def _single_reply(value: Any, where: str) -> Message:
    if not isinstance(value, list) or len(value) != 1:
        raise ValueError(f"`{where}` must be a list holding exactly one assistant message")
    m = value[0]
    if not isinstance(m, dict) or m.get("role") != "assistant" or not isinstance(m.get("content"), str):
        raise ValueError(f"`{where}[0]` must be {{'role': 'assistant', 'content': a string}}")
    if not m["content"].strip():
        raise ValueError(f"`{where}[0].content` is empty")
    return Message("assistant", m["content"])


def pair_rows(pairs: list[tuple[Tokenized, Tokenized]], max_len: int, packed: bool) -> list[Row]:
    """Rows of pairs: one pair a row, or (packed) as many whole pairs as fit in `max_len` tokens."""
    if not packed:
        return [_row([(index, pair)]) for index, pair in enumerate(pairs)]
    lengths = [len(a.input_ids) + len(b.input_ids) for a, b in pairs]
    return [_row([(i, pairs[i]) for i in group]) for group in best_fit(lengths, max_len)]


def _row(pairs: list[tuple[int, tuple[Tokenized, Tokenized]]]) -> Row:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    segments: list[int] = []
    for index, pair in pairs:
        for role, seq in enumerate(pair):
            ids += seq.input_ids
            labels += seq.labels
            positions += range(len(seq.input_ids))
            segments += [2 * index + role] * len(seq.input_ids)
    return Row(ids, labels, positions, segments=segments)
