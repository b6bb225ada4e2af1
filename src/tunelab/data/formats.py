"""Row formats for the chat scenario, and the conversion of each row to one typed example.

- messages (OpenAI chat fine-tuning): {"messages": [{"role": ..., "content": ..., "weight": 0|1}, ...]}
- prompt_completion: {"prompt": str, "completion": str}
- alpaca: {"instruction": str, "input": str (optional, may be empty), "output": str, "system": str (optional)}
- sharegpt: {"conversations": [{"from": "human"|"gpt"|"system"|"user"|"assistant", "value": str}, ...]}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Format = Literal["messages", "prompt_completion", "alpaca", "sharegpt"]
ROLES = ("system", "user", "assistant")
# ShareGPT's speaker names as chat roles; `user`/`assistant` appear too in files converted from OpenAI's format.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    trained: bool = True  # OpenAI's `weight`: 0 leaves an assistant message out of the loss


@dataclass(frozen=True)
class ChatExample:
    """One training example: a conversation, or a prompt and its completion."""

    line: int
    messages: list[Message] = field(default_factory=list)
    prompt: str = ""
    completion: str = ""

    @property
    def is_conversation(self) -> bool:
        return bool(self.messages)


def detect_format(row: dict[str, Any]) -> Format | None:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    return None


def to_example(row: dict[str, Any], line: int, fmt: Format) -> ChatExample:
    """Convert a row already checked by `tunelab.data.validate` into a ChatExample."""
    if fmt == "prompt_completion":
        return ChatExample(line, prompt=row["prompt"], completion=row["completion"])
    if fmt == "alpaca":
        return ChatExample(line, messages=_alpaca_messages(row))
    if fmt == "sharegpt":
        turns = row["conversations"]
        return ChatExample(line, messages=[Message(SHAREGPT_ROLES[t["from"]], t["value"]) for t in turns])
    messages = [
        Message(m["role"], m["content"], trained=m["role"] == "assistant" and m.get("weight", 1) == 1)
        for m in row["messages"]
    ]
    return ChatExample(line, messages=messages)


def _alpaca_messages(row: dict[str, Any]) -> list[Message]:
    # Alpaca's own template puts the input after the instruction; a chat template needs them in one user turn.
    extra = row.get("input") or ""
    user = f"{row['instruction']}\n\n{extra}" if extra.strip() else row["instruction"]
    system = [Message("system", row["system"])] if row.get("system") else []
    return [*system, Message("user", user), Message("assistant", row["output"])]
