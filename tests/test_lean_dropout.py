"""LoRA's input dropout folded into lora_A (tunelab.methods.lean_dropout): the same function as PEFT's dropout +
lora_A for a given mask, masks at the asked rate that seeded runs and activation recompute draw again, less memory
kept for backward, and adapters PEFT saves, reloads and merges as its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel

from tunelab.config import MethodSpec
from tunelab.methods import apply_method
from tunelab.methods.lean_dropout import DroppedInputLinear, keep_mask, lean_lora_dropout


def _load(model_dir: Path) -> PreTrainedModel:
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model


def _adapted(model_dir: Path, name: str = "lora", lean: bool = True) -> torch.nn.Module:
    """The method as tunelab builds it (lean) or as PEFT alone builds it, from the same seed."""
    torch.manual_seed(0)
    if lean:
        return apply_method(_load(model_dir), MethodSpec(name=name, dropout=0.1))
    from unittest import mock

    with mock.patch("tunelab.methods.peft_methods.lean_lora_dropout", lambda model: 0):
        return apply_method(_load(model_dir), MethodSpec(name=name, dropout=0.1))


def test_forward_and_gradients_equal_dropout_then_linear_with_the_same_mask() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 8, bias=False)
    lean = DroppedInputLinear(linear, 0.1)
    x = torch.randn(3, 5, 64, requires_grad=True)
    upstream = torch.randn(3, 5, 8)
    torch.manual_seed(1)
    out = lean(x)
    out.backward(upstream)
    got = (out.detach(), x.grad.clone(), linear.weight.grad.clone())  # type: ignore[union-attr]
    torch.manual_seed(1)  # the same draw again
    keep = keep_mask(x, 0.1)
    assert 0 < keep.sum() < keep.numel()
    x.grad, linear.weight.grad = None, None
    expected = torch.nn.functional.linear(x * keep / 0.9, linear.weight)
    expected.backward(upstream)
    for a, b in zip(got, (expected.detach(), x.grad, linear.weight.grad), strict=True):
        torch.testing.assert_close(a, b)


def test_masks_keep_the_asked_share_and_repeat_from_the_same_seed() -> None:
    values = torch.zeros(1000, 1000)
    assert keep_mask(values, 0.05).float().mean().item() == pytest.approx(0.95, abs=2e-3)
    assert keep_mask(values, 0.3).float().mean().item() == pytest.approx(0.7, abs=2e-3)
    torch.manual_seed(7)
    first = keep_mask(values, 0.1)
    torch.manual_seed(7)
    assert torch.equal(first, keep_mask(values, 0.1))
    assert not torch.equal(first, keep_mask(values, 0.1))  # the next draw is another mask


def test_under_bf16_autocast_it_computes_in_bf16_and_returns_fp32_gradients() -> None:
    linear = torch.nn.Linear(32, 4, bias=False)
    x = torch.randn(6, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = DroppedInputLinear(linear, 0.2)(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert linear.weight.grad is not None and linear.weight.grad.dtype == torch.float32
    assert x.grad is not None and x.grad.dtype == torch.float32


@pytest.mark.parametrize("name", ["lora", "rslora", "pissa"])
def test_vanilla_lora_layers_are_folded_and_dora_is_left_to_peft(name: str, tiny_llama_dir: Path) -> None:
    model = _adapted(tiny_llama_dir, name)
    a_layers = [m for n, m in model.named_modules() if n.endswith("lora_A.default")]
    assert a_layers and all(isinstance(m, DroppedInputLinear) and m.p == 0.1 for m in a_layers)
    dora = _adapted(tiny_llama_dir, "dora")
    assert not any(isinstance(m, DroppedInputLinear) for m in dora.modules())
    assert lean_lora_dropout(apply_method(_load(tiny_llama_dir), MethodSpec(name="lora", dropout=0.0))) == 0


def _saved_bytes(model: torch.nn.Module, batch: torch.Tensor) -> int:
    """Bytes autograd keeps for backward over one training forward (each storage once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=batch, labels=batch)
    return sum(storages.values())


def test_it_keeps_less_for_backward_than_peft_and_learns_as_well(tiny_llama_dir: Path) -> None:
    batch = torch.randint(5, 200, (4, 64))
    lean, peft = _adapted(tiny_llama_dir), _adapted(tiny_llama_dir, lean=False)
    assert _saved_bytes(lean, batch) < 0.8 * _saved_bytes(peft, batch)
    finals = []
    for model in (lean, peft):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(1)
        losses = []
        for _ in range(12):
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < 0.8 * losses[0]
        finals.append(losses[-1])
    assert finals[0] == pytest.approx(finals[1], rel=0.1)  # other masks, the same learning


def test_activation_recompute_draws_the_same_masks(tiny_llama_dir: Path) -> None:
    batch = torch.randint(5, 200, (2, 32))
    grads = []
    for checkpointing in (False, True):
        model = _adapted(tiny_llama_dir)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.02)  # lora_B starts at zero: give lora_A a gradient
        torch.manual_seed(3)
        model(input_ids=batch, labels=batch).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_the_adapter_saves_reloads_and_merges_as_peft_s_own(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model = _adapted(tiny_llama_dir)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    batch = torch.randint(5, 200, (2, 16))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=batch).logits
        model.save_pretrained(tmp_path)  # type: ignore[operator]
        reloaded = PeftModel.from_pretrained(_load(tiny_llama_dir), tmp_path).eval()
        torch.testing.assert_close(reloaded(input_ids=batch).logits, expected)
        merged = model.merge_and_unload()  # type: ignore[operator]
        torch.testing.assert_close(merged(input_ids=batch).logits, expected, atol=1e-5, rtol=1e-4)
