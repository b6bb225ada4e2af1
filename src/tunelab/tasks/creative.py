"""Creative generation: ABC music. The prompt is a tune's header (title, metre, key), the completion its body.
Perplexity on held-out tunes, and the rate of generated tunes that are well-formed ABC (tunelab.abc)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from tunelab.abc import check_tune, well_formed_rate
from tunelab.data.formats import ChatExample
from tunelab.tasks.generative import GenerativeTask, Item
from tunelab.tasks.registry import ScenarioInfo, register_scenario

if TYPE_CHECKING:
    from tunelab.config import JobSpec


class CreativeTask(GenerativeTask):
    name = "creative"
    max_new_tokens = 256
    required = ("prompt", "completion")
    # Greedy decoding of a small model falls into loops (a header line repeated to the end) that say nothing about
    # what it learned; tunes are sampled, as music generation is used, seeded by train.seed.
    sampling: ClassVar[dict[str, float]] = {"temperature": 0.8, "top_p": 0.95}

    def parse(self, row: dict[str, Any], line: int, spec: JobSpec) -> Item:
        prompt, completion = row["prompt"], row["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
            raise ValueError("`prompt` and `completion` must be strings, the completion not empty")
        # The prompt is a plain-text header, not a chat turn: the model learns to continue ABC.
        return Item(ChatExample(line, prompt=prompt, completion=completion), prompt)

    def score(self, outputs: list[str], items: list[Item], spec: JobSpec) -> tuple[dict[str, float], dict[str, Any]]:
        tunes = [str(i.reference) + o for o, i in zip(outputs, items, strict=True)]
        reasons = [check_tune(t) for t in tunes]
        return {"abc_well_formed": well_formed_rate(tunes)}, {"abc_problems": [r for r in reasons if r][:10]}


register_scenario(ScenarioInfo(CreativeTask.name, CreativeTask))
