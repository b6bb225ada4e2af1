"""Creative generation: ABC music. The prompt is a tune's header (title, metre, key), the completion its body.
Perplexity on held-out tunes, and the rate of generated tunes that are well-formed and complete ABC (tunelab.abc).
Every generated tune is kept in the evaluation's details (`abc_tunes`) for `tunelab.abc_render`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from tunelab.abc import check_tune, first_tune
from tunelab.data.formats import ChatExample
from tunelab.tasks.generative import GenerativeTask, Item
from tunelab.tasks.registry import ScenarioInfo, register_scenario

if TYPE_CHECKING:
    from tunelab.config import JobSpec


class CreativeTask(GenerativeTask):
    name = "creative"
    # A tune ends with the end-of-text token trained after each body. Bodies of the bundled tunes are 270 tokens
    # (median) to 560 (the longest validation tune): 600 lets a tune end on its own rather than be cut.
    max_new_tokens = 600
    required = ("prompt", "completion")
    # Greedy decoding of a small model falls into loops (a header line repeated to the end) that say nothing about
    # what it learned; tunes are sampled, as music generation is used, seeded by train.seed. A tuned 135M model
    # still repeats a bar or two until the tokens run out instead of ending; from the 200th new token the
    # end-of-text logit grows 5 % a token (transformers' exponential_decay_length_penalty), so a tune ends where
    # the model already thinks an end possible. Measured on validation (60-step model, 16 tunes): complete tunes
    # 0 % -> 56 %; (300, 1.03) gave 50 %; a repetition penalty of 1.2 broke the ABC (0 % valid).
    sampling: ClassVar[dict[str, Any]] = {
        "temperature": 0.8,
        "top_p": 0.95,
        "exponential_decay_length_penalty": (200, 1.05),
    }

    def parse(self, row: dict[str, Any], line: int, spec: JobSpec) -> Item:
        prompt, completion = row["prompt"], row["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
            raise ValueError("`prompt` and `completion` must be strings, the completion not empty")
        # The prompt is a plain-text header, not a chat turn: the model learns to continue ABC.
        return Item(ChatExample(line, prompt=prompt, completion=completion), prompt)

    def score(self, outputs: list[str], items: list[Item], spec: JobSpec) -> tuple[dict[str, float], dict[str, Any]]:
        # The header is the prompt: the tune is the header and what follows it, up to the end of the tune.
        tunes = [first_tune(str(i.reference) + o) for o, i in zip(outputs, items, strict=True)]
        reasons = [check_tune(t, complete=True) for t in tunes]
        n = max(len(tunes), 1)
        metrics = {
            "abc_well_formed": sum(r is None for r in reasons) / n,  # well-formed and complete
            "abc_syntax_ok": sum(check_tune(t) is None for t in tunes) / n,  # well-formed, perhaps unfinished
        }
        return metrics, {"abc_problems": [r for r in reasons if r][:10], "abc_tunes": tunes}


register_scenario(ScenarioInfo(CreativeTask.name, CreativeTask))
