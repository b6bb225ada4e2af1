"""Prompts shown as a conversation (who said what), not as the chat template's text.

A generation prompt is the template's rendering (`<|im_start|>user\\n...<|im_end|>`); the report parses it back into
turns for the template families tunelab's models use, so the page shows what the model saw (a default system
message the template adds included) without a single template token. Text in no known template (a completion
prompt, a head's input) is one plain "prompt" turn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Turn:
    role: str  # "system", "user", "assistant", or "prompt" for text outside any chat template
    content: str


# One pattern per template family: (turn regex with `role` and `content` groups, tokens allowed around the turns).
_FAMILIES: tuple[tuple[re.Pattern[str], re.Pattern[str]], ...] = (
    # ChatML: SmolLM2, Qwen, the test models.
    (re.compile(r"<\|im_start\|>(?P<role>[^\n<]+)\n(?P<content>.*?)(?:<\|im_end\|>|\Z)", re.S), re.compile(r"\s*")),
    # Llama 3.
    (
        re.compile(
            r"<\|start_header_id\|>(?P<role>[^<]+)<\|end_header_id\|>\n\n(?P<content>.*?)(?:<\|eot_id\|>|\Z)", re.S
        ),
        re.compile(r"(?:<\|begin_of_text\|>|\s)*"),
    ),
    # Phi-3.
    (
        re.compile(r"<\|(?P<role>system|user|assistant)\|>\n?(?P<content>.*?)(?:<\|end\|>|\Z)", re.S),
        re.compile(r"(?:<s>|\s)*"),
    ),
    # Gemma ("model" is the assistant).
    (
        re.compile(r"<start_of_turn>(?P<role>\w+)\n(?P<content>.*?)(?:<end_of_turn>|\Z)", re.S),
        re.compile(r"(?:<bos>|\s)*"),
    ),
)
_ROLE_NAMES = {"model": "assistant"}


def prompt_turns(text: str) -> list[Turn]:
    """The turns of a rendered prompt; the empty assistant turn a generation prompt ends with is left out."""
    for turn, between in _FAMILIES:
        turns = _parse(text, turn, between)
        if turns:
            return turns
    return [Turn("prompt", text)]


def _parse(text: str, turn: re.Pattern[str], between: re.Pattern[str]) -> list[Turn] | None:
    """Turns when the whole text is turns of this family (only `between` outside them), else None."""
    turns, at = [], 0
    for match in turn.finditer(text):
        if not between.fullmatch(text, at, match.start()):
            return None
        role = match.group("role").strip()
        turns.append(Turn(_ROLE_NAMES.get(role, role), match.group("content").strip("\n")))
        at = match.end()
    if not turns or not between.fullmatch(text, at):
        return None
    if turns[-1].role == "assistant" and not turns[-1].content.strip():
        turns.pop()  # the generation prompt's open assistant turn: the answers are shown beside it
    return turns
