"""Constrained classification scoring (each label's log-likelihood as the assistant's answer), on the tiny Llama:
against a forward pass computed here by hand, and end to end through the classification task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from tiny import EOS
from tunelab.config import load_spec
from tunelab.data.render import encode_prompt, generation_prompt
from tunelab.metrics import lower_is_better
from tunelab.tasks import get_task
from tunelab.tasks.classification import ClassificationTask, label_logps
from tunelab.tasks.generative import Item, instructed
from tunelab.train.progress import timed

ROOT = Path(__file__).resolve().parents[1]
# Multi-token labels of different lengths; "pos" is a prefix of "positive" (scored with its end-of-turn token, it
# is no longer a prefix of the other's answer).
LABELS = ["pos", "positive", "neg", "negative feelings"]
TEXTS = ["I love it.", "Terrible, never again.", "It works as described.", "Meh."]


def _by_hand(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, item: Item, label: str) -> float:
    """log p(label + end-of-turn | generation prompt), one unpadded forward pass, summed token by token."""
    prompt_ids = encode_prompt(generation_prompt(item.example, tokenizer)[0], tokenizer)
    answer = tokenizer(label + EOS, add_special_tokens=False)["input_ids"]
    logits = model(input_ids=torch.tensor([prompt_ids + answer])).logits[0].double()
    logps = torch.log_softmax(logits, dim=-1)
    return sum(float(logps[len(prompt_ids) + k - 1, token]) for k, token in enumerate(answer))


def test_label_scores_match_a_forward_pass_by_hand(tiny_llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    lengths = {len(tokenizer(label, add_special_tokens=False)["input_ids"]) for label in LABELS}
    assert len(lengths) >= 3 and max(lengths) > 1  # the case really has multi-token labels of different lengths
    items = [Item(instructed(i, "Say pos or neg.", text, "pos"), "pos") for i, text in enumerate(TEXTS)]

    scores = label_logps(model, tokenizer, items, LABELS)

    with torch.no_grad():
        expected = [[_by_hand(model, tokenizer, item, label) for label in LABELS] for item in items]
    assert torch.allclose(torch.tensor(scores), torch.tensor(expected), atol=1e-3), (scores, expected)
    task = ClassificationTask()
    task.labels = LABELS
    best = [LABELS[max(range(len(LABELS)), key=row.__getitem__)] for row in expected]
    assert task.constrained(model, tokenizer, items) == best


def _spec(tmp_path: Path, model_dir: Path, mode: str) -> Any:
    lines = (ROOT / "data/classification/validation.jsonl").read_text(encoding="utf-8").splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:16]) + "\n", encoding="utf-8")
    (tmp_path / "val.jsonl").write_text("\n".join(lines[16:26]) + "\n", encoding="utf-8")
    base = {
        "model": {"name": str(model_dir)},
        "task": {"scenario": "classification"},
        "data": {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "val.jsonl")},
    }
    overrides = [f"eval.classification={mode}", "eval.generations=4", "eval.max_new_tokens=4", "eval.samples=2"]
    return load_spec(None, overrides, base=base)


@pytest.mark.parametrize("mode", ["both", "constrained"])
def test_an_untrained_model_always_answers_a_label_when_constrained(
    mode: str, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    spec = _spec(tmp_path, tiny_llama_dir, mode)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    task = get_task("classification")
    data = task.prepare(spec, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with timed() as seconds:
        evaluation = task.evaluate(model, tokenizer, data, spec)

    matrix = evaluation.details["confusion"]  # rows: gold; columns: the labels, then "no label"
    assert sum(map(sum, matrix)) == 10 and all(row[-1] == 0 for row in matrix)
    assert {"accuracy", "macro_f1", "loss"} <= set(evaluation.metrics)
    assert {"scoring_seconds", "eval_seconds"} <= set(seconds)
    assert "loss_seconds" not in seconds  # the reference answers' loss came with the label scores: no loss pass
    assert seconds["eval_seconds"] >= seconds["scoring_seconds"]
    assert all(lower_is_better(name) for name in seconds)
    if mode == "both":
        # The same random model, answering freely, names no label: the generated figures say so.
        assert evaluation.metrics["unknown_rate"] > 0.5 and "generated_accuracy" in evaluation.metrics
        assert "generation_seconds" in seconds
    else:
        generated = {"unknown_rate", "generated_accuracy", "generation_seconds"}
        assert not generated & (set(evaluation.metrics) | set(seconds))
        # Without free answers, the report's samples show the constrained predictions: labels.
        assert isinstance(task, ClassificationTask) and evaluation.samples
        assert all(s.output in task.labels for s in evaluation.samples)


def test_the_shared_prompt_path_equals_whole_sequences(tiny_llama_dir: Path) -> None:
    """Prompt-learning models take the whole-sequence path: both must give the same scores."""
    from tunelab.data.render import tokenize
    from tunelab.evaluate import _whole_sequence_logps, choice_logps
    from tunelab.tasks.classification import _answered

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    items = [Item(instructed(i, "Say pos or neg.", text, "pos"), "pos") for i, text in enumerate(TEXTS)]
    choices = [[tokenize(_answered(i.example, label), tokenizer) for label in LABELS] for i in items]
    with torch.no_grad():
        whole = _whole_sequence_logps(model, choices, tokenizer.pad_token_id, batch_size=3)
    # One batch, and batches of 2: examples are batched by prompt length (out of order) and the system prompt they
    # share runs once per batch, padding sits between it and each prompt's rest; the scores come back in order.
    assert len({len(group[0].input_ids) for group in choices}) > 2
    for batch_size in (16, 2):
        shared = choice_logps(model, choices, tokenizer.pad_token_id, batch_size=batch_size)
        assert torch.allclose(torch.tensor(shared), torch.tensor(whole), atol=1e-3), (batch_size, shared, whole)


def test_the_reference_answers_loss_comes_with_the_label_scores(tiny_llama_dir: Path) -> None:
    """The loss, perplexity and token accuracy taken from the scored reference labels equal a loss pass over the
    same examples (language_metrics on their unpacked rows)."""
    from tunelab.data.packing import Row
    from tunelab.data.render import tokenize
    from tunelab.evaluate import language_metrics

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    items = [
        Item(instructed(i, "Say pos or neg.", text, label), label)
        for i, (text, label) in enumerate(zip(TEXTS, ["pos", "neg", "positive", "negative feelings"], strict=True))
    ]
    task = ClassificationTask()
    task.labels = LABELS
    predicted, loss = task._scored(model, tokenizer, items)
    assert predicted == task.constrained(model, tokenizer, items) and loss is not None
    rows = []
    for item in items:
        t = tokenize(item.example, tokenizer)
        rows.append(Row(t.input_ids, t.labels, list(range(len(t.input_ids)))))
    expected = language_metrics(model, rows, tokenizer.pad_token_id, packed=False, batch_size=1)
    assert loss == pytest.approx(expected, rel=1e-4), (loss, expected)
