"""QLoRA on CPU: the base is really quantised, the adapter learns, and the merged model (dequantised base +
update) generates exactly what the quantised base + adapter generates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import MethodSpec
from tunelab.methods.qlora import dequantized_base, quantization_config
from tunelab.models import load_model, resolve

bnb = pytest.importorskip("bitsandbytes")
ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _spec(tmp_path: Path, model_dir: Path, extra: str = "") -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"model: {{name: {model_dir}}}\n"
        f"method: {{name: qlora, r: 8, alpha: 16{extra}}}\n"
        f"data: {{train: {ROOT / 'data/chat/train.jsonl'}, validation: {ROOT / 'data/chat/validation.jsonl'}}}\n"
        "train: {max_steps: 10, batch_size: 4, lr: 5.0e-3, max_seq_len: 64}\n"
        "eval: {max_examples: 8, generations: 0, samples: 1, max_new_tokens: 8}\n"
        f"output_dir: {tmp_path / 'run'}\n",
        encoding="utf-8",
    )
    return spec


def test_base_is_quantised_to_4bit(tiny_llama_dir: Path) -> None:
    model = load_model(resolve(str(tiny_llama_dir)), quantization_config(MethodSpec(name="qlora")))
    quantised = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantised) == 2 * 7  # every projection of both layers
    assert quantised[0].weight.quant_state.quant_type == "nf4"


@pytest.mark.parametrize("extra", ["", ", bits: 8"])
def test_qlora_trains_and_merges_to_the_same_generations(tiny_llama_dir: Path, tmp_path: Path, extra: str) -> None:
    result = runner.invoke(app, ["train", str(_spec(tmp_path, tiny_llama_dir, extra))])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["after"]["loss"] < summary["before"]["loss"]

    spec = MethodSpec(name="qlora", bits=8 if "bits" in extra else 4)
    quantised = load_model(resolve(str(tiny_llama_dir)), quantization_config(spec))
    adapted = PeftModel.from_pretrained(quantised, tmp_path / "run/adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run/merged").eval()
    ids = torch.tensor([[0, 5, 17, 42, 99, 7]])
    kw = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 12, "do_sample": False}
    with torch.no_grad():
        # 4-bit computes with its dequantised weights: exact. 8-bit (LLM.int8) also quantises the activations.
        assert (adapted(ids).logits - merged(ids).logits).abs().max() < (0.25 if spec.bits == 8 else 1e-4)
        assert adapted.generate(input_ids=ids, **kw).tolist() == merged.generate(input_ids=ids, **kw).tolist()


def test_quantised_layers_compute_and_backpropagate_their_dequantised_weights(tiny_llama_dir: Path) -> None:
    """After an evaluation (eval mode, no grad: what the recipe does before training), a 4-bit model still computes,
    and back-propagates, exactly what an fp32 model with its dequantised weights does."""
    quantised = load_model(resolve(str(tiny_llama_dir)), quantization_config(MethodSpec(name="qlora")))
    ids = torch.tensor([[0, 5, 17, 42, 99, 7]])
    with torch.no_grad():
        quantised.eval()(ids)
    reference = dequantized_base(quantised, load_model(resolve(str(tiny_llama_dir))))
    grads = []
    for model in (quantised.train(), reference.train()):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds).logits
        logits.pow(2).mean().backward()
        grads.append((logits.detach(), embeds.grad))
    (logits_q, grad_q), (logits_r, grad_r) = grads
    assert (logits_q - logits_r).abs().max() < 1e-4
    assert torch.allclose(grad_q, grad_r, rtol=1e-4, atol=1e-6) and grad_r.abs().sum() > 0


def test_qdora_trains_and_stays_an_adapter(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(_spec(tmp_path, tiny_llama_dir, ", dora: true"))])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["after"]["loss"] < summary["before"]["loss"]
    assert (tmp_path / "run/adapter/adapter_config.json").is_file() and not (tmp_path / "run/merged").exists()


def _mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


def test_quantising_reads_the_checkpoint_without_mapping_it(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """While a QLoRA model loads, transformers' safetensors reader uses pread, so the checkpoint's pages never count
    in the process's memory; outside the load it maps the file as before."""
    import transformers.modeling_utils as loading

    from tunelab.models import _read_not_mapped

    # A copy no other test has opened: a model loaded earlier in this process may still map the original.
    checkpoint = tmp_path / "weights.safetensors"
    shutil.copy(tiny_llama_dir / "model.safetensors", checkpoint)
    with _read_not_mapped(), loading.safe_open(str(checkpoint), framework="pt", device="cpu", backend="mmap") as f:
        assert not _mapped(checkpoint)
        read = {k: f.get_slice(k)[:] for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    with loading.safe_open(str(checkpoint), framework="pt", device="cpu", backend="mmap") as f:
        assert _mapped(checkpoint)  # the check above can fail: the same call maps the file outside the block
        for key, tensor in read.items():
            assert torch.equal(f.get_tensor(key), tensor)
    assert loading.safe_open.__name__ == "safe_open"  # set back


def test_qlora_recomputes_activations_by_default_and_false_turns_it_off(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gradient_checkpointing: auto` is on for QLoRA even with memory to spare (its point is memory), with the
    same losses as without; `false` turns it off."""
    import io

    import transformers.modeling_utils as modeling
    from rich.console import Console

    import tunelab.recipe
    from tunelab.config import load_spec

    calls: list[int] = []
    original = modeling.checkpoint
    monkeypatch.setattr(modeling, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(tunelab.recipe, "available_memory", lambda processes=1: 1e3 * 2**30)  # 1,000 GiB free

    def run(setting: str) -> tuple[str, list[float]]:
        out = tmp_path / setting
        overrides = ["train.max_steps=3", "eval.enabled=false", f"output_dir={out}"]
        overrides += [] if setting == "auto" else [f"train.gradient_checkpointing={setting}"]
        log = io.StringIO()
        tunelab.recipe.run_job(load_spec(_spec(tmp_path, tiny_llama_dir, ", dropout: 0.0"), overrides),
                               console=Console(file=log, width=200))  # fmt: skip
        line = next(x for x in log.getvalue().splitlines() if x.startswith("activation checkpointing:"))
        return line, [json.loads(row)["loss"] for row in (out / "metrics.jsonl").read_text().splitlines()]

    line, auto = run("auto")
    assert line.startswith("activation checkpointing: on (auto: on for a quantised base") and len(calls) == 3 * 2
    line, off = run("false")
    assert line.startswith("activation checkpointing: off") and len(calls) == 3 * 2  # no more calls
    assert auto == pytest.approx(off, abs=1e-5)


@pytest.mark.parametrize(("dtype", "backend"), [(torch.bfloat16, "pread"), (torch.float32, "mmap")])
def test_a_checkpoint_loaded_in_another_dtype_is_read_not_mapped(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, backend: str
) -> None:
    """A bf16 checkpoint becomes fp32 copies, so its file is read (pread) rather than mapped beside them; an fp32
    one is used in place, mapped. Either way the weights are the checkpoint's."""
    import transformers.modeling_utils as loading

    folder = tmp_path / str(dtype)
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_llama_dir / name).is_file():
            shutil.copy(tiny_llama_dir / name, folder / name)
    backends: list[str] = []
    opened = loading.safe_open

    def recording(*args: object, **kwargs: object) -> object:
        backends.append(str(kwargs.get("backend", "")))
        return opened(*args, **kwargs)

    monkeypatch.setattr(loading, "safe_open", recording)
    model = load_model(resolve(str(folder)))
    assert backends == [backend]
    expected = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, expected[key]), key
