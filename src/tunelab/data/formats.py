"""Row formats for the chat scenario, and the conversion of each row to one typed example.

- messages (OpenAI chat fine-tuning): {"messages": [{"role": ..., "content": ..., "weight": 0|1}, ...]}
- prompt_completion: {"prompt": str, "completion": str}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Format = Literal["messages", "prompt_completion"]
ROLES = ("system", "user", "assistant")


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
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    return None


def to_example(row: dict[str, Any], line: int, fmt: Format) -> ChatExample:
    """Convert a row already checked by `tunelab.data.validate` into a ChatExample."""
    if fmt == "prompt_completion":
        return ChatExample(line, prompt=row["prompt"], completion=row["completion"])
    messages = [
        Message(m["role"], m["content"], trained=m["role"] == "assistant" and m.get("weight", 1) == 1)
        for m in row["messages"]
    ]
    return ChatExample(line, messages=messages)
