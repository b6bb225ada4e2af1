"""Scenario metrics, computed on real predictions. Libraries where the field has a standard one (scikit-learn,
seqeval, sacrebleu, rouge-score); SQuAD's answer normalisation and the ABC checker are written out here because
their definitions are short and exact."""

from __future__ import annotations

import collections
import re
import string
from typing import Literal

import sacrebleu
from rouge_score import rouge_scorer
from seqeval.metrics import f1_score, precision_score, recall_score
from seqeval.scheme import IOB2
from sklearn.metrics import confusion_matrix
from sklearn.metrics import f1_score as sk_f1

UNKNOWN = "<unknown>"  # a generated answer that is none of the labels

# Which way each metric improves, declared once for the report, the terminal tables and the service's events.
# A metric not listed (e.g. a benchmark's accuracy) is taken as higher-is-better.
DIRECTION: dict[str, Literal["higher", "lower"]] = {
    "loss": "lower", "perplexity": "lower", "unknown_rate": "lower", "token_accuracy": "higher",
    "accuracy": "higher", "macro_f1": "higher", "entity_precision": "higher", "entity_recall": "higher",
    "entity_f1": "higher", "bleu": "higher", "chrf": "higher", "rouge_l": "higher", "exact_match": "higher",
    "f1": "higher", "abc_well_formed": "higher", "pair_accuracy": "higher", "pair_margin": "higher",
    "generated_accuracy": "higher", "generated_macro_f1": "higher",
    # Evaluation time (tunelab.train.progress.timed): the whole evaluation and each of its phases.
    "eval_seconds": "lower", "loss_seconds": "lower", "scoring_seconds": "lower", "generation_seconds": "lower",
}  # fmt: skip
LOWER_IS_BETTER = frozenset(name for name, way in DIRECTION.items() if way == "lower")


def lower_is_better(name: str) -> bool:
    return name in LOWER_IS_BETTER


def is_timing(name: str) -> bool:
    """An evaluation phase's time (`eval_seconds`, ...): reported in tables, not a result to chart."""
    return name.endswith("_seconds")


def classification_metrics(predicted: list[str], gold: list[str], labels: list[str]) -> dict[str, float]:
    """Accuracy and macro-F1 over the known labels; answers outside them count as wrong and are reported."""
    accuracy = sum(p == g for p, g in zip(predicted, gold, strict=True)) / max(len(gold), 1)
    macro = float(sk_f1(gold, predicted, labels=labels, average="macro", zero_division=0))
    unknown = sum(p not in labels for p in predicted) / max(len(predicted), 1)
    return {"accuracy": accuracy, "macro_f1": macro, "unknown_rate": unknown}


def confusion(predicted: list[str], gold: list[str], labels: list[str]) -> list[list[int]]:
    """Rows: gold label; columns: predicted label, plus a last column for answers that are no label."""
    mapped = [p if p in labels else UNKNOWN for p in predicted]
    matrix = confusion_matrix(gold, mapped, labels=[*labels, UNKNOWN])
    return [[int(x) for x in row] for row in matrix[: len(labels)]]


def entity_metrics(predicted: list[list[str]], gold: list[list[str]]) -> dict[str, float]:
    """Entity-level precision/recall/F1 (CoNLL style, strict IOB2 spans) with seqeval."""
    kwargs = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
    return {
        "entity_precision": float(precision_score(gold, predicted, **kwargs)),
        "entity_recall": float(recall_score(gold, predicted, **kwargs)),
        "entity_f1": float(f1_score(gold, predicted, **kwargs)),
    }


def translation_metrics(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    return {
        "bleu": float(sacrebleu.corpus_bleu(hypotheses, [references]).score),
        "chrf": float(sacrebleu.corpus_chrf(hypotheses, [references]).score),
    }


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (longest common subsequence of words)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    return sum(scores) / max(len(scores), 1)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's official normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_metrics(predictions: list[str], answers: list[list[str]]) -> dict[str, float]:
    """Exact match and token F1, each the best over the gold answers, averaged (as SQuAD's evaluate-v1.1.py)."""
    em = [
        max(float(normalize_answer(p) == normalize_answer(a)) for a in golds)
        for p, golds in zip(predictions, answers, strict=True)
    ]
    f1 = [max(_token_f1(p, a) for a in golds) for p, golds in zip(predictions, answers, strict=True)]
    n = max(len(predictions), 1)
    return {"exact_match": 100 * sum(em) / n, "f1": 100 * sum(f1) / n}


def _token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)
