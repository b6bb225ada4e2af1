"""Each scenario metric against cases computed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.abc import check_tune, well_formed_rate
from tunelab.metrics import (
    classification_metrics,
    confusion,
    entity_metrics,
    normalize_answer,
    rouge_l,
    squad_metrics,
    translation_metrics,
)
from tunelab.tasks.classification import _to_label
from tunelab.tasks.ner import check_bio, entities_text, to_tags

ROOT = Path(__file__).resolve().parents[1]


def test_classification_by_hand() -> None:
    gold = ["pos", "pos", "neg", "neg"]
    predicted = ["pos", "neg", "neg", "maybe"]  # 2 right; "maybe" is no label
    m = classification_metrics(predicted, gold, ["neg", "pos"])
    assert m["accuracy"] == 0.5 and m["unknown_rate"] == 0.25
    # pos: P=1/1, R=1/2 -> F1 2/3; neg: P=1/2, R=1/2 -> F1 1/2; macro = 7/12
    assert m["macro_f1"] == pytest.approx(7 / 12)
    assert confusion(predicted, gold, ["neg", "pos"]) == [[1, 0, 1], [1, 1, 0]]


def test_generated_label_mapping() -> None:
    labels = ["negative", "positive"]
    assert _to_label("Positive.", labels) == "positive"
    assert _to_label("The sentiment is negative", labels) == "negative"
    assert _to_label("positive or negative", labels) not in labels  # ambiguous: scored as wrong, not guessed


def test_entity_metrics_by_hand() -> None:
    gold = [["B-person", "I-person", "O", "B-location"]]
    predicted = [["B-person", "I-person", "O", "O"]]  # 1 of 2 entities found, no false positive
    m = entity_metrics(predicted, gold)
    assert (m["entity_precision"], m["entity_recall"]) == (1.0, 0.5)
    assert m["entity_f1"] == pytest.approx(2 / 3)


def test_ner_answers_round_trip_through_tags() -> None:
    tokens = ["Marvin", "Gaye", "sang", "in", "Paris"]
    tags = ["B-person", "I-person", "O", "O", "B-location"]
    answer = entities_text(tokens, tags)
    assert answer == "person: Marvin Gaye\nlocation: Paris"
    assert to_tags(answer, tokens) == tags
    assert to_tags("none", tokens) == ["O"] * 5
    assert to_tags("person: Nobody Here\ngarbage line", tokens) == ["O"] * 5


@pytest.mark.parametrize(("tags", "message"), [(["O", "I-person"], "needs its B-"), (["X-person"], "is not O")])
def test_bio_errors(tags: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_bio(tags)


def test_translation_metrics() -> None:
    refs = ["el gato está en la casa", "hola mundo"]
    assert translation_metrics(refs, refs) == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0)}
    worse = translation_metrics(["el perro está en la calle", "adiós"], refs)
    assert 0 < worse["chrf"] < 100 and worse["bleu"] < 50


def test_rouge_l_by_hand() -> None:
    # LCS("a b c d", "a c d e") = "a c d": P = R = 3/4 -> F = 0.75
    assert rouge_l(["a b c d"], ["a c d e"]) == pytest.approx(0.75)


def test_squad_normalisation_and_scores() -> None:
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    m = squad_metrics(["the Eiffel Tower", "in Paris France"], [["Eiffel Tower"], ["Paris"]])
    # second: pred tokens {in, paris, france}, gold {paris}: P=1/3, R=1 -> F1 = 0.5
    assert m["exact_match"] == pytest.approx(50.0)
    assert m["f1"] == pytest.approx(75.0)


def test_abc_checker_accepts_real_tunes_and_rejects_noise() -> None:
    rows = [json.loads(line) for line in (ROOT / "data/creative/validation.jsonl").open(encoding="utf-8")]
    assert well_formed_rate([r["prompt"] + r["completion"] for r in rows]) >= 0.98
    header = "X:1\nT:Test\nM:6/8\nK:D\n"
    assert check_tune(header + 'A|"D"d2d f2a|[df]2 e2:|\n') is None
    assert "not ABC" in (check_tune(header + "this is prose, not music|") or "")
    assert "K:" in (check_tune("X:1\nT:Test\nM:6/8\nabc|") or "")
    assert "notes and bar lines" in (check_tune(header + "z6 z6") or "")
