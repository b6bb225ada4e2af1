"""Artefacts that travel (issue 18), on the tiny Llama: the adapter names its base portably and loads with PEFT
alone elsewhere; model cards; GGUF export read back by transformers; a quiet terminal unless --verbose."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.models import EMBEDDED_HUB_ID, BaseReference, base_reference, resolve

ROOT = Path(__file__).parents[1]
REPO_ID = "tunelab-tests/tiny-llama"
REVISION = "0123456789abcdef0123456789abcdef01234567"
PROMPT = "<|im_start|>user\nhello there, what is your name?<|im_end|>\n<|im_start|>assistant\n"
# Measured on the tiny model (logits of magnitude ~5): max abs difference f16 0.010, q8_0 0.28; greedy choices
# all equal for f16, 21 of 23 positions for q8_0 (a random model has near-ties that 8-bit weights can flip).
TOLERANCE = {"f16": 2e-2, "q8_0": 0.6}
GREEDY_AGREEMENT = {"f16": 1.0, "q8_0": 0.8}
THIRD_PARTY_NOISE = ("Loading weights", "it/s]", "FutureWarning", "[WARNING]", "UserWarning")
runner = CliRunner()


def _hub_cache(root: Path, model_dir: Path) -> Path:
    """A Hugging Face hub cache holding `model_dir` as REPO_ID at REVISION, laid out as the hub client does."""
    repo = root / f"models--{REPO_ID.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return root


def _env(cache: Path) -> dict[str, str]:
    # Another machine: no network, the hub cache elsewhere, nothing of tunelab's cache.
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    for key in ("TUNELAB_VERBOSE", "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        env.pop(key, None)  # set by in-process CLI tests of this session
    return env


def _spec(tmp: Path, steps: int, eval_enabled: bool = True) -> Path:
    spec = tmp / "spec.yaml"
    spec.write_text(
        f"model: {{name: {REPO_ID}}}\n"
        "method: {name: lora, r: 4, alpha: 8}\n"
        f"data: {{train: {ROOT / 'data/chat/train.jsonl'}, validation: {ROOT / 'data/chat/validation.jsonl'}}}\n"
        f"train: {{max_steps: {steps}, batch_size: 4, lr: 5.0e-3, max_seq_len: 64, gradient_checkpointing: true}}\n"
        f"eval: {{enabled: {str(eval_enabled).lower()}, max_examples: 8, samples: 1, generations: 2, "
        "max_new_tokens: 4}\n"
        f"output_dir: {tmp / 'run'}\n",
        encoding="utf-8",
    )
    return spec


def _train(tmp: Path, cache: Path, *args: str, steps: int = 3, eval_enabled: bool = True) -> str:
    command = [sys.executable, "-m", "tunelab.cli", *args, "train", str(_spec(tmp, steps, eval_enabled))]
    done = subprocess.run(command, env=_env(cache), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def hub_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> tuple[Path, Path, str]:
    """(hub cache, run folder, terminal output) of a quiet `tunelab train` on the tiny model taken from the hub
    cache by its repo id."""
    cache = _hub_cache(tmp_path_factory.mktemp("hub"), tiny_llama_dir)
    tmp = tmp_path_factory.mktemp("hub_run")
    output = _train(tmp, cache)
    return cache, tmp / "run", output


def _ids(folder: Path) -> torch.Tensor:
    return torch.tensor([AutoTokenizer.from_pretrained(folder)(PROMPT)["input_ids"]])


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits  # type: ignore[no-any-return]


def test_train_output_is_quiet_without_verbose(hub_run: tuple[Path, Path, str]) -> None:
    _, _, output = hub_run
    assert "method: lora" in output and "eval after" in output  # tunelab's own progress stays
    assert not [noise for noise in THIRD_PARTY_NOISE if noise in output], output


def test_verbose_shows_the_libraries_output(hub_run: tuple[Path, Path, str], tmp_path: Path) -> None:
    cache, _, _ = hub_run
    output = _train(tmp_path, cache, "--verbose", steps=1, eval_enabled=False)
    assert "Loading weights" in output and "is_gradient_checkpointing" in output


def test_adapter_loads_with_peft_alone_by_its_recorded_base(hub_run: tuple[Path, Path, str], tmp_path: Path) -> None:
    cache, run, _ = hub_run
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == (REPO_ID, REVISION)

    colleague = tmp_path / "colleague"  # a fresh folder: nothing but the adapter, and the base in the hub cache
    shutil.copytree(run / "adapter", colleague / "adapter")
    script = (
        "import sys, torch\n"
        "from peft import AutoPeftModelForCausalLM\n"
        "model = AutoPeftModelForCausalLM.from_pretrained('adapter').eval()\n"
        "ids = torch.load('ids.pt')\n"
        "with torch.no_grad(): torch.save(model(ids).logits, 'logits.pt')\n"
    )
    ids = _ids(run / "adapter")
    torch.save(ids, colleague / "ids.pt")
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=colleague, env=_env(cache), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr

    base = AutoModelForCausalLM.from_pretrained(cache / f"models--{REPO_ID.replace('/', '--')}/snapshots/{REVISION}")
    expected = _logits(PeftModel.from_pretrained(base, run / "adapter").eval(), ids)
    assert torch.allclose(torch.load(colleague / "logits.pt"), expected, atol=1e-5)


def _front_matter(card: Path) -> dict[str, object]:
    text = card.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    loaded = yaml.safe_load(text.split("---\n")[1])
    assert isinstance(loaded, dict)
    return loaded


def test_model_cards_name_the_base_and_the_results(hub_run: tuple[Path, Path, str]) -> None:
    _, run, _ = hub_run
    summary = json.loads((run / "summary.json").read_text())
    for folder, library in (("adapter", "peft"), ("merged", "transformers")):
        meta = _front_matter(run / folder / "README.md")
        assert meta["base_model"] == REPO_ID and meta["library_name"] == library
        assert meta["base_model_revision"] == REVISION
        assert "tunelab" in meta["tags"] and "lora" in meta["tags"]  # type: ignore[operator]
        assert meta["datasets"] == ["chat/train.jsonl", "chat/validation.jsonl"]
        card = ModelCard.load(run / folder / "README.md")
        results = {r.metric_type: r.metric_value for r in card.data.eval_results}
        assert results["loss"] == pytest.approx(summary["after"]["loss"], abs=1e-5)
        assert f"| loss | {summary['before']['loss']:.4f} | {summary['after']['loss']:.4f} |" in card.text
        assert "max_steps: 3" in card.text  # the spec is in the body
        assert "eval_seconds" in summary["after"]  # this machine's evaluation time: not a result of the model
        assert not [name for name in results if name.endswith("_seconds")] and "_seconds" not in card.text


def test_export_writes_a_card_naming_the_base(hub_run: tuple[Path, Path, str], tmp_path: Path) -> None:
    cache, run, _ = hub_run
    done = subprocess.run(
        [sys.executable, "-m", "tunelab.cli", "export", "--run", str(run), "--out", str(tmp_path / "m")],
        env=_env(cache),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert _front_matter(tmp_path / "m" / "README.md")["base_model"] == REPO_ID


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_reads_back_with_transformers(hub_run: tuple[Path, Path, str], tmp_path: Path, quant: str) -> None:
    _, run, _ = hub_run
    target = tmp_path / "out" / f"tiny-{quant}.gguf"
    result = runner.invoke(app, ["export", "gguf", "--run", str(run), "--quant", quant, "--out", str(target)])
    assert result.exit_code == 0, result.output
    # Progress of the long part (quantising) in a log too: CliRunner's output is not a terminal.
    assert re.search(rf"^gguf {quant} tensors: (\d+)/\1 tensors, .* ETA", result.output, re.M), result.output
    merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    loaded = AutoModelForCausalLM.from_pretrained(target.parent, gguf_file=target.name).eval()
    ids = _ids(run / "merged")
    expected, got = _logits(merged, ids), _logits(loaded, ids)
    assert (got - expected).abs().max() < TOLERANCE[quant]
    agreement = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert agreement >= GREEDY_AGREEMENT[quant]

    tokenizer = AutoTokenizer.from_pretrained(run / "merged")
    from_gguf = AutoTokenizer.from_pretrained(target.parent, gguf_file=target.name)
    for text in (PROMPT, "Hello, World! 1234", "  two spaces\n\nnew lines, é ü"):
        assert from_gguf(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert from_gguf.eos_token_id == tokenizer.eos_token_id

    modelfile = (target.parent / "Modelfile").read_text()
    assert f"FROM ./{target.name}" in modelfile and "<|im_start|>{{ .Role }}" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    # Every conversation of the bundled chat data has this system message: Ollama sends it as training saw it.
    assert 'SYSTEM """You are a friendly, concise chat assistant."""' in modelfile


def test_modelfile_keeps_the_templates_default_system_message() -> None:
    from tunelab.export.gguf import _default_system

    smollm2 = (
        "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are SmolLM<|im_end|>"
        "\\n' }}{% endif %}"
    )
    assert _default_system(smollm2) == "You are SmolLM"


def test_gguf_refuses_what_it_cannot_write(hub_run: tuple[Path, Path, str], tiny_phi3_dir: Path) -> None:
    _, run, _ = hub_run
    result = runner.invoke(app, ["export", "gguf", "--run", str(run), "--quant", "q4_k"])
    assert result.exit_code == 2 and "q8_0" in result.output and "llama-quantize" in result.output
    result = runner.invoke(app, ["export", "gguf", "--model", str(tiny_phi3_dir), "--quant", "f16"])
    assert result.exit_code == 2 and "'phi3'" in result.output


def test_the_embedded_models_hub_id_resolves_to_the_embedded_copy(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("tunelab.models.embedded_model_dir", lambda: tmp_path)
    assert resolve(EMBEDDED_HUB_ID).path == str(tmp_path) == resolve("embedded").path
    assert base_reference("embedded") == BaseReference(EMBEDDED_HUB_ID)
    assert base_reference("./models/mine") == BaseReference("./models/mine")  # a path stays as the user gave it


def test_modelfile_system_is_the_one_the_run_trained_with(tmp_path: Path) -> None:
    """A classification run trains with its scenario's instruction (naming the labels) although the spec sets
    none: Ollama must send that one, not the chat template's default."""
    from tunelab.export.gguf_cli import trained_system

    rows = "".join(json.dumps({"text": f"t{i}", "label": "ab"[i % 2]}) + "\n" for i in range(6))
    (tmp_path / "train.jsonl").write_text(rows, encoding="utf-8")
    spec: dict[str, object] = {
        "task": {"scenario": "classification"},
        "data": {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "train.jsonl")},
    }
    assert trained_system(spec) == "Classify the text. Answer with one word: a, b."
    spec["task"] = {"scenario": "classification", "instruction": "Sentiment?"}
    assert trained_system(spec) == "Sentiment?"
    spec["data"] = {"train": str(tmp_path / "moved.jsonl")}
    assert trained_system(spec) == "Sentiment?"  # the data is gone: the spec's own instruction
    chat = {"data": {"train": str(ROOT / "data/chat/train.jsonl")}}  # every conversation has this one
    assert trained_system(chat) == "You are a friendly, concise chat assistant."
    rows = "".join(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
                   + "\n" for _ in range(4))  # fmt: skip
    (tmp_path / "chat.jsonl").write_text(rows, encoding="utf-8")
    assert trained_system({"data": {"train": str(tmp_path / "chat.jsonl")}}) is None  # none: the template's default
