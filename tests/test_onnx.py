"""ONNX export round trip on the tiny model: layout, fp32 parity with PyTorch, int4, generate and serve from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import openai
import pytest
import torch
from fastapi.testclient import TestClient
from openai.types.chat import ChatCompletionMessageParam
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.errors import TunelabError
from tunelab.evaluate import generate
from tunelab.export.onnx import (
    MANIFEST,
    OnnxModel,
    SequenceLogits,
    _BuilderProgress,
    export_onnx,
    generate_onnx,
    greedy_agreement,
    logits_max_abs_diff,
    prompt_ids,
    torch_greedy,
)
from tunelab.inference import chat_prompt
from tunelab.inference_server.app import create_app
from tunelab.serving.engines import build_engine

# What a quantised export of the tiny model must reach, vs the fp32 export / PyTorch: (correlation of the logits,
# teacher-forced greedy agreement). Measured: int8 0.999 / 94 %, int4 (k-quant mixed) 0.96 / 56 %; an export of
# the same model without its adapter scores 0.21-0.22 / 0-3 %, so the floors catch an export with wrong weights.
QUANTISED_FLOORS = {"int8": (0.98, 0.75), "int4": (0.9, 0.4)}


def logits_correlation(expected: Path, actual: Path, prompts: list[list[int]]) -> float:
    """Pearson correlation of two exports' logits (each position centred) over every position of `prompts`."""
    a, b = SequenceLogits(expected), SequenceLogits(actual)
    x = np.concatenate([a(ids) for ids in prompts])
    y = np.concatenate([b(ids) for ids in prompts])
    x, y = x - x.mean(-1, keepdims=True), y - y.mean(-1, keepdims=True)
    return float(np.corrcoef(x.ravel(), y.ravel())[0, 1])


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with random weights, so the export really has to merge it."""
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("onnx_adapter")
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), config).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path, adapter: Path) -> torch.nn.Module:
    """The PyTorch model the export must match: base + adapter, unmerged."""
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), adapter).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def fp32_dir(tiny_llama_dir: Path, adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "fp32"
    args = ["--model", str(tiny_llama_dir), "--adapter", str(adapter), "--precision", "fp32", "--out", str(out)]
    result = CliRunner().invoke(app, ["export", "onnx", *args])  # the real `tunelab` command line
    assert result.exit_code == 0, result.output
    assert f"ONNX (fp32): {out}" in result.stdout
    # Progress from the builder's layer lines: not a terminal here, so the plain end line.
    assert "onnx fp32 export: 100/100 %" in result.stderr, result.stderr
    return out


@pytest.fixture(scope="module", params=["int4", "int8"])
def quantised_dir(
    request: pytest.FixtureRequest, tiny_llama_dir: Path, adapter: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return export_onnx(str(tiny_llama_dir), tmp_path_factory.mktemp("onnx") / request.param, request.param, adapter)


def test_export_writes_the_onnxruntime_genai_layout(fp32_dir: Path, adapter: Path) -> None:
    for name in ("model.onnx", "genai_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (fp32_dir / name).is_file(), name
    config = json.loads((fp32_dir / "genai_config.json").read_text())
    assert config["model"]["type"] == "llama" and config["model"]["context_length"] == 512
    assert json.loads((fp32_dir / MANIFEST).read_text())["adapter"] == str(adapter)
    assert not [p for p in fp32_dir.parent.iterdir() if p.name.startswith(".")], "temporary folder left behind"


def test_fp32_logits_match_pytorch(
    fp32_dir: Path, reference: torch.nn.Module, tokenizer: PreTrainedTokenizerBase
) -> None:
    assert logits_max_abs_diff(reference, fp32_dir, prompt_ids(tokenizer)) < 1e-3


def test_fp32_greedy_generation_equals_pytorch(
    fp32_dir: Path, reference: torch.nn.Module, tokenizer: PreTrainedTokenizerBase
) -> None:
    model = OnnxModel(fp32_dir)
    for ids in prompt_ids(tokenizer)[:3]:
        assert model.greedy(ids, 16, ignore_eos=True) == torch_greedy(reference, ids, 16, ignore_eos=True)
    agreement = greedy_agreement(reference, fp32_dir, prompt_ids(tokenizer)[:3], max_new_tokens=8)
    assert agreement.rate == 1.0 and agreement.exact == 3
    # `tunelab generate --onnx DIR` answers as `tunelab generate --adapter A` does.
    prompt = chat_prompt(tokenizer, [{"role": "user", "content": "hello"}])
    assert generate_onnx(fp32_dir, "hello", 12) == generate(reference, tokenizer, prompt, 12)


def test_generate_onnx_command_prints_the_greedy_answer(
    fp32_dir: Path, reference: torch.nn.Module, tokenizer: PreTrainedTokenizerBase
) -> None:
    # "what is your name" makes the tiny model write a \x0b, which a rich console would drop.
    for prompt in ("hello", "what is your name"):
        ids = prompt_ids(tokenizer, [prompt])[0]
        expected = str(tokenizer.decode(torch_greedy(reference, ids, 16), skip_special_tokens=True)).strip()
        assert expected  # the tiny model says something to compare
        result = CliRunner().invoke(app, ["generate", prompt, "--onnx", str(fp32_dir), "--max-new-tokens", "16"])
        assert result.exit_code == 0, result.output
        assert result.stdout == expected + "\n"
    result = CliRunner().invoke(app, ["generate", "hello", "--onnx", str(fp32_dir), "--adapter", str(fp32_dir)])
    assert result.exit_code == 2 and "cannot be used with --onnx" in result.output


def test_quantised_export_is_smaller_and_reports_agreement(
    quantised_dir: Path, fp32_dir: Path, reference: torch.nn.Module, tokenizer: PreTrainedTokenizerBase
) -> None:
    graph = onnx.load_model(str(quantised_dir / "model.onnx"), load_external_data=False).graph
    ops = {node.op_type for node in graph.node}
    assert "MatMulNBits" in ops and "MatMul" not in ops
    assert (quantised_dir / "model.onnx.data").stat().st_size < (fp32_dir / "model.onnx.data").stat().st_size / 2
    prompts = prompt_ids(tokenizer)[:4]
    correlation = logits_correlation(fp32_dir, quantised_dir, prompts)
    agreement = greedy_agreement(reference, quantised_dir, prompts, max_new_tokens=8)
    print(f"tiny model {quantised_dir.name}: logits correlation {correlation:.4f}, greedy agreement {agreement}")
    assert agreement.tokens == 32 and agreement.prompts == 4  # 8 tokens per prompt: no early EOS on this model
    min_correlation, min_rate = QUANTISED_FLOORS[quantised_dir.name]
    assert correlation >= min_correlation
    assert agreement.rate >= min_rate
    assert len(OnnxModel(quantised_dir).greedy(prompt_ids(tokenizer)[0], 8, ignore_eos=True)) == 8


def test_serve_onnx_answers_like_pytorch(
    fp32_dir: Path, reference: torch.nn.Module, tokenizer: PreTrainedTokenizerBase
) -> None:
    app = create_app(build_engine(onnx=fp32_dir, name="tiny-onnx"))
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=TestClient(app), max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny-onnx"]
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "what is your name"}]
    ids = prompt_ids(tokenizer, ["what is your name"])[0]
    expected = tokenizer.decode(torch_greedy(reference, ids, 10), skip_special_tokens=True)
    reply = client.chat.completions.create(model="tiny-onnx", messages=messages, max_tokens=10, temperature=0)
    assert reply.choices[0].message.content == expected
    stream = client.chat.completions.create(
        model="tiny-onnx", messages=messages, max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="alpha", messages=messages)


def test_export_and_run_errors_are_clear(tiny_llama_dir: Path, fp32_dir: Path, adapter: Path, tmp_path: Path) -> None:
    with pytest.raises(TunelabError, match="unknown precision"):
        export_onnx(str(tiny_llama_dir), tmp_path / "x", precision="int3")
    result = CliRunner().invoke(app, ["export", "onnx", "--precision", "int3", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "unknown precision 'int3'" in result.output  # one line, no traceback
    with pytest.raises(TunelabError, match="already exists"):
        export_onnx(str(tiny_llama_dir), fp32_dir, precision="fp32")
    with pytest.raises(TunelabError, match="not an ONNX export"):
        OnnxModel(tiny_llama_dir)
    with pytest.raises(TunelabError, match="merged export without LoRA slots"):
        build_engine(onnx=fp32_dir, adapters={"a": adapter})


@pytest.mark.slow
def test_embedded_model_fp32_parity_and_int4_agreement(tmp_path: Path) -> None:
    from tunelab.models import load_model, load_tokenizer, resolve

    source = resolve("embedded")
    model, tokenizer = load_model(source).eval(), load_tokenizer(source)
    prompts = prompt_ids(tokenizer)
    fp32 = export_onnx("embedded", tmp_path / "fp32", "fp32")
    diff = logits_max_abs_diff(model, fp32, prompts)
    int4 = export_onnx("embedded", tmp_path / "int4", "int4")
    agreement = greedy_agreement(model, int4, prompts, max_new_tokens=32)
    print(f"embedded: fp32 logits max |diff| {diff:.2e}; int4 greedy agreement {agreement}")
    assert diff < 1e-3
    assert agreement.rate > 0.5


def test_every_onnx_session_gets_the_physical_cores(fp32_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Left unset, onnxruntime-genai ran at half speed; both session kinds get an explicit thread count."""
    import onnxruntime_genai as og

    from tunelab.export.onnx import SequenceLogits, physical_cores

    overlays: list[dict] = []
    real_config, real_model = og.Config, og.Model

    class Recording:
        def __init__(self, path: str) -> None:
            self.inner = real_config(path)

        def overlay(self, text: str) -> None:
            overlays.append(json.loads(text))
            self.inner.overlay(text)

    monkeypatch.setattr(og, "Config", Recording)
    monkeypatch.setattr(og, "Model", lambda config: real_model(config.inner))
    OnnxModel(fp32_dir)
    OnnxModel(fp32_dir, threads=1)
    options = [o["model"]["decoder"]["session_options"]["intra_op_num_threads"] for o in overlays]
    assert options == [physical_cores(), 1]
    assert SequenceLogits(fp32_dir).session.get_session_options().intra_op_num_threads == physical_cores()
    assert SequenceLogits(fp32_dir, threads=1).session.get_session_options().intra_op_num_threads == 1


def test_export_progress_follows_the_builder_lines() -> None:
    # The builder's output, as each quantiser prints it: every layer read, then per layer (RTN) or a percentage.
    rtn = _BuilderProgress(layers=2, quantised=True)
    lines = ["Loading weights: 100%", "Reading layer 0", "Reading layer 1", "Reading final norm"]
    lines += [f"... complete quantization of /model/layers.{n}/mlp/down_proj/MatMul with 4 bits ..." for n in (0, 1)]
    assert [rtn.step(line) for line in lines] == [0, 25, 25, 0, 25, 25]
    k_quant = _BuilderProgress(layers=2, quantised=True)
    lines = ["Reading layer 0", "Reading layer 1", "Progress: [#########           ] 45.45%2026-11-30 ...",
             "Progress: [####################] 100.00%2026-11-30 ..."]
    assert [k_quant.step(line) for line in lines] == [25, 25, 22, 28]
    fp32 = _BuilderProgress(layers=3, quantised=False)
    assert [fp32.step(f"Reading layer {n}") for n in range(3)] == [33, 33, 34]  # whole points, 100 in all
