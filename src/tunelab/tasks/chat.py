"""Chat scenario: OpenAI chat, prompt/completion, Alpaca or ShareGPT rows (JSONL or a dataset on disk); loss on
the assistant replies; ROUGE-L of the generated replies against the references."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.data.formats import detect_format, to_example
from tunelab.data.validate import load_chat_examples
from tunelab.metrics import rouge_l
from tunelab.tasks.generative import GenerativeTask, Item
from tunelab.tasks.registry import ScenarioInfo, register_scenario

if TYPE_CHECKING:
    from tunelab.config import JobSpec


class ChatTask(GenerativeTask):
    name = "chat"
    max_new_tokens = 48

    def load(self, path: Path, spec: JobSpec, split: str = "train") -> list[Item]:
        # Chat files are checked as OpenAI checks them (tunelab.data.validate), not row by row here.
        examples = load_chat_examples(path, spec.data.format, split=split)
        return [Item(e, None) for e in examples]

    def parse(self, row: dict[str, Any], line: int, spec: JobSpec) -> Item:
        """One row already checked by tunelab.data.validate (load() checks whole files first)."""
        fmt = detect_format(row)
        if fmt is None:
            raise ValueError("not a chat row: give `messages`, `prompt`/`completion`, Alpaca or ShareGPT keys")
        return Item(to_example(row, line, fmt), None)

    def score(self, outputs: list[str], items: list[Item], spec: JobSpec) -> tuple[dict[str, float], dict[str, Any]]:
        references = [_last_answer(i) for i in items]
        return {"rouge_l": rouge_l(outputs, references)}, {}


def _last_answer(item: Item) -> str:
    example = item.example
    if not example.is_conversation:
        return example.completion
    return [m.content for m in example.messages if m.role == "assistant"][-1]


register_scenario(ScenarioInfo(ChatTask.name, ChatTask))
