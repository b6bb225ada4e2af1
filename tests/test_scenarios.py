"""Every scenario's recipe end to end on the tiny model (bundled data slices), and bad data per scenario."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunelab.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
METRIC = {
    "chat": "rouge_l",
    "classification": "macro_f1",
    "ner": "entity_f1",
    "translation": "chrf",
    "qa": "f1",
    "domain": "perplexity",
    "creative": "abc_well_formed",
}


def _slice(src: Path, dst: Path, n: int) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines()[:n]
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dst


def _spec(tmp_path: Path, model_dir: Path, scenario: str, extra: str = "") -> Path:
    data = ROOT / "data" / scenario
    train = _slice(data / "train.jsonl", tmp_path / "train.jsonl", 48)
    # A random 2-layer model cannot learn extractive QA from 48 examples: its held-out loss does not fall. Scored on
    # rows it trained on, the falling loss shows that the answer spans are what it trains on.
    held_out = data / ("train.jsonl" if scenario == "qa" else "validation.jsonl")
    val = _slice(held_out, tmp_path / "val.jsonl", 12)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"model: {{name: {model_dir}}}\n"
        "method: {name: lora, r: 8, alpha: 16}\n"
        f"task: {{scenario: {scenario}{extra}}}\n"
        f"data: {{train: {train}, validation: {val}}}\n"
        "train: {max_steps: 12, batch_size: 4, lr: 5.0e-3, max_seq_len: 384}\n"
        "eval: {generations: 4, samples: 2, max_new_tokens: 12}\n"
        f"output_dir: {tmp_path / 'run'}\n",
        encoding="utf-8",
    )
    return spec


@pytest.mark.parametrize("scenario", list(METRIC))
def test_scenario_trains_and_reports_its_metric(scenario: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(_spec(tmp_path, tiny_llama_dir, scenario))])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["after"]["loss"] < summary["before"]["loss"]
    metric = METRIC[scenario]
    assert metric in summary["before"] and metric in summary["after"]
    assert summary["after"][metric] >= 0
    html = (tmp_path / "run/report.html").read_text(encoding="utf-8")
    assert metric in html
    if scenario == "classification":
        assert "Confusion matrix" in html


BAD_ROWS = {
    "classification": ({"text": "fine", "labels": "positive"}, "missing field(s) ['label']"),
    "ner": ({"tokens": ["New", "York"], "tags": ["O", "I-location"]}, "needs its B-"),
    "translation": ({"source": "Hello", "target": ""}, "non-empty strings"),
    "qa": (
        {"context": "Paris is in France.", "question": "Where?", "answers": {"text": ["Spain"], "answer_start": [0]}},
        "not in the context",
    ),
    "domain": ({"text": 42}, "non-empty string"),
    "creative": ({"prompt": "X:1\n", "completion": ""}, "completion not empty"),
}


@pytest.mark.parametrize("scenario", list(BAD_ROWS))
def test_bad_row_is_named_with_its_line(scenario: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec = _spec(tmp_path, tiny_llama_dir, scenario)
    row, message = BAD_ROWS[scenario]
    with (tmp_path / "train.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")  # line 49
    result = runner.invoke(app, ["train", str(spec)])
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert "train.jsonl:49" in flat and message in flat


def test_csv_and_parquet_readers(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tunelab.data.readers import read_records

    rows = [json.loads(x) for x in (ROOT / "data/classification/train.jsonl").read_text().splitlines()[:5]]
    csv_file = tmp_path / "data.csv"
    with csv_file.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    for path in (csv_file, tmp_path / "data.parquet"):
        got = read_records(path)
        assert [r.data for r in got] == rows
    assert [r.line for r in read_records(csv_file)] == [2, 3, 4, 5, 6]
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(Exception, match=r"unknown file type '\.txt'"):
        read_records(tmp_path / "data.txt")


def test_eval_scores_adapter_and_merged_model_like_training_did(tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec = _spec(tmp_path, tiny_llama_dir, "classification")
    assert runner.invoke(app, ["train", str(spec)]).exit_code == 0
    after = json.loads((tmp_path / "run/summary.json").read_text())["after"]
    for tuned in ("adapter", "merged"):
        out = tmp_path / f"eval-{tuned}"
        result = runner.invoke(app, ["eval", str(spec), "--adapter", str(tmp_path / "run" / tuned), "--out", str(out)])
        assert result.exit_code == 0, result.output
        html = (out / "report.html").read_text(encoding="utf-8")
        assert f"{after['loss']:.4g}" in html  # the tuned model scores what training reported
        assert (out / "report.png").is_file()


def test_sampled_generation_is_reproducible_for_a_seed(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.evaluate import generate_batch

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompts = ["X:1\nT:A tune\nM:6/8\nK:D\n", "X:2\nT:Another\nM:4/4\nK:G\n"]

    def sample(seed: int) -> list[str]:
        return generate_batch(model, tokenizer, prompts, 16, sampling={"temperature": 1.0, "seed": seed})

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)  # it does sample: another seed, other tunes
