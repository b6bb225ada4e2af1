"""Machine translation: source -> target in the languages the spec (or the data) names; BLEU and chrF."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tunelab.metrics import translation_metrics
from tunelab.tasks.generative import GenerativeTask, Item, instructed
from tunelab.tasks.registry import ScenarioInfo, register_scenario

if TYPE_CHECKING:
    from tunelab.config import JobSpec

LANGUAGES = {"en": "English", "es": "Spanish", "fr": "French", "de": "German", "it": "Italian", "pt": "Portuguese"}


class TranslationTask(GenerativeTask):
    name = "translation"
    max_new_tokens = 96
    required = ("source", "target")

    def parse(self, row: dict[str, Any], line: int, spec: JobSpec) -> Item:
        source, target = row["source"], row["target"]
        if not isinstance(source, str) or not isinstance(target, str) or not source.strip() or not target.strip():
            raise ValueError("`source` and `target` must be non-empty strings")
        src = _language(spec.task.source_lang or row.get("source_lang"), "source_lang")
        tgt = _language(spec.task.target_lang or row.get("target_lang"), "target_lang")
        system = spec.task.instruction or f"Translate the text from {src} to {tgt}. Answer with the translation only."
        return Item(instructed(line, system, source, target), target)

    def score(self, outputs: list[str], items: list[Item], spec: JobSpec) -> tuple[dict[str, float], dict[str, Any]]:
        return translation_metrics(outputs, [str(i.reference) for i in items]), {}


def _language(code: object, field: str) -> str:
    if not isinstance(code, str) or not code:
        raise ValueError(f"no {field}: set task.{field} in the spec or a `{field}` field in each row")
    return LANGUAGES.get(code.lower(), code)


register_scenario(ScenarioInfo(TranslationTask.name, TranslationTask))
