"""Extractive question answering (SQuAD format), trained generatively: the model answers with a span of the
context. Exact match and F1 with SQuAD's normalisation. Every answer must be in its context at its offset."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tunelab.metrics import squad_metrics
from tunelab.tasks.generative import GenerativeTask, Item, instructed
from tunelab.tasks.registry import ScenarioInfo, register_scenario

if TYPE_CHECKING:
    from tunelab.config import JobSpec


class QaTask(GenerativeTask):
    name = "qa"
    max_new_tokens = 24
    required = ("context", "question", "answers")

    def parse(self, row: dict[str, Any], line: int, spec: JobSpec) -> Item:
        context, question, answers = row["context"], row["question"], row["answers"]
        if not isinstance(context, str) or not isinstance(question, str):
            raise ValueError("`context` and `question` must be strings")
        texts = _check_answers(answers, context)
        system = spec.task.instruction or "Answer the question with a short span copied from the context."
        user = f"Context: {context}\n\nQuestion: {question}"
        return Item(instructed(line, system, user, texts[0]), texts)

    def score(self, outputs: list[str], items: list[Item], spec: JobSpec) -> tuple[dict[str, float], dict[str, Any]]:
        return squad_metrics(outputs, [list(i.reference) for i in items]), {}


def _check_answers(answers: Any, context: str) -> list[str]:
    """SQuAD's `answers: {text: [...], answer_start: [...]}`, each text found in the context at its offset."""
    if not isinstance(answers, dict) or not isinstance(answers.get("text"), list) or not answers["text"]:
        raise ValueError('`answers` must be {"text": [str, ...], "answer_start": [int, ...]}')
    texts, starts = answers["text"], answers.get("answer_start", [])
    if len(starts) != len(texts):
        raise ValueError("`answers.answer_start` needs one offset per answer text")
    for text, start in zip(texts, starts, strict=True):
        if not isinstance(text, str) or not isinstance(start, int) or context[start : start + len(text)] != text:
            found = context.find(text) if isinstance(text, str) else -1
            hint = f" (it is at {found})" if found >= 0 else " (it is not in the context)"
            raise ValueError(f"answer {text!r} is not at offset {start} of the context{hint}")
    return [str(t) for t in texts]


register_scenario(ScenarioInfo(QaTask.name, QaTask))
