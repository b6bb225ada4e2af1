"""The chunked cross-entropy (train.chunked_loss, the default) gives the model's own loss and gradients, for every
kind of model input training sends it, a chunk of a few tokens at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tunelab.config import MethodSpec
from tunelab.data.packing import Row, collate
from tunelab.data.render import IGNORE
from tunelab.methods import apply_method
from tunelab.models import load_model, resolve
from tunelab.train import chunked_loss, objectives
from tunelab.train.objectives import CausalLM

CALLS: list[int] = []


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # 7 tokens per chunk on the tiny 512-word vocabulary: every batch below spans several chunks, one of them
    # partial, and some chunks hold only ignored labels.
    monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", 4 * 512 * 7)
    counted = objectives.chunked_cross_entropy

    def counting(hidden: torch.Tensor, *args: Any) -> torch.Tensor:
        CALLS.append(hidden.shape[0])
        return counted(hidden, *args)

    CALLS.clear()
    monkeypatch.setattr(objectives, "chunked_cross_entropy", counting)


def _rows(packed: bool) -> list[Row]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in (23, 17, 30):
        ids = torch.randint(5, 500, (n,), generator=gen).tolist()
        labels = [IGNORE] * 9 + ids[9:]  # a prompt nobody is scored on, as the chat rows have
        positions = list(range(11)) + list(range(n - 11)) if packed else list(range(n))
        rows.append(Row(input_ids=ids, labels=labels, position_ids=positions))
    return rows


def _loss_and_grads(
    model: torch.nn.Module, chunked: bool, batch: dict[str, torch.Tensor], bf16: bool = False
) -> tuple[float, list[torch.Tensor]]:
    objective = CausalLM(chunked)
    objective.setup(model, [], 0, 1)
    model.zero_grad(set_to_none=True)

    def forward(inputs: dict[str, Any], num_items: float) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(**inputs, num_items_in_batch=num_items, use_cache=False)

    calls = len(CALLS)
    loss, _ = objective.loss(forward, batch, 37.0)  # a step's item count larger than this batch's: accumulation
    # The chunked path ran (over every position but the last of each row) or, when asked not to, did not.
    assert CALLS[calls:] == ([batch["input_ids"].numel() - len(batch["input_ids"])] if chunked else [])
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    return float(loss.detach()), [p.grad.clone() for p in trainable if p.grad is not None]


def _model(tiny_llama_dir: Path, method: str, **settings: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    model = apply_method(load_model(resolve(str(tiny_llama_dir))), MethodSpec(name=method, **settings))
    # LoRA's B starts at zero, which would leave A's gradient zero: move it so every gradient is checked.
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.mark.parametrize(
    ("method", "settings", "packed"),
    [
        ("lora", {"r": 4, "alpha": 8, "dropout": 0.0}, False),
        ("lora", {"r": 4, "alpha": 8, "dropout": 0.0}, True),
        ("full", {}, False),  # the output layer trains: its weight's gradient comes from the chunks too
        ("prompt_tuning", {"num_virtual_tokens": 4}, False),  # virtual tokens before the labelled positions
    ],
)
def test_chunked_loss_equals_the_models_own(
    tiny_llama_dir: Path, method: str, settings: dict[str, Any], packed: bool
) -> None:
    model = _model(tiny_llama_dir, method, **settings)
    batch = collate(_rows(packed), 0, packed)
    own_loss, own_grads = _loss_and_grads(model, False, batch)
    loss, grads = _loss_and_grads(model, True, batch)
    assert loss == pytest.approx(own_loss, rel=1e-5)
    for got, want in zip(grads, own_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_chunked_loss_under_bf16_autocast_stays_close(tiny_llama_dir: Path) -> None:
    model = _model(tiny_llama_dir, "lora", r=4, alpha=8, dropout=0.0)
    batch = collate(_rows(False), 0, False)
    own_loss, own_grads = _loss_and_grads(model, False, batch, bf16=True)
    loss, grads = _loss_and_grads(model, True, batch, bf16=True)
    assert loss == pytest.approx(own_loss, rel=1e-2)
    for got, want in zip(grads, own_grads, strict=True):
        cosine = torch.nn.functional.cosine_similarity(got.flatten().float(), want.flatten().float(), dim=0)
        assert cosine > 0.99


def test_an_output_layer_a_method_wraps_falls_back_to_the_models_loss(tiny_llama_dir: Path) -> None:
    model = _model(tiny_llama_dir, "lora", r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "lm_head"])
    assert chunked_loss.output_layer(model) is None  # LoRA on lm_head: not a plain Linear any more
    objective = CausalLM()
    objective.setup(model, [], 0, 1)
    batch = collate(_rows(False), 0, False)
    loss, _ = objective.loss(lambda inputs, n: model(**inputs, num_items_in_batch=n, use_cache=False), batch, 37.0)
    assert not CALLS
    assert float(loss) > 0


def test_no_gradient_work_without_autograd(tiny_llama_dir: Path) -> None:
    """A validation pass (no_grad) gets the same loss and builds no graph."""
    model = _model(tiny_llama_dir, "lora", r=4, alpha=8, dropout=0.0)
    batch = collate(_rows(False), 0, False)
    objective = CausalLM()
    objective.setup(model, [], 0, 1)

    def forward(inputs: dict[str, Any], num_items: float) -> Any:
        return model(**inputs, num_items_in_batch=num_items, use_cache=False)

    with torch.no_grad():
        loss, _ = objective.loss(forward, batch, 37.0)
        own, _ = CausalLM(chunked=False).loss(forward, batch, 37.0)
    assert not loss.requires_grad
    assert float(loss) == pytest.approx(float(own), rel=1e-5)
