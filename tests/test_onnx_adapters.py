"""Several LoRA adapters on one ONNX base (tunelab export onnx --runtime-adapter; tunelab serve --onnx): each adapter
answers exactly as that adapter merged and exported alone; the base alone answers as the base export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.errors import TunelabError
from tunelab.export.onnx import MANIFEST, OnnxModel, export_onnx, prompt_ids, torch_greedy
from tunelab.inference_server.app import create_app
from tunelab.serving.engines import build_engine

# Two adapters unlike each other: other ranks, other modules, rsLoRA's scaling on one.
ADAPTERS = {
    "alpha": LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False),
    "beta": LoraConfig(
        r=8, lora_alpha=8, target_modules=["k_proj", "o_proj", "down_proj"], init_lora_weights=False, use_rslora=True
    ),
}


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folders = {}
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed)
        folders[name] = tmp_path_factory.mktemp(name)
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), config).save_pretrained(folders[name])
    return folders


@pytest.fixture(scope="module")
def exports(tiny_llama_dir: Path, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The multi-adapter fp32 export (through the real command line), and beside it each adapter merged alone
    (the base alone is checked against PyTorch: tests/test_onnx.py shows fp32 exports generate as PyTorch does)."""
    root = tmp_path_factory.mktemp("exports")
    args = ["export", "onnx", "-m", str(tiny_llama_dir), "--precision", "fp32", "--out", str(root / "multi")]
    args += [arg for name, path in adapters.items() for arg in ("--runtime-adapter", f"{name}={path}")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"adapter beta: {root / 'multi'}/adapters/beta.onnx_adapter" in result.stdout
    for name, path in adapters.items():
        export_onnx(str(tiny_llama_dir), root / name, precision="fp32", adapter=path)
    return root


def _greedy(model: OnnxModel, adapter: str | None = None) -> list[list[int]]:
    return [model.greedy(ids, 12, ignore_eos=True, adapter=adapter) for ids in prompt_ids(model.tokenizer)[:4]]


def test_each_adapter_answers_as_it_does_merged_alone(exports: Path, tiny_llama_dir: Path) -> None:
    multi = OnnxModel(exports / "multi")
    assert sorted(multi.adapters) == ["alpha", "beta"]
    assert json.loads((exports / "multi" / MANIFEST).read_text())["adapters"]["alpha"] == "adapters/alpha.onnx_adapter"
    answers = {name: _greedy(multi, name) for name in (None, "alpha", "beta", "alpha")}  # alpha again after beta
    for name in ("alpha", "beta"):
        assert answers[name] == _greedy(OnnxModel(exports / name)), name
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    assert answers[None] == [torch_greedy(base, ids, 12, ignore_eos=True) for ids in prompt_ids(multi.tokenizer)[:4]]
    assert len({json.dumps(a) for a in answers.values()}) == 3  # the adapters really change the answers


def test_the_server_switches_adapters_per_request(exports: Path, adapters: dict[str, Path]) -> None:
    """Two adapters from the export, a third given at serve time as a PEFT folder (converted on the spot)."""
    engine = build_engine(onnx=exports / "multi", name="tiny", adapters={"alpha-again": adapters["alpha"]})
    client = TestClient(create_app(engine))
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny", "alpha", "beta", "alpha-again"]

    def reply(model: str) -> str:
        body = {"model": model, "prompt": "the cat", "max_tokens": 8, "temperature": 0}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return str(response.json()["choices"][0]["text"])

    texts = {model: reply(model) for model in ("tiny", "alpha", "beta", "alpha-again")}
    assert texts["alpha"] == texts["alpha-again"]
    assert len({texts["tiny"], texts["alpha"], texts["beta"]}) == 3
    alone = TestClient(create_app(build_engine(onnx=exports / "beta", name="beta")))
    body = {"model": "beta", "prompt": "the cat", "max_tokens": 8, "temperature": 0}
    assert alone.post("/v1/completions", json=body).json()["choices"][0]["text"] == texts["beta"]


def test_adapters_that_are_more_than_lora_are_refused(
    tiny_llama_dir: Path, exports: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    dora = tmp_path / "dora"
    config = LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), config).save_pretrained(dora)
    with pytest.raises(TunelabError, match=r"adapter 'd'.*DoRA.*tunelab export onnx --adapter"):
        export_onnx(str(tiny_llama_dir), tmp_path / "x", precision="fp32", runtime_adapters={"d": dora})
    assert not (tmp_path / "x").exists()
    gate = tmp_path / "gate"  # a module the base has no slot for
    config = LoraConfig(r=2, target_modules=["gate_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), config).save_pretrained(gate)
    with pytest.raises(TunelabError, match=r"gate_proj.*has no slot"):
        build_engine(onnx=exports / "multi", adapters={"gate": gate})
    with pytest.raises(TunelabError, match="choose one"):
        export_onnx(str(tiny_llama_dir), tmp_path / "y", adapter=adapters["alpha"], runtime_adapters=adapters)


def test_int4_base_keeps_the_adapters_in_fp32(
    tiny_llama_dir: Path, adapters: dict[str, Path], exports: Path, tmp_path: Path
) -> None:
    """Quantised, the base's MatMuls become MatMulNBits and the adapters' stay float MatMuls fed by the files."""
    import onnx

    out = export_onnx(str(tiny_llama_dir), tmp_path / "int4", precision="int4", runtime_adapters=adapters)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    lora = [n for n in graph.node if "/lora_" in n.name]
    assert lora and all(n.op_type == "MatMul" for n in lora)
    assert any(n.op_type == "MatMulNBits" for n in graph.node)
    quantised = OnnxModel(out)
    assert _greedy(quantised, "alpha") != _greedy(quantised, "beta")


def test_agreement_is_measured_with_the_adapter_active(
    exports: Path, adapters: dict[str, Path], tiny_llama_dir: Path
) -> None:
    """bench/onnx_adapter.py's measure: plain ONNX Runtime with the .onnx_adapter file, and the generation loop."""
    from peft import PeftModel

    from tunelab.export.onnx import greedy_agreement

    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), adapters["beta"]).eval()
    prompts = prompt_ids(OnnxModel(exports / "multi").tokenizer)[:3]
    with_adapter = greedy_agreement(tuned, exports / "multi", prompts, max_new_tokens=8, adapter="beta")
    assert with_adapter.rate == 1.0 and with_adapter.exact == 3
    without = greedy_agreement(tuned, exports / "multi", prompts, max_new_tokens=8)  # the base alone: it differs
    assert without.rate < 0.5
