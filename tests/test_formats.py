"""The data people bring: Alpaca and ShareGPT chat rows, Hugging Face datasets on disk (save_to_disk folders,
Parquet shards), and several training files mixed by weight. Small files written here; one tiny training run."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import JobSpec, load_spec
from tunelab.data.formats import Message
from tunelab.data.mixing import shares
from tunelab.data.validate import load_chat_examples, validate_chat_file
from tunelab.errors import ConfigError, DataError
from tunelab.tasks import get_task

runner = CliRunner()


def alpaca(i: int, tag: str = "alpaca") -> dict[str, Any]:
    return {"instruction": f"{tag} question {i}", "input": "", "output": f"{tag} answer {i}"}


def sharegpt(i: int, tag: str = "sharegpt") -> dict[str, Any]:
    turns = [{"from": "system", "value": "be brief"}, {"from": "human", "value": f"{tag} question {i}"}]
    return {"conversations": [*turns, {"from": "gpt", "value": f"{tag} answer {i}"}]}


def jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def spec_for(tmp_path: Path, data: dict[str, Any], scenario: str = "chat", seed: int = 0) -> JobSpec:
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps({"task": {"scenario": scenario}, "data": data, "train": {"seed": seed}}))
    return load_spec(path)


# -- Alpaca and ShareGPT ---------------------------------------------------------------------------------------
def test_alpaca_rows_become_one_turn_conversations(tmp_path: Path) -> None:
    rows = [alpaca(0), {"instruction": "Translate", "input": "bonjour", "output": "hello", "system": "be exact"}]
    examples = load_chat_examples(jsonl(tmp_path / "a.jsonl", rows))
    assert examples[0].messages == [Message("user", "alpaca question 0"), Message("assistant", "alpaca answer 0")]
    assert examples[1].messages == [
        Message("system", "be exact"),
        Message("user", "Translate\n\nbonjour"),  # the input follows the instruction, in the same user turn
        Message("assistant", "hello"),
    ]


def test_sharegpt_roles_are_mapped(tmp_path: Path) -> None:
    rows = [sharegpt(0), {"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "yo"}]}]
    examples = load_chat_examples(jsonl(tmp_path / "s.jsonl", rows))
    assert [m.role for m in examples[0].messages] == ["system", "user", "assistant"]
    assert [m.role for m in examples[1].messages] == ["user", "assistant"]


def test_bad_alpaca_row_is_named_with_its_line(tmp_path: Path) -> None:
    rows = [alpaca(0), alpaca(1), {"instruction": "x", "output": ""}, {"instruction": "y", "input": 3, "output": "z"}]
    report = validate_chat_file(jsonl(tmp_path / "a.jsonl", rows), min_examples=1)
    assert report.format == "alpaca"
    assert [(p.where, p.code) for p in report.errors] == [
        ("a.jsonl:3", "invalid_field_type"),
        ("a.jsonl:4", "invalid_field_type"),
    ]
    assert "`output` must be a non-empty string" in report.errors[0].message


def test_unknown_sharegpt_role_names_the_line_and_the_allowed_values(tmp_path: Path) -> None:
    bad = {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "hello"}]}
    report = validate_chat_file(jsonl(tmp_path / "s.jsonl", [sharegpt(0), sharegpt(1), bad]), min_examples=1)
    problems = {(p.where, p.code): p for p in report.errors}
    assert set(problems) == {("s.jsonl:3 conversations[1]", "unknown_role"), ("s.jsonl:3", "no_assistant_message")}
    hint = problems["s.jsonl:3 conversations[1]", "unknown_role"].hint
    assert all(role in hint for role in ("human", "gpt", "system", "user", "assistant"))


def test_forced_format_refuses_other_rows(tmp_path: Path) -> None:
    report = validate_chat_file(jsonl(tmp_path / "s.jsonl", [sharegpt(0), sharegpt(1)]), "alpaca", min_examples=1)
    assert [(p.where, p.code) for p in report.errors[:2]] == [
        ("s.jsonl:1", "unknown_format"),
        ("s.jsonl:2", "unknown_format"),
    ]


def test_data_validate_reports_sharegpt_problems(tmp_path: Path) -> None:
    bad = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": " "}]}
    path = jsonl(tmp_path / "s.jsonl", [sharegpt(i) for i in range(10)] + [bad])
    result = runner.invoke(app, ["data", "validate", str(path)])
    assert result.exit_code == 1
    assert "s.jsonl:11 conversations[1]: [empty_content]" in " ".join(result.output.split())


# -- Hugging Face datasets on disk -----------------------------------------------------------------------------
def texts(n: int, split: str) -> list[dict[str, Any]]:
    return [{"text": f"{split} text {i}", "label": "pos" if i % 2 else "neg"} for i in range(n)]


def save_dict(folder: Path, splits: dict[str, list[dict[str, Any]]]) -> None:
    import datasets

    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(folder))


def test_save_to_disk_dataset_dict_gives_train_and_validation_splits(tmp_path: Path) -> None:
    folder = tmp_path / "sentiment"
    save_dict(folder, {"train": texts(6, "train"), "validation": texts(2, "validation"), "test": texts(3, "test")})
    spec = spec_for(tmp_path, {"train": str(folder), "validation": str(folder)}, "classification")
    task = get_task("classification")
    train, val = task.split(spec)
    assert len(train) == 6 and len(val) == 2  # the test split is never read
    assert "sentiment: DatasetDict split 'train', sentiment: DatasetDict split 'validation'" in task.sources


def test_save_to_disk_bad_row_is_named_with_its_row_index(tmp_path: Path) -> None:
    import datasets

    rows = [*texts(3, "train"), {"text": "no label here", "label": None}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "plain"))
    spec = spec_for(tmp_path, {"train": "plain"}, "classification")  # relative to the spec file, like a file
    with pytest.raises(DataError, match=r"plain row 3"):
        get_task("classification").split(spec)


def test_dataset_dict_without_a_train_split_says_which_folder_to_give(tmp_path: Path) -> None:
    folder = tmp_path / "two"
    save_dict(folder, {"a": texts(3, "a"), "b": texts(3, "b")})
    with pytest.raises(DataError, match=r"splits \['a', 'b'\].*point data.train at one split's folder"):
        get_task("classification").split(spec_for(tmp_path, {"train": str(folder)}, "classification"))


def test_parquet_shards_in_a_folder_or_a_glob(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "shards").mkdir()
    pq.write_table(pa.Table.from_pylist([alpaca(i) for i in range(4)]), tmp_path / "shards/part-0.parquet")
    pq.write_table(pa.Table.from_pylist([alpaca(i + 4) for i in range(4)]), tmp_path / "shards/part-1.parquet")
    for train in ("shards", "shards/*.parquet"):
        train_items, _ = get_task("chat").split(spec_for(tmp_path, {"train": train, "validation_split": 0.25}))
        assert len(train_items) == 6
    rows = [alpaca(8), {"instruction": "q", "input": None, "output": ""}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "shards/part-2.parquet")
    with pytest.raises(DataError, match=r"part-2.parquet row 1: \[invalid_field_type\] `output`"):
        get_task("chat").split(spec_for(tmp_path, {"train": "shards"}))


def test_chat_rows_from_a_saved_dataset_keep_optional_keys_optional(tmp_path: Path) -> None:
    import datasets

    # Arrow gives the message without `weight` a null one, and the Alpaca row without `input` a null input.
    messages = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 1}]}
    datasets.Dataset.from_list([messages, messages]).save_to_disk(str(tmp_path / "openai"))
    assert len(load_chat_examples(tmp_path / "openai")) == 2
    datasets.Dataset.from_list([alpaca(0), {"instruction": "q", "output": "a"}]).save_to_disk(str(tmp_path / "alp"))
    assert load_chat_examples(tmp_path / "alp")[1].messages[0] == Message("user", "q")


def test_data_validate_names_a_dataset_dicts_split_and_counts_its_rows(tmp_path: Path) -> None:
    save_dict(tmp_path / "d", {"train": texts(6, "train"), "validation": texts(2, "validation")})
    result = runner.invoke(app, ["data", "validate", str(tmp_path / "d"), "--scenario", "classification"])
    assert result.exit_code == 0, result.output
    assert "d[train] (6 rows), " in result.output and "d[validation] (2 rows): classification data: OK" in result.output


def test_a_folder_that_is_no_dataset_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither a `save_to_disk` folder"):
        get_task("chat").split(spec_for(tmp_path, {"train": "empty"}))


# -- several files mixed by weight -----------------------------------------------------------------------------
def mixed_spec(tmp_path: Path, seed: int = 0, weights: tuple[float, float] = (2, 1)) -> JobSpec:
    jsonl(tmp_path / "a.jsonl", [alpaca(i) for i in range(10)])
    jsonl(tmp_path / "b.jsonl", [sharegpt(i) for i in range(20)])
    jsonl(tmp_path / "val.jsonl", [alpaca(i, "held") for i in range(3)])
    sources = [{"path": "a.jsonl", "weight": weights[0]}, {"path": "b.jsonl", "weight": weights[1]}]
    return spec_for(tmp_path, {"train": sources, "validation": "val.jsonl"}, seed=seed)


def source(example: Any) -> str:
    return next(m.content for m in example.messages if m.role == "user").split()[0]


def test_shares_follow_the_weights() -> None:
    assert shares([10, 20], [2, 1]) == [20, 10]
    assert shares([10, 30], [2, 1]) == [27, 13]  # 26.7 and 13.3: the largest remainder gets the spare row
    assert sum(shares([7, 5, 3], [1, 1, 1])) == 15


def test_mixture_counts_match_the_weights_and_the_seed_fixes_the_order(tmp_path: Path) -> None:
    task = get_task("chat")
    train, val = task.split(mixed_spec(tmp_path))
    assert Counter(source(i.example) for i in train) == {"alpaca": 20, "sharegpt": 10}
    # Upsampled by repetition: each of the 10 Alpaca rows exactly twice; 10 of the 20 ShareGPT rows, once each.
    assert set(Counter(i.example.line for i in train if source(i.example) == "alpaca").values()) == {2}
    assert len({i.example.line for i in train if source(i.example) == "sharegpt"}) == 10
    assert [source(i.example) for i in val] == ["held"] * 3
    assert "train mixture: a.jsonl 20 of 10 (x2.00), b.jsonl 10 of 20 (x0.50)" in task.sources
    again, _ = get_task("chat").split(mixed_spec(tmp_path))
    other, _ = get_task("chat").split(mixed_spec(tmp_path, seed=1))
    assert [i.example for i in again] == [i.example for i in train]
    assert [i.example for i in other] != [i.example for i in train]


def test_mixture_without_validation_file_holds_out_before_repeating(tmp_path: Path) -> None:
    spec = mixed_spec(tmp_path)
    spec = spec.model_copy(update={"data": spec.data.model_copy(update={"validation": None})})
    train, val = get_task("chat").split(spec)
    assert len(val) == 1 + 2  # 10 % of each file
    assert not {(source(i.example), i.example.line) for i in val} & {(source(i.example), i.example.line) for i in train}


def test_each_mixed_file_is_checked_on_its_own(tmp_path: Path) -> None:
    spec = mixed_spec(tmp_path)
    jsonl(tmp_path / "a.jsonl", [alpaca(0), {"instruction": "q", "output": 1}])
    jsonl(tmp_path / "b.jsonl", [sharegpt(0), {"conversations": [{"from": "gpt", "value": ""}]}])
    with pytest.raises(DataError) as caught:
        get_task("chat").split(spec)
    assert [(p.where, p.code) for p in caught.value.problems] == [  # both files' problems, in one pass
        ("a.jsonl:2", "invalid_field_type"),
        ("b.jsonl:2 conversations[0]", "empty_content"),
    ]


def test_mixture_spec_errors_name_the_entry(tmp_path: Path) -> None:
    jsonl(tmp_path / "a.jsonl", [alpaca(0)])
    spec = tmp_path / "spec.yaml"
    spec.write_text("data: {train: [{path: a.jsonl, weight: 2}, {path: missing.jsonl, weight: 0}]}\n")
    with pytest.raises(ConfigError) as caught:
        load_spec(spec)
    problems = {p.where: p.message for p in caught.value.problems}
    assert problems == {
        "data.train.list.1.weight": "Input should be greater than 0",
        "data.train[1].path": "file not found: missing.jsonl",
    }


def test_data_validate_checks_each_file_of_a_mixture(tmp_path: Path) -> None:
    mixed_spec(tmp_path)
    jsonl(tmp_path / "b.jsonl", [sharegpt(0), {"conversations": [{"from": "bot", "value": "x"}]}])
    spec = tmp_path / "spec.yaml"
    spec.write_text("data: {train: [{path: a.jsonl, weight: 2}, {path: b.jsonl}], validation: val.jsonl}\n")
    result = runner.invoke(app, ["data", "validate", "--spec", str(spec)])
    assert result.exit_code == 1
    assert "b.jsonl:2 conversations[0]: [unknown_role]" in " ".join(result.output.split())


def test_mixed_alpaca_and_sharegpt_train_end_to_end(tiny_llama_dir: Path, tmp_path: Path) -> None:
    mixed_spec(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"model: {{name: {tiny_llama_dir}}}\n"
        "method: {name: lora, r: 8, alpha: 16}\n"
        "data: {train: [{path: a.jsonl, weight: 2}, {path: b.jsonl, weight: 1}], validation: val.jsonl}\n"
        "train: {max_steps: 12, batch_size: 4, lr: 5.0e-3, max_seq_len: 128}\n"
        "eval: {generations: 2, samples: 1, max_new_tokens: 8}\n"
        f"output_dir: {tmp_path / 'run'}\n",
        encoding="utf-8",
    )
    result = runner.invoke(app, ["train", str(spec)])
    assert result.exit_code == 0, result.output
    assert "train mixture: a.jsonl 20 of 10 (x2.00), b.jsonl 10 of 20 (x0.50)" in " ".join(result.output.split())
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["after"]["loss"] < summary["before"]["loss"]
