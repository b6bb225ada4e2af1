"""The CLI on the tiny model: train, export, generate, data validate/preview, clear errors."""

from __future__ import annotations

import json
import re
from html import unescape
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.methods import get_method

ROOT = Path(__file__).parents[1]
runner = CliRunner()


def _spec(tmp_path: Path, model_dir: Path, method: str = "lora", steps: int = 8) -> Path:
    spec = tmp_path / "spec.yaml"
    # A rank and scale for the methods that read them: the spec refuses a setting its method would ignore.
    settings = ", r: 4, alpha: 8" if "r" in get_method(method).settings else ""
    spec.write_text(
        f"model: {{name: {model_dir}}}\n"
        f"method: {{name: {method}{settings}}}\n"
        f"data: {{train: {ROOT / 'data/chat/train.jsonl'}, validation: {ROOT / 'data/chat/validation.jsonl'}}}\n"
        f"train: {{max_steps: {steps}, batch_size: 4, lr: 5.0e-3, max_seq_len: 64}}\n"
        "checkpoints: {every_steps: 4}\n"
        "eval: {max_examples: 8, samples: 2, max_new_tokens: 8}\n"
        f"output_dir: {tmp_path / 'run'}\n",
        encoding="utf-8",
    )
    return spec


def _generate(model: torch.nn.Module, ids: torch.Tensor) -> list[int]:
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    return out[0].tolist()  # type: ignore[no-any-return]


def test_train_produces_report_adapter_and_merged_model(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(_spec(tmp_path, tiny_llama_dir))])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["loss"] < summary["before"]["loss"]
    assert (run / "report.html").is_file() and (run / "report.png").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval" not in r] == list(range(1, 9))  # one row per step
    # The validation loss every 2 steps (the default: about 5 points), then the evaluations' times.
    assert [(r["eval"], r["step"]) for r in rows if "eval" in r] == [
        ("validation", 2), ("validation", 4), ("validation", 6), ("validation", 8), ("before", 0), ("after", 8)
    ]  # fmt: skip
    html = (run / "report.html").read_text(encoding="utf-8")
    assert 'data-hp="learning rate"><th>learning rate</th><td>0.005 (cosine' in html
    assert html.count('<tr data-step="') == 4 and "im_start" not in html
    assert '<div class="turn user"><div class="role">user</div>' in html
    assert '<div class="score">rouge_l ' in html  # each sample's own score
    assert "trainable parameters" in result.output
    assert "longer than train.max_seq_len=64 were truncated" in result.output  # counted and warned, not silent

    tok = AutoTokenizer.from_pretrained(run / "merged")
    ids = torch.tensor([tok("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    adapted = PeftModel.from_pretrained(base, run / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    assert _generate(merged, ids) == _generate(adapted, ids)
    with torch.no_grad():
        diff = (merged(ids).logits - adapted(ids).logits).abs().max()
    assert diff < 1e-4
    # The report's three lines load what they say.
    snippet = re.search(r'<pre class="snippet"><code>(.*?)</code></pre>', html, re.DOTALL)
    assert snippet is not None and len(snippet.group(1).splitlines()) == 3
    loaded: dict[str, Any] = {}
    exec(unescape(snippet.group(1)), loaded)
    assert _generate(loaded["tuned"].eval(), ids) == _generate(adapted, ids) == _generate(loaded["merged"].eval(), ids)

    # Resume of a finished run is a no-op that still exports; export --run re-merges from the adapter.
    exported = runner.invoke(app, ["export", "--run", str(run), "--out", str(tmp_path / "again")])
    assert exported.exit_code == 0, exported.output
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    assert _generate(again, ids) == _generate(merged, ids)

    gen = runner.invoke(
        app,
        [
            "generate",
            "hello",
            "--model",
            str(tiny_llama_dir),
            "--adapter",
            str(run / "adapter"),
            "--max-new-tokens",
            "5",
        ],
    )
    assert gen.exit_code == 0, gen.output
    assert gen.stdout.strip() == _reply(adapted, tok, [{"role": "user", "content": "hello"}], 5)


def _reply(model: torch.nn.Module, tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], n: int) -> str:
    """The greedy answer, computed with transformers alone."""
    ids = torch.tensor(
        [tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))["input_ids"]]
    )
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)).strip()


def test_chat_keeps_the_conversation_and_ends_at_end_of_input(tiny_llama_dir: Path) -> None:
    result = runner.invoke(
        app, ["chat", "--model", str(tiny_llama_dir), "--max-new-tokens", "6"], input="hello\nhow are you\n"
    )
    assert result.exit_code == 0, result.output
    replies = [line.removeprefix("model> ") for line in result.stdout.splitlines() if line.startswith("model> ")]
    assert len(replies) == 2
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    history = [{"role": "user", "content": "hello"}]
    assert replies[0] == _reply(model, tok, history, 6)
    history += [{"role": "assistant", "content": replies[0]}, {"role": "user", "content": "how are you"}]
    assert replies[1] == _reply(model, tok, history, 6)  # the second turn sees the first


def test_prefix_tuning_trains_and_exports_adapter_only(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(_spec(tmp_path, tiny_llama_dir, "prefix_tuning", steps=4))])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run/adapter/adapter_config.json").is_file()
    assert not (tmp_path / "run/merged").exists()
    assert "not mergeable" in result.output


def test_resume_continues_from_the_checkpoint(tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec = _spec(tmp_path, tiny_llama_dir)
    first = runner.invoke(app, ["train", str(spec), "--set", "train.max_steps=4", "--set", "eval.enabled=false"])
    assert first.exit_code == 0, first.output
    resumed = runner.invoke(app, ["train", str(spec), "--resume", "--set", "eval.enabled=false"])
    assert resumed.exit_code == 0, resumed.output
    steps = [json.loads(x)["step"] for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_config_errors_are_clean_messages(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {train: missing.jsonl}\ntrain: {lrr: 1}\n", encoding="utf-8")
    result = runner.invoke(app, ["train", str(bad)])
    assert result.exit_code == 2
    assert "did you mean 'lr'?" in result.output and "Traceback" not in result.output


def test_unknown_hub_model_offline_says_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["generate", "hi", "--model", "someone/not-a-cached-model"])
    assert result.exit_code == 2
    assert "Pass a local folder" in result.output


def test_data_validate_reports_lines_and_exit_code(tmp_path: Path) -> None:
    # A long path (as on CI machines) must not wrap the summary line.
    deep = tmp_path / ("long-folder-name-" * 4) / "validation.jsonl"
    deep.parent.mkdir()
    deep.write_bytes((ROOT / "data/chat/validation.jsonl").read_bytes())
    ok = runner.invoke(app, ["data", "validate", str(deep)])
    assert ok.exit_code == 0 and f"{deep}: messages, 100 rows, 100 valid examples: OK" in ok.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n', encoding="utf-8")
    result = runner.invoke(app, ["data", "validate", str(bad)])
    assert result.exit_code == 1
    assert "bad.jsonl:1" in result.output and "bad.jsonl:2" in result.output


def test_data_validate_counts_tokens_with_the_model(tiny_llama_dir: Path, tmp_path: Path) -> None:
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    long = {"messages": [{"role": "user", "content": "tell me " * 40}, {"role": "assistant", "content": "no"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in [short] * 10 + [long]) + "\n", encoding="utf-8")
    args = ["data", "validate", str(path), "--max-seq-len", "48"]
    result = runner.invoke(app, [*args, "--model", str(tiny_llama_dir)])
    assert result.exit_code == 0, result.output  # over-long examples are a warning: they are truncated
    warning = next(line for line in result.stdout.splitlines() if "too_long" in line)
    assert "line 11" in warning and "lines 1" not in warning
    assert "tokens: OK" in result.stdout
    assert "lengths not checked" in runner.invoke(app, args).output


def test_data_preview_marks_trained_tokens(tiny_llama_dir: Path, tmp_path: Path) -> None:
    row = {
        "messages": [
            {"role": "user", "content": "what is two"},
            {"role": "assistant", "content": "a number", "weight": 0},
            {"role": "user", "content": "and three"},
            {"role": "assistant", "content": "also a number"},
        ]
    }
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    result = runner.invoke(app, ["data", "preview", str(path), "--model", str(tiny_llama_dir)])
    assert result.exit_code == 0, result.output
    marked = re.findall(r"⟦(.*?)⟧", result.stdout, re.S)
    assert len(marked) == 1 and marked[0].startswith("also a number<|im_end|>")  # weight 0 and prompts unmarked


def test_data_preview_of_a_spec_shows_its_training_file(tiny_llama_dir: Path, tmp_path: Path) -> None:
    row = {"prompt": "Q: two?\nA:", "completion": " a number"}
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    spec = tmp_path / "job.yaml"
    spec.write_text(f"model: {{name: {tiny_llama_dir}}}\ntask: {{scenario: chat}}\ndata: {{train: train.jsonl}}\n")
    result = runner.invoke(app, ["data", "preview", str(spec)])
    assert result.exit_code == 0, result.output
    assert re.findall(r"⟦(.*?)⟧", result.stdout, re.S)[0].startswith(" a number")
