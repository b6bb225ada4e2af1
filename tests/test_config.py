"""The JobSpec: every problem reported at once, with its field path and a hint."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from tunelab.config import JobSpec, MethodSpec, load_spec
from tunelab.errors import ConfigError
from tunelab.methods import get_method
from tunelab.tasks import ScenarioInfo, get_task, head_scenarios, register_scenario, scenario_names

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


@pytest.mark.parametrize("example", sorted(ROOT.glob("examples/*.yaml")), ids=lambda p: p.stem)
def test_every_example_spec_is_valid(example: Path) -> None:
    load_spec(example)


def test_a_setting_of_another_method_names_the_methods_that_take_it() -> None:
    with pytest.raises(ConfigError) as exc:
        load_spec(ROOT / "examples/chat.yaml", ["method.bits=8"])
    assert _problems(exc) == {
        "method.bits": "method.bits: not a setting of lora (hint: qlora takes it; remove it or change method.name)"
    }
    assert load_spec(ROOT / "examples/chat.yaml", ["method.name=qlora", "method.bits=8"]).method.bits == 8


def test_settings_of_another_method_are_reported_with_the_other_problems() -> None:
    train = ROOT / "data/chat/train.jsonl"
    overrides = ["method.name=prompt_tuning", "method.r=4", "train.packing=true", f"data.train={train}"]
    with pytest.raises(ConfigError) as exc:
        load_spec(None, overrides)
    problems = _problems(exc)
    assert "not a setting of prompt_tuning" in problems["method.r"] and "lora" in problems["method.r"]
    # The checks across sections still run: the method is valid once its foreign setting is set aside.
    assert any("train.packing is true" in text for text in problems.values())


def test_full_fine_tuning_takes_no_adapter_settings() -> None:
    with pytest.raises(ConfigError) as exc:
        load_spec(ROOT / "examples/chat.yaml", ["method.name=full"])  # chat.yaml gives r, alpha and dropout
    assert set(_problems(exc)) == {"method.r", "method.alpha", "method.dropout"}


def test_a_method_spec_built_in_code_refuses_another_method_s_setting() -> None:
    with pytest.raises(ValidationError, match=r"method\.num_virtual_tokens: not a setting of lora"):
        MethodSpec(name="lora", num_virtual_tokens=8)
    assert MethodSpec(name="prefix_tuning", num_virtual_tokens=8).num_virtual_tokens == 8


def test_unknown_scenario_names_the_closest_and_the_registered_ones() -> None:
    with pytest.raises(ConfigError) as exc:
        load_spec(ROOT / "examples/chat.yaml", ["task.scenario=clasification"])
    message = _problems(exc)["task.scenario"]
    assert "unknown scenario 'clasification'" in message and "did you mean 'classification'?" in message
    assert "valid scenarios: chat, classification, creative, domain, ner, preference, qa, translation" in message


def test_scenarios_and_their_head_variants_come_from_the_registry() -> None:
    expected = ["chat", "classification", "creative", "domain", "ner", "preference", "qa", "translation"]
    assert scenario_names() == expected
    assert head_scenarios() == ["classification", "ner"]
    for name in scenario_names():
        assert get_task(name).name == name
    assert type(get_task("ner", "head")).__name__ == "NerHeadTask"


def test_a_scenario_is_registered_once() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register_scenario(ScenarioInfo("chat", type(get_task("chat"))))


@pytest.mark.parametrize("package", ["methods", "tasks"])
def test_registered_modules_do_not_import_their_package(package: str) -> None:
    """A method family or scenario module importing its package (which imports it to register it) is the cycle
    the registry modules remove: each imports `registry` (and `base`) instead."""
    for path in sorted((ROOT / "src/tunelab" / package).glob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert f"tunelab.{package}" not in imported, f"{path.name} imports tunelab.{package}"


@pytest.mark.parametrize("method", ["lora", "qlora", "full", "prompt_tuning"])
def test_a_dumped_spec_loads_back_with_the_method_s_settings_only(method: str, tmp_path: Path) -> None:
    spec = load_spec(None, [f"method.name={method}", f"data.train={ROOT / 'data/chat/train.jsonl'}"])
    dumped = spec.model_dump(mode="json")
    assert set(dumped["method"]) == {"name"} | get_method(method).settings
    assert JobSpec.model_validate(dumped) == spec
    saved = _write(tmp_path, yaml.safe_dump(dumped))  # as the run folder's spec.yaml
    assert load_spec(saved) == spec


def test_a_job_spec_stored_with_every_method_field_still_loads() -> None:
    """Older versions stored every field of `method`: at their defaults, the other methods' settings change nothing."""
    stored = {"name": "full", "r": 16, "alpha": 32.0, "dropout": 0.05, "target_modules": None}
    stored |= {"num_virtual_tokens": 16, "bits": 4, "compute_dtype": "fp32", "dora": False}
    assert MethodSpec.model_validate(stored).name == "full"
    with pytest.raises(ValidationError, match=r"method\.r: not a setting of full"):
        MethodSpec.model_validate(stored | {"r": 8})
