"""`tunelab plan`: parameter counts from configs alone, the ZeRO formulas, and the CLI answer."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.plan import KNOWN, GiB, estimate, model_shape

runner = CliRunner()


def test_known_architectures_have_their_published_sizes() -> None:
    assert model_shape(KNOWN["phi-3-mini"]).params == 3_821_079_552  # Phi-3-mini: "3.8B"
    assert model_shape(KNOWN["smollm2-135m"]).params == 134_515_008  # the embedded model, counted when loaded
    assert model_shape(KNOWN["llama-3-8b"]).params == 8_030_261_248
    assert model_shape(KNOWN["tinyllama-1.1b"]).params == 1_100_048_384  # TinyLlama-1.1B's safetensors


def test_lora_trainable_count_matches_peft_on_the_embedded_architecture() -> None:
    # 4,884,480 is what PEFT reports for r=16 on all seven projections of SmolLM2-135M (`tunelab methods`).
    assert estimate(model_shape(KNOWN["smollm2-135m"]), "lora", seq_len=1, batch=1).trainable == 4_884_480


def test_zero_stages_shard_what_they_promise() -> None:
    shape = model_shape(KNOWN["phi-3-mini"])
    kw = {"seq_len": 512, "batch": 1, "devices": 4}
    ddp = estimate(shape, "full", strategy="ddp", **kw)
    z1, z2, z3 = (estimate(shape, "full", strategy=s, **kw) for s in ("zero1", "zero2", "zero3"))
    assert z1.optimizer == pytest.approx(ddp.optimizer / 4) and z1.gradients == ddp.gradients
    assert z2.gradients == pytest.approx(ddp.gradients / 4) and z2.weights == ddp.weights
    assert z3.weights == pytest.approx(ddp.weights / 4)
    offloaded = estimate(shape, "full", strategy="zero3", offload="optimizer", **kw)
    assert offloaded.optimizer == 0 and offloaded.total < z3.total


def test_qlora_weights_are_about_an_eighth_of_fp32_for_the_projections() -> None:
    shape = model_shape(KNOWN["phi-3-mini"])
    lora, qlora = (estimate(shape, m, seq_len=1, batch=1).weights for m in ("lora", "qlora"))
    assert 0.12 < qlora / lora < 0.3  # projections at ~4.1 bits, embeddings and head stay fp32


def test_plan_cli_answers_for_phi3_on_a_24gb_gpu(tmp_path: Path) -> None:
    args = ["plan", "--model", "phi-3-mini", "--device-memory", "24", "--tflops", "150", "--bf16"]
    result = runner.invoke(app, [*args, "--seq-len", "2048", "--batch", "4", "--checkpointing"])
    assert result.exit_code == 0, result.output
    assert "recommended: lora" in result.output, result.output
    full = estimate(model_shape(KNOWN["phi-3-mini"]), "full", seq_len=2048, batch=4, bf16=True)
    assert full.total > 24 * GiB  # full fine-tuning of 3.8B does not fit in 24 GB without sharding
