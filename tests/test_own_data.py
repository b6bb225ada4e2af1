"""A new user's own labelled data: validate any scenario's file, score a file alone, see evaluation progress in a
log, and read reports whose verdicts follow each metric's direction (tiny models only)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from tunelab import cli
from tunelab.cli import app
from tunelab.config import load_spec
from tunelab.data.readers import iter_jsonl
from tunelab.data.render import IGNORE
from tunelab.errors import DataError, Problem
from tunelab.models import ModelSource, load_tokenizer
from tunelab.tasks import get_task
from tunelab.train import progress

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

# One wrong row per scenario, and the words its error must contain.
BAD_ROWS = {
    "classification": ({"text": "fine", "label": ""}, "non-empty string"),
    "ner": ({"tokens": ["New", "York"], "tags": ["O", "I-location"]}, "needs its B-"),
    "qa": (
        {"context": "Paris is in France.", "question": "Where?", "answers": {"text": ["France"], "answer_start": [3]}},
        "it is at 12",
    ),
    "translation": ({"source": "Hello", "target": ""}, "non-empty strings"),
    "creative": ({"prompt": "X:1\n", "completion": ""}, "completion not empty"),
}


def _slice(scenario: str, dst: Path, n: int = 12, split: str = "validation") -> Path:
    lines = (ROOT / "data" / scenario / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dst


def _jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# -- tunelab data validate --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", list(BAD_ROWS))
def test_data_validate_checks_each_scenarios_rows_with_its_own_parser(scenario: str, tmp_path: Path) -> None:
    path = _slice(scenario, tmp_path / "data.jsonl")
    ok = runner.invoke(app, ["data", "validate", str(path), "--scenario", scenario])
    assert ok.exit_code == 0, ok.output
    assert f"{scenario} data: OK" in ok.output and "missing_messages" not in ok.output

    row, words = BAD_ROWS[scenario]
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")  # line 13
    bad = runner.invoke(app, ["data", "validate", str(path), "--scenario", scenario])
    assert bad.exit_code == 1, bad.output
    flat = " ".join(bad.output.split())
    assert "data.jsonl:13: [invalid_row]" in flat and words in flat and "NOT OK" in flat


def test_data_validate_with_a_spec_checks_the_files_it_names() -> None:
    for args in (["examples/classification.yaml"], ["--spec", "examples/ner.yaml"]):
        result = runner.invoke(app, ["data", "validate", *[str(ROOT / a) if a.endswith("yaml") else a for a in args]])
        assert result.exit_code == 0, result.output
        assert "invalid_json" not in result.output and "train.jsonl" in result.output and "OK" in result.output


def test_a_repeated_column_error_is_reported_once_with_the_columns_and_the_mapping(tmp_path: Path) -> None:
    sms = tmp_path / "sms.csv"
    with sms.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["sms", "label"])
        writer.writerows([f"message {i}", "spam" if i % 3 == 0 else "ham"] for i in range(40))
    result = runner.invoke(app, ["data", "validate", str(sms), "--scenario", "classification"])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(errors) == 1, result.output  # not 40 identical lines
    assert "on 40 rows (lines 2, 3, 4, ...)" in errors[0]
    assert "the file has columns ['label', 'sms']" in errors[0] and "data.columns: {text: sms}" in errors[0]

    mapped = runner.invoke(
        app, ["data", "validate", str(sms), "-s", "classification", "--set", "data.columns.text=sms"]
    )
    assert mapped.exit_code == 0, mapped.output
    # A spec's mapping is applied where training reads the rows, so validation and training agree.
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"task: {{scenario: classification}}\ndata: {{train: {sms}, columns: {{text: sms}}}}\n")
    assert runner.invoke(app, ["data", "validate", "--spec", str(spec)]).exit_code == 0
    task = get_task("classification")
    train, _ = task.split(load_spec(spec))  # type: ignore[attr-defined]
    assert train[0].example.messages[1].content.startswith("message")


def test_a_scenario_file_checked_as_chat_says_so_once_and_names_its_scenario(tmp_path: Path) -> None:
    path = _slice("classification", tmp_path / "sentiment.jsonl", n=30, split="train")
    result = runner.invoke(app, ["data", "validate", str(path)])  # no --scenario: read as chat
    assert result.exit_code == 1
    flat = [" ".join(line.split()) for line in result.output.split("error")[1:]]
    missing = [line for line in flat if "[missing_messages]" in line]
    assert len(missing) == 1, result.output  # not 30 identical lines
    assert "on 30 rows (lines 1, 2, 3, ...)" in missing[0]
    assert "the file has columns ['label', 'text'], as classification rows have" in missing[0]
    assert "--scenario classification" in missing[0]

    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 4)
    result = runner.invoke(app, ["data", "validate", str(pairs)])
    assert "as preference rows have: check it with --scenario preference" in " ".join(result.output.split())


def test_a_mapping_is_suggested_only_when_it_is_unambiguous(tmp_path: Path) -> None:
    path = _slice("ner", tmp_path / "ner.jsonl", n=5)
    result = runner.invoke(app, ["data", "validate", str(path), "--scenario", "classification"])
    flat = " ".join(result.output.split())
    assert result.exit_code == 1 and "the file has columns ['tags', 'tokens']" in flat
    assert "data.columns: {text: <column>, label: <column>}" in flat, flat  # not a guess that pairs them wrongly


def test_a_cut_off_json_line_names_the_cause(tmp_path: Path) -> None:
    path = tmp_path / "cut.jsonl"
    path.write_text('{"text": "fine", "label": "ok"}\n{"text": "the line was cut in the mid\n', encoding="utf-8")
    problems = [p for p in iter_jsonl(path) if isinstance(p, Problem)]
    assert len(problems) == 1
    assert problems[0].where == "cut.jsonl:2" and problems[0].code == "invalid_json"
    assert "unterminated string (the line may be cut off)" in problems[0].message
    assert "at at" not in str(problems[0])


def test_data_validate_with_a_model_warns_about_lengths_as_training_does(tiny_llama_dir: Path, tmp_path: Path) -> None:
    short: dict[str, object] = {
        "context": "Paris is in France.",
        "question": "Where?",
        "answers": {"text": ["France"], "answer_start": [12]},
    }
    long: dict[str, object] = {
        **short,
        "context": "Paris " * 200 + "is in France.",
        "answers": {"text": ["France"], "answer_start": [1206]},
    }
    path = _jsonl(tmp_path / "qa.jsonl", [short, short, long, short])
    args = ["data", "validate", str(path), "-s", "qa", "--model", str(tiny_llama_dir), "--max-seq-len", "160"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output  # warnings, as in training: the file is usable
    flat = " ".join(result.output.split())
    assert "qa.jsonl: 1 example(s) longer than train.max_seq_len=160 were truncated (line 3)" in flat
    assert "qa.jsonl: 1 example(s) had no trained token left after truncation and were dropped (line 3)" in flat
    assert "3 training examples: OK" in flat
    assert "lengths not checked" in runner.invoke(app, args[:5]).output


# -- unseen labels: one rule for both classification approaches -------------------------------------------------


@pytest.mark.parametrize("approach", ["generative", "head"])
def test_unseen_validation_labels_are_warned_or_refused_in_both_approaches(
    approach: str, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    train = _jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(8)])
    val = _jsonl(tmp_path / "val.jsonl", [{"text": f"v{i}", "label": "abcc"[i % 4]} for i in range(8)])
    base: dict[str, Any] = {
        "model": {"name": str(tiny_llama_dir)},
        "task": {"scenario": "classification", "approach": approach},
    }
    base["data"] = {"train": str(train), "validation": str(val)}
    tokenizer = load_tokenizer(ModelSource(str(tiny_llama_dir)))
    data = get_task("classification", approach).prepare(load_spec(None, base=base), tokenizer)
    warning = next(w for w in data.warnings if "not among the training labels" in w)
    assert warning.startswith("validation: 4 of 8 row(s) have label(s) ['c']") and "(lines 3, 4, 7, 8)" in warning
    # The generative model is scored on every row (the unseen ones count as wrong); a head has no output for them.
    assert data.n_val_examples == (8 if approach == "generative" else 4)
    with pytest.raises(DataError, match=r"\[unseen_label\].*\['c'\]"):
        spec = load_spec(None, ["data.unseen_labels=error"], base=base)
        get_task("classification", approach).prepare(spec, tokenizer)


# -- tunelab eval --data, and progress in a log ----------------------------------------------------------------


def test_eval_scores_a_file_alone_with_trainings_warnings_and_progress_lines(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)  # a line per batch, as a long run gives one every 10 s
    path = _slice("classification", tmp_path / "test.jsonl", n=12, split="test")
    args = ["eval", "--data", str(path), "-s", "classification", "-m", str(tiny_llama_dir), "--out", str(tmp_path)]
    overrides = [
        "--set",
        "eval.classification=both",
        "--set",
        "eval.generations=10",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.max_seq_len=100",
    ]
    result = runner.invoke(app, [*args, *overrides])  # CliRunner's output is not a terminal: plain lines
    assert result.exit_code == 0, result.output
    assert "warning: validation:" in result.output and "were truncated" in result.output  # as `train` prints
    assert "5 example(s) had no trained token left after truncation and were dropped" in result.output
    assert "data: 7 examples to score" in result.output
    # No loss pass: the reference answers' loss comes with the label scores, whose phase shows the progress.
    scoring = [line for line in result.output.splitlines() if line.startswith("eval base scoring:")]
    assert scoring and "examples" in scoring[-1], result.output
    assert not any(line.startswith("eval base loss:") for line in result.output.splitlines())
    assert any(line.startswith("eval base generation: 8/10 examples") for line in result.output.splitlines())
    assert "accuracy" in result.output and (tmp_path / "report.html").is_file()


def test_train_evaluation_shows_progress_in_a_log(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from io import StringIO

    from tunelab import recipe
    from tunelab.models import load_model

    val = _slice("domain", tmp_path / "val.jsonl", n=6)
    base: dict[str, Any] = {"model": {"name": str(tiny_llama_dir)}, "task": {"scenario": "domain"}}
    base |= {"data": {"train": str(val), "validation": str(val)}, "eval": {"samples": 2, "max_new_tokens": 4}}
    spec = load_spec(None, ["train.max_seq_len=64"], base=base)
    tokenizer = load_tokenizer(ModelSource(str(tiny_llama_dir)))
    task = get_task("domain")
    data = task.prepare(spec, tokenizer)
    log = StringIO()
    model = load_model(ModelSource(str(tiny_llama_dir)))
    recipe._evaluate(task, model, tokenizer, data, spec, Console(file=log, width=200), "before")
    lines = log.getvalue().splitlines()
    assert any(line.startswith("eval before loss: ") and "rows/s" in line for line in lines), lines
    assert any(line.startswith("eval before generation: 2/2 examples") for line in lines), lines


def test_domain_text_longer_than_a_row_is_trained_in_full(tiny_llama_dir: Path, tmp_path: Path) -> None:
    # Continued pre-training cuts a long text into rows instead of truncating it: every token is trained.
    rows = _slice("domain", tmp_path / "rows.jsonl", n=4)
    base: dict[str, Any] = {"model": {"name": str(tiny_llama_dir)}, "task": {"scenario": "domain"}}
    base |= {"data": {"train": str(rows), "validation": str(rows)}}
    spec = load_spec(None, ["train.max_seq_len=64"], base=base)
    tokenizer = load_tokenizer(ModelSource(str(tiny_llama_dir)))
    data = get_task("domain").prepare(spec, tokenizer)
    texts = [json.loads(line)["text"] for line in rows.read_text(encoding="utf-8").splitlines()]
    every_token = sum(len(tokenizer(t)["input_ids"]) for t in texts)
    trained = sum(sum(label != IGNORE for label in r.labels) for r in data.train_rows)
    assert all(len(r.input_ids) <= 64 for r in data.train_rows)
    assert every_token - len(texts) <= trained <= every_token + len(texts)  # give or take each text's BOS/EOS
    assert not any("truncated" in w for w in data.warnings)


# -- metric direction and tables --------------------------------------------------------------------------------


def test_unknown_rate_going_down_is_better_in_report_table_and_events(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tunelab.job_service.worker import _scored
    from tunelab.report import Sample, write_report

    before, after = {"loss": 2.0, "unknown_rate": 0.995}, {"loss": 1.0, "unknown_rate": 0.0}
    paths = write_report(
        tmp_path, title="t", before=before, after=after, history=[], samples=[Sample("p", "r", "b", "a")], info={}
    )
    html = paths.html.read_text(encoding="utf-8")
    row = html[html.index('data-metric="unknown_rate"') :].split("</tr>")[0]
    assert "better" in row and "worse" not in row
    cli._print_scores("before / after", ("before", "after"), before, after)
    table = capsys.readouterr().out
    assert "unknown_rate" in table and "-100.0% better" in table
    assert _scored("unknown_rate", 0.0, 0.995) == "unknown_rate 0.0000 (better)"


def test_no_empty_table_when_evaluation_was_off(capsys: pytest.CaptureFixture[str]) -> None:
    cli._print_scores("before / after", ("before", "after"), {}, {})
    printed = capsys.readouterr().out
    assert "evaluation was off" in printed and "metric" not in printed


def test_a_new_head_is_one_tunelab_line_not_a_missing_weights_table(
    tiny_llama_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tunelab.models import load_classifier

    load_classifier(ModelSource(str(tiny_llama_dir)), "sequence", ["a", "b"], 0)
    logged = [r.getMessage() for r in caplog.records if r.name.startswith(("transformers", "tunelab"))]
    assert any("a new sequence classification head with 2 labels was initialised" in m for m in logged), logged
    assert not any("MISSING" in m or "LOAD REPORT" in m for m in logged), logged


def test_every_task_judges_each_metric_in_its_declared_direction() -> None:
    """The report takes a task's lower_is_better, the terminal table and the service's events tunelab.metrics':
    they must agree, or the same faster evaluation is "better" in the terminal and "worse" in the report."""
    from tunelab.metrics import DIRECTION
    from tunelab.tasks import head_scenarios, scenario_names

    for name, approach in [(n, "generative") for n in scenario_names()] + [(n, "head") for n in head_scenarios()]:
        task = get_task(name, approach)
        wrong = [m for m, way in DIRECTION.items() if (m in task.lower_is_better) != (way == "lower")]
        assert not wrong, f"{name}/{approach}: {wrong}"


@pytest.mark.parametrize(("every_s", "shown"), [(0.0, [1, 2, 3, 4, 5]), (1e9, [5])])
def test_training_steps_show_in_a_log_at_least_every_few_seconds(
    every_s: float, shown: list[int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slow steps (5 steps of a minute each on a busy CPU) gave one line at the end of a log: time decides too."""
    from io import StringIO

    monkeypatch.setattr(progress, "PLAIN_EVERY_S", every_s)
    log = StringIO()
    with progress.ProgressReporter(5, 0, tmp_path / "metrics.jsonl", Console(file=log, width=200)) as reporter:
        for step in range(1, 6):
            reporter.update({"step": step, "loss": 1.0, "lr": 1e-4, "tokens_per_s": 10.0}, eta_s=5.0 - step)
    assert [int(line.split()[1].split("/")[0]) for line in log.getvalue().splitlines()] == shown


def test_benchmark_scoring_shows_progress_in_a_log() -> None:
    from io import StringIO

    from tunelab.benchmarks.harness import _progress

    log = StringIO()
    with _progress(Console(file=log, width=200)) as on_progress:
        for done in range(0, 101, 5):
            on_progress(done, 100)
    lines = log.getvalue().splitlines()
    # A line per tenth of the questions (not per chunk scored), the last one at the end.
    assert len(lines) == 10 and lines[-1].startswith("benchmarks: 100/100 questions scored"), lines
