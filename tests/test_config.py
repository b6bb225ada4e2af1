"""The JobSpec: every problem reported at once, with its field path and a hint."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab.config import load_spec
from tunelab.errors import ConfigError

ROOT = Path(__file__).parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text(text, encoding="utf-8")
    return spec


def _problems(exc: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    return {p.where: str(p) for p in exc.value.problems}


def test_example_spec_loads_and_overrides_apply() -> None:
    spec = load_spec(ROOT / "examples/chat.yaml", ["train.lr=1e-4", "method.name=dora", "train.max_steps=3"])
    assert spec.train.lr == 1e-4 and spec.method.name == "dora" and spec.train.max_steps == 3
    assert spec.data.train.is_file()  # resolved relative to the spec file, not the working directory
    assert spec.packing is True


def test_all_problems_reported_together_with_hints(tmp_path: Path) -> None:
    path = _write(tmp_path, "data:\n  train: nope.jsonl\ntrain:\n  lrr: 1\n  batch_size: 0\nmethod:\n  name: lorra\n")
    with pytest.raises(ConfigError) as exc:
        load_spec(path)
    problems = _problems(exc)
    assert "did you mean 'lr'?" in problems["train.lrr"]
    assert "train.batch_size" in problems
    # The registry and disk checks run in the same pass as the schema, so nothing waits for a second attempt.
    assert "did you mean 'lora'?" in problems["method.name"]
    assert "valid methods: dora, full, ia3, loha, lokr, lora," in problems["method.name"]
    assert "file not found" in problems["data.train"]
    assert len(problems) == 4


def test_unknown_section_names_the_closest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_spec(_write(tmp_path, "data: {train: x}\ntrian: {lr: 1}\n"))
    assert "did you mean 'train'?" in _problems(exc)["trian"]


def test_missing_data_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_spec(_write(tmp_path, "model: {name: embedded}\n"))
    assert "required" in _problems(exc)["data"]


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_spec(_write(tmp_path, "data:\n  train: a\n   bad: [\n"))
    assert any(where.endswith(":3") or where.endswith(":4") for where in _problems(exc))


def test_packing_with_prompt_tuning_is_refused_with_both_names(tmp_path: Path) -> None:
    train = ROOT / "data/chat/train.jsonl"
    with pytest.raises(ConfigError) as exc:
        load_spec(None, ["method.name=prompt_tuning", "train.packing=true", f"data.train={train}"])
    message = str(exc.value)
    assert "train.packing" in message and "prompt_tuning" in message
    spec = load_spec(None, ["method.name=prefix_tuning", f"data.train={train}"])
    assert spec.packing is False  # the default adapts to the method


def test_bad_override_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_spec(ROOT / "examples/chat.yaml", ["train.lr"])
    assert "key.path=value" in str(exc.value)
