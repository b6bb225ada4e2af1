"""Classification heads (`task.approach: head`) for the classification and ner scenarios, on the tiny Llama:
end to end through run_job (the loss falls; metrics come from the head's argmax; the adapter and the merged model
reload with the AutoModelFor*Classification class and compute what the trained model computed), label alignment,
loss normalisation, the methods that can train a head, and the config errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from rich.console import Console
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer
from typer.testing import CliRunner

from tunelab import recipe
from tunelab.cli import app
from tunelab.config import JobSpec, MethodSpec, load_spec
from tunelab.data.packing import collate, loss_items
from tunelab.data.render import IGNORE
from tunelab.errors import ConfigError
from tunelab.export.merge import save_adapter, save_merged
from tunelab.methods import apply_method, get_method, method_names
from tunelab.metrics import entity_metrics
from tunelab.models import ModelSource, load_tokenizer
from tunelab.tasks import TaskData, get_task
from tunelab.tasks.classification_head import ClassificationHeadTask, Text
from tunelab.tasks.heads import load_head_model, start_token
from tunelab.tasks.ner import NerTask
from tunelab.tasks.ner_head import NerHeadTask, Sentence, align_labels, bio_labels, encode_words
from tunelab.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
HEAD_CLASS: dict[str, Any] = {
    "classification": AutoModelForSequenceClassification,
    "ner": AutoModelForTokenClassification,
}
PEFT_CLASS = {"classification": "PeftModelForSequenceClassification", "ner": "PeftModelForTokenClassification"}
HEAD_METHODS = [m for m in method_names() if not (get_method(m).prompt_learning or get_method(m).quantized)]


def _slice(src: Path, dst: Path, n: int) -> Path:
    dst.write_text("\n".join(src.read_text(encoding="utf-8").splitlines()[:n]) + "\n", encoding="utf-8")
    return dst


def _spec(tmp_path: Path, model_dir: Path, scenario: str, *overrides: str) -> JobSpec:
    data = ROOT / "data" / scenario
    base = {
        "model": {"name": str(model_dir)},
        "method": {"name": "lora", "r": 8, "alpha": 16},
        "task": {"scenario": scenario, "approach": "head"},
        "data": {
            "train": str(_slice(data / "train.jsonl", tmp_path / "train.jsonl", 48)),
            "validation": str(_slice(data / "validation.jsonl", tmp_path / "val.jsonl", 12)),
        },
        "train": {"max_steps": 12, "batch_size": 4, "lr": 5.0e-3, "max_seq_len": 96},
        "eval": {"samples": 2},
        "output_dir": str(tmp_path / "run"),
    }
    return load_spec(None, list(overrides), base=base)


def _prepared(spec: JobSpec) -> tuple[Any, TaskData, Any]:
    """The task, its data and the tokenizer, as run_job prepares them."""
    tokenizer = load_tokenizer(ModelSource(str(spec.model.name)))
    task = get_task(spec.task.scenario, spec.task.approach)
    return task, task.prepare(spec, tokenizer), tokenizer


def _inputs(data: TaskData, pad_id: int) -> dict[str, torch.Tensor]:
    batch = collate(data.val_rows[:6], pad_id, packed=False)
    del batch["labels"]
    return batch


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        logits: torch.Tensor = model(**inputs, use_cache=False).logits
    return logits


def _base_classifier(scenario: str, model_dir: Path, labels: list[str], pad_id: int) -> Any:
    """The base model with the head as a user would load it for the adapter."""
    return HEAD_CLASS[scenario].from_pretrained(
        model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)), pad_token_id=pad_id
    )


# -- end to end -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", list(HEAD_CLASS))
def test_head_trains_scores_saves_and_reloads(
    scenario: str, tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _spec(tmp_path, tiny_llama_dir, scenario)
    task, data, tokenizer = _prepared(spec)
    inputs = _inputs(data, tokenizer.pad_token_id)
    in_memory: dict[str, torch.Tensor] = {}

    def save_and_probe(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Path:
        in_memory["logits"] = _logits(model, inputs)  # the trained model, as evaluated, before it is saved
        return save_adapter(model, *args, **kwargs)

    monkeypatch.setattr(recipe, "save_adapter", save_and_probe)
    summary = recipe.run_job(spec, console=Console(quiet=True))

    assert summary.after["loss"] < summary.before["loss"]

    base = _base_classifier(scenario, tiny_llama_dir, task.labels, tokenizer.pad_token_id)
    adapter = PeftModel.from_pretrained(base, tmp_path / "run/adapter")
    assert type(adapter).__name__ == PEFT_CLASS[scenario]
    torch.testing.assert_close(_logits(adapter, inputs), in_memory["logits"], atol=1e-6, rtol=0)

    merged = HEAD_CLASS[scenario].from_pretrained(tmp_path / "run/merged")
    assert merged.config.id2label == dict(enumerate(task.labels))
    torch.testing.assert_close(_logits(merged, inputs), in_memory["logits"], atol=1e-4, rtol=0)

    # The reported metrics are those of the head's argmax: recomputed here one unpadded example at a time.
    if scenario == "classification":
        texts = [t for t in data.val_items if isinstance(t, Text)]
        predicted = [_classify(adapter, tokenizer, t.text, task.labels) for t in texts]
        accuracy = sum(p == t.label for p, t in zip(predicted, texts, strict=True)) / len(texts)
        assert summary.after["accuracy"] == pytest.approx(accuracy)
        assert {k for k in summary.after if not k.endswith("_seconds")} == {"loss", "accuracy", "macro_f1"}
        assert "Confusion matrix" in (tmp_path / "run/report.html").read_text(encoding="utf-8")
    else:
        sentences = [s for s in data.val_items if isinstance(s, Sentence)]
        predicted_tags = [_tag(adapter, tokenizer, s.tokens, task.labels) for s in sentences]
        expected = entity_metrics(predicted_tags, [s.tags for s in sentences])
        scores = {k: v for k, v in summary.after.items() if not k.endswith("_seconds")}  # not the phase times
        assert scores == pytest.approx({"loss": summary.after["loss"], **expected})
        before = json.loads((tmp_path / "run/eval_before.json").read_text())
        assert before["metrics"]["entity_precision"] > 0  # a random head tags entities: the metric sees them


def _classify(model: torch.nn.Module, tokenizer: Any, text: str, labels: list[str]) -> str:
    ids = torch.tensor([[start_token(tokenizer), *tokenizer(text, add_special_tokens=False)["input_ids"]]])
    return labels[int(_logits(model, {"input_ids": ids})[0].argmax())]


def _tag(
    model: torch.nn.Module, tokenizer: Any, words: list[str], labels: list[str], repeat: bool = False
) -> list[str]:
    ids, word_ids = encode_words(words, tokenizer, repeat=repeat)
    logits = _logits(model, {"input_ids": torch.tensor([ids])})[0]
    first = {w: i for i, w in reversed(list(enumerate(word_ids))) if w is not None}  # each word's first sub-token
    return [labels[int(logits[first[w]].argmax())] for w in range(len(words))]


def test_pissa_head_adapter_reloads_on_the_original_base(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """PiSSA rewrites the base while it trains; the saved adapter is converted to apply to the untouched one."""
    spec = _spec(tmp_path, tiny_llama_dir, "classification", "method.name=pissa", "train.max_steps=3")
    task, data, tokenizer = _prepared(spec)
    recipe.run_job(spec, console=Console(quiet=True))
    inputs = _inputs(data, tokenizer.pad_token_id)
    base = _base_classifier("classification", tiny_llama_dir, task.labels, tokenizer.pad_token_id)
    adapter = PeftModel.from_pretrained(base, tmp_path / "run/adapter")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run/merged")
    torch.testing.assert_close(_logits(adapter, inputs), _logits(merged, inputs), atol=1e-4, rtol=0)


def test_tunelab_eval_scores_the_head_adapter_and_merged_model(tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec = _spec(tmp_path, tiny_llama_dir, "classification", "train.max_steps=4")
    summary = recipe.run_job(spec, console=Console(quiet=True))
    spec_file = tmp_path / "run/spec.yaml"
    for tuned in ("adapter", "merged"):
        out = tmp_path / f"eval-{tuned}"
        result = CliRunner().invoke(
            app, ["eval", str(spec_file), "--adapter", str(tmp_path / "run" / tuned), "--out", str(out)]
        )
        assert result.exit_code == 0, result.output
        assert f"{summary.after['loss']:.4g}" in (out / "report.html").read_text(encoding="utf-8")


# -- methods ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [m for m in HEAD_METHODS if m != "pissa"])  # pissa: its own test above
@pytest.mark.parametrize("scenario", list(HEAD_CLASS))
def test_method_trains_the_head_and_reloads_exactly(
    name: str, scenario: str, tiny_llama_dir: Path, tiny_tokenizer_dir: Path, tmp_path: Path
) -> None:
    labels = ["O", "B-x", "I-x"]
    head = "sequence" if scenario == "classification" else "token"
    source = ModelSource(str(tiny_llama_dir))
    torch.manual_seed(0)
    settings = {"dropout": 0.0} if "dropout" in get_method(name).settings else {}
    model = apply_method(
        load_head_model(source, head, labels, pad_id=2), MethodSpec.model_validate(settings | {"name": name})
    )
    score = [n for n, p in model.named_parameters() if p.requires_grad and "score" in n]
    assert score, f"{name}: the new head must train"
    with torch.no_grad():  # a trained-looking update: fresh adapters are the identity
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.05 * torch.randn_like(p))
    inputs = {"input_ids": torch.tensor([[0, 5, 6, 7, 8], [0, 9, 10, 2, 2]])}
    inputs["attention_mask"] = (inputs["input_ids"] != 2).long()
    expected = _logits(model, inputs)
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    save_adapter(model, tokenizer, tmp_path / "adapter")
    if get_method(name).peft:
        reloaded = PeftModel.from_pretrained(
            _base_classifier(scenario, tiny_llama_dir, labels, 2), tmp_path / "adapter"
        )
    else:
        reloaded = HEAD_CLASS[scenario].from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded, inputs), expected, atol=1e-6, rtol=0)
    save_merged(model, tokenizer, tmp_path / "merged")
    merged = HEAD_CLASS[scenario].from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(merged, inputs), expected, atol=1e-4, rtol=0)


def test_head_loss_is_normalised_over_the_whole_step(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Two micro-batches of 2 must give the step the loss (and update) of one batch of 4: the loop divides by the
    labelled items of the whole step, and the head's loss follows it."""
    losses, weights = [], []
    for batch_size, accum in ((4, 1), (2, 2)):
        spec = _spec(tmp_path, tiny_llama_dir, "classification", f"train.batch_size={batch_size}")
        spec.train.grad_accum, spec.train.max_steps, spec.method.dropout = accum, 1, 0.0
        task, data, tokenizer = _prepared(spec)
        torch.manual_seed(0)
        model = apply_method(task.load_model(ModelSource(str(tiny_llama_dir))), spec.method)
        result = train(
            model,
            data.train_rows,
            pad_id=tokenizer.pad_token_id,
            packed=False,
            train_spec=spec.train,
            ckpt_spec=spec.checkpoints,
            out_dir=tmp_path / f"run-{accum}",
        )
        losses.append(result.state.history[0]["loss"])
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    torch.testing.assert_close(weights[1], weights[0], atol=1e-6, rtol=0)


# -- label alignment and batches ----------------------------------------------------------------------------------


def test_align_labels_hand_computed() -> None:
    # start token, "New" in two pieces, "York" in one, "rocks" in three; labels B-loc=1, I-loc=2, O=0.
    word_ids = [None, 0, 0, 1, 2, 2, 2]
    assert align_labels(word_ids, [1, 2, 0]) == [IGNORE, 1, IGNORE, 2, 0, IGNORE, IGNORE]
    # A word id that repeats after another word starts a new label (it is a new word).
    assert align_labels([0, 1, 1, 0], [5, 6]) == [5, 6, IGNORE, 5]
    assert bio_labels([["O", "B-person", "I-person"], ["B-location", "O"]]) == [
        "O",
        "B-location",
        "I-location",
        "B-person",
        "I-person",
    ]


def test_words_tokenize_as_the_plain_sentence(tiny_tokenizer_dir: Path) -> None:
    """Each word's sub-tokens are those of the sentence as plain text, and word_ids() maps them back to it."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    words = ["New", "York", "isn't", "HoveLive", "!", "http://fb.me/v5CUZkEY"]
    ids, word_ids = encode_words(words, tokenizer)
    assert ids[0] == tokenizer.bos_token_id and word_ids[0] is None
    assert ids[1:] == tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    for index, word in enumerate(words):
        pieces = [ids[i] for i, w in enumerate(word_ids) if w == index]
        assert tokenizer.decode(pieces) == (word if index == 0 else f" {word}")


@pytest.mark.parametrize("context", ["left", "repeat"])
def test_ner_rows_label_each_word_once(context: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec = _spec(tmp_path, tiny_llama_dir, "ner", "train.max_seq_len=512", f"task.context={context}")
    task, data, tokenizer = _prepared(spec)
    assert isinstance(task, NerHeadTask)
    sentences = [s for s in data.val_items if isinstance(s, Sentence)]
    for row, sentence in zip(data.val_rows, sentences, strict=True):
        labelled = [task.labels[label] for label in row.labels if label != IGNORE]
        assert labelled == sentence.tags and row.labels[0] == IGNORE
    batch = collate(data.val_rows[:4], tokenizer.pad_token_id, packed=False)
    assert loss_items(batch["labels"]) == sum(len(s.tokens) for s in sentences[:4])  # the loop's count is exact


def test_repeat_context_tags_the_second_copy(tiny_tokenizer_dir: Path) -> None:
    """`task.context: repeat`: the row is the sentence twice; only the second copy's sub-tokens map to words, so
    each word is tagged where the whole sentence has been read."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    words = ["Paris", "Hilton", "isn't", "in", "Paris"]
    ids, word_ids = encode_words(words, tokenizer, repeat=True)
    assert ids[1:] == tokenizer(" ".join(words + words), add_special_tokens=False)["input_ids"]
    second = next(i for i, w in enumerate(word_ids) if w is not None)
    assert set(word_ids[:second]) == {None} and None not in word_ids[second:]
    assert tokenizer.decode(ids[1:second]) == " ".join(words)
    for index, word in enumerate(words):
        pieces = [ids[i] for i, w in enumerate(word_ids) if w == index]
        assert tokenizer.decode(pieces) == f" {word}"  # the second copy's words all follow a space


def test_o_weight_scales_the_o_tag_in_the_training_loss(tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec = _spec(tmp_path, tiny_llama_dir, "ner", "task.o_weight=0.25")
    task, data, tokenizer = _prepared(spec)
    model = task.load_model(ModelSource(str(tiny_llama_dir))).eval()
    batch = collate(data.train_rows[:4], tokenizer.pad_token_id, packed=False)
    n = loss_items(batch["labels"])
    with torch.no_grad():
        out = model(**batch, num_items_in_batch=n, use_cache=False)
    labels = batch["labels"].flatten()
    keep = labels != IGNORE
    terms = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1)[keep], labels[keep], reduction="none")
    weights = torch.where(labels[keep] == task.labels.index("O"), 0.25, 1.0)
    assert 0 < int((labels[keep] != 0).sum()) < n  # both O and entity tags in the batch: the weight shows
    assert float(out.loss) == pytest.approx(float((terms * weights).sum() / n), rel=1e-5)
    assert float(out.loss) < float(terms.sum() / n) * 0.9


def test_ner_head_with_repeat_context_and_balancing_scores_what_it_predicts(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """A run with every NER setting on: its reported metrics are the adapter's tags read on the second copy,
    recomputed here one sentence at a time."""
    settings = ["task.context=repeat", "task.o_weight=0.5", "task.entity_oversample=2.5", "train.max_steps=6"]
    settings.append("train.max_seq_len=512")  # no sentence cut: the recomputation below reads every word
    spec = _spec(tmp_path, tiny_llama_dir, "ner", *settings)
    task, data, tokenizer = _prepared(spec)
    summary = recipe.run_job(spec, console=Console(quiet=True))
    base = _base_classifier("ner", tiny_llama_dir, task.labels, tokenizer.pad_token_id)
    adapter = PeftModel.from_pretrained(base, tmp_path / "run/adapter")
    sentences = [s for s in data.val_items if isinstance(s, Sentence)]
    predicted = [_tag(adapter, tokenizer, s.tokens, task.labels, repeat=True) for s in sentences]
    scores = {k: v for k, v in summary.after.items() if not k.endswith("_seconds")}
    assert scores == pytest.approx(
        {"loss": summary.after["loss"], **entity_metrics(predicted, [s.tags for s in sentences])}
    )


def test_classification_rows_carry_one_label(tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec = _spec(tmp_path, tiny_llama_dir, "classification", "train.max_seq_len=12")
    task, data, tokenizer = _prepared(spec)
    assert isinstance(task, ClassificationHeadTask) and task.labels == ["negative", "positive"]
    batch = collate(data.train_rows[:4], tokenizer.pad_token_id, packed=False)
    assert batch["labels"].shape == (4,) and loss_items(batch["labels"]) == 4
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert max(len(r.input_ids) for r in data.train_rows) == 12
    assert any("truncated" in w for w in data.warnings)


# -- config ---------------------------------------------------------------------------------------------------------


def test_head_is_refused_for_other_scenarios(tmp_path: Path) -> None:
    train = ROOT / "data/translation/train.jsonl"
    with pytest.raises(ConfigError) as exc:
        load_spec(None, ["task.scenario=translation", "task.approach=head", f"data.train={train}"])
    (problem,) = exc.value.problems
    assert problem.where == "task.approach" and "'translation'" in problem.message
    assert "classification and ner" in problem.message


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "qlora"])
def test_head_is_refused_for_methods_that_cannot_train_it(method: str) -> None:
    train = ROOT / "data/classification/train.jsonl"
    with pytest.raises(ConfigError) as exc:
        load_spec(
            None, ["task.scenario=classification", "task.approach=head", f"method.name={method}", f"data.train={train}"]
        )
    message = str(exc.value)
    assert "task.approach" in message and repr(method) in message and "lora" in message


@pytest.mark.parametrize(
    ("overrides", "field", "expected"),
    [
        (
            ["task.approach=generative", "task.o_weight=0.5"],
            "task",
            "o_weight apply to scenario ner with approach head",
        ),
        (["task.context=repeat", "task.approach=generative"], "task", "context apply to scenario ner with approach"),
        (["task.scenario=classification", "task.entity_oversample=3"], "task", "entity_oversample applies to"),
        (["task.o_weight=0"], "task.o_weight", "greater than 0"),
        (["task.entity_oversample=0.5"], "task.entity_oversample", "greater than or equal to 1"),
        (["task.context=both"], "task.context", "'left' or 'repeat'"),
    ],
)
def test_ner_settings_are_checked(overrides: list[str], field: str, expected: str) -> None:
    train = ROOT / "data/ner/train.jsonl"
    with pytest.raises(ConfigError) as exc:
        load_spec(None, ["task.scenario=ner", "task.approach=head", f"data.train={train}", *overrides])
    (problem,) = exc.value.problems
    assert problem.where == field and expected in problem.message


def test_head_rows_are_padded_not_packed() -> None:
    train = ROOT / "data/ner/train.jsonl"
    head = ["task.scenario=ner", "task.approach=head", f"data.train={train}"]
    assert load_spec(None, head).packing is False
    with pytest.raises(ConfigError, match=r"train\.packing is true but task\.approach is 'head'"):
        load_spec(None, [*head, "train.packing=true"])


def test_head_run_resumes_exactly(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The head (trained in full next to the adapter) is in the checkpoint: stop + resume = one uninterrupted run."""
    runs = {}
    for name, stop in (("whole", None), ("stopped", 2)):
        (tmp_path / name).mkdir()
        spec = _spec(tmp_path / name, tiny_llama_dir, "ner", "train.max_steps=4")
        first = recipe.run_job(spec, console=Console(quiet=True), stop_after=stop)
        runs[name] = recipe.run_job(spec, resume=True, console=Console(quiet=True)) if first.interrupted else first
    assert runs["stopped"].steps == 4

    def scores(metrics: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in metrics.items() if not k.endswith("_seconds")}  # phase times differ run to run

    assert scores(runs["stopped"].after) == pytest.approx(scores(runs["whole"].after), rel=1e-6)


def test_entity_oversample_repeats_the_sentences_with_entities(tmp_path: Path) -> None:
    """Both approaches read NER data through NerTask.split: with entity_oversample 2.5 each sentence with an entity
    appears 2 or 3 times (half of them 3), the others once; validation is never resampled."""
    data = ROOT / "data/ner"
    files = [
        f"data.train={_slice(data / 'train.jsonl', tmp_path / 'train.jsonl', 60)}",
        f"data.validation={_slice(data / 'validation.jsonl', tmp_path / 'val.jsonl', 10)}",
    ]
    plain_train, plain_val = NerTask().split(load_spec(None, ["task.scenario=ner", *files]))
    task = NerTask()
    train, val = task.split(load_spec(None, ["task.scenario=ner", "task.entity_oversample=2.5", *files]))
    rich = sum(any(t != "O" for t in i.reference[1]) for i in plain_train)
    assert 0 < rich < len(plain_train) and len(val) == len(plain_val)
    assert len(train) == len(plain_train) - rich + round(2.5 * rich)
    copies = Counter(id(i) for i in train)
    by_kind = Counter(
        (any(t != "O" for t in i.reference[1]), copies[id(i)]) for i in {id(i): i for i in train}.values()
    )
    assert by_kind[(False, 1)] == len(plain_train) - rich
    assert by_kind[(True, 2)] + by_kind[(True, 3)] == rich and abs(by_kind[(True, 3)] - rich / 2) <= 1
    assert f"sentences with entities x2.5: {rich} -> {round(2.5 * rich)} rows" in task.sources
