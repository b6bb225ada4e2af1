"""Every registered method x the behaviours users rely on: it trains, it saves and reloads exactly, it merges
(or truly cannot), and it adapts the right modules of each architecture. All on tiny in-code models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from tunelab.config import MethodSpec
from tunelab.errors import ConfigError
from tunelab.methods import apply_method, count_parameters, get_method, method_names
from tunelab.methods.peft_methods import LLAMA_MODULES, PHI3_MODULES, default_target_modules

ROOT = Path(__file__).parents[1]
# QLoRA quantises the base while it loads, so it has its own tests (tests/test_qlora.py).
METHODS = [m for m in method_names() if not get_method(m).quantized]
PEFT_METHODS = [m for m in METHODS if get_method(m).peft]
MERGEABLE_PEFT = [m for m in PEFT_METHODS if get_method(m).mergeable]
PROMPT_LEARNING = [m for m in METHODS if get_method(m).prompt_learning]
WEIGHT_ADAPTERS = [m for m in PEFT_METHODS if not get_method(m).prompt_learning]  # adapt target_modules

# Per-method learning rates that make the loss fall robustly in a few steps on the tiny model. The LoRA family
# moves fast at 1e-2; IA3 (a few hundred scaling factors) and the virtual-token methods need a larger step.
LR: dict[str, float] = {"full": 1e-3, "ia3": 3e-1, "prompt_tuning": 3e-1, "prefix_tuning": 3e-1}
DEFAULT_LR = 1e-2
TRAIN_STEPS = 15
WARM_STEPS = 3  # before save/merge checks: freshly initialised LoRA/IA3 adapters are the identity
ROWS, SEQ_LEN = 4, 48


def _spec(name: str) -> MethodSpec:
    """A small adapter without dropout, from the settings this method reads (the others are refused)."""
    wanted = {"r": 8, "alpha": 16, "dropout": 0.0}
    return MethodSpec.model_validate(
        {"name": name} | {k: v for k, v in wanted.items() if k in get_method(name).settings}
    )


def _load(model_dir: Path) -> PreTrainedModel:
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model


def _adapted(model_dir: Path, name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return apply_method(_load(model_dir), _spec(name))


def _train(model: torch.nn.Module, batch: torch.Tensor, name: str, steps: int) -> list[float]:
    """Plain AdamW steps on one fixed batch (labels = input_ids); returns the loss before each step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR.get(name, DEFAULT_LR), weight_decay=0.0)
    model.train()
    losses: list[float] = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits at the batch's own positions (prompt tuning also returns its virtual tokens': dropped)."""
    model.eval()
    with torch.no_grad():
        logits: torch.Tensor = model(input_ids=batch).logits
    return logits[:, -batch.shape[1] :]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _lora_layers(model: torch.nn.Module, module: str) -> list[str]:
    """Names of adapted `module` projections (any PEFT tuner layer wraps the original as `base_layer`)."""
    return [n for n, m in model.named_modules() if n.endswith(f".{module}") and hasattr(m, "base_layer")]


@pytest.fixture(scope="module")
def batch(tiny_tokenizer_dir: Path) -> torch.Tensor:
    """A fixed (4, 48) batch of real chat text: rendered conversations, concatenated and cut into rows."""
    tokenizer: Any = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ids: list[int] = []
    for line in (ROOT / "data/chat/train.jsonl").read_text(encoding="utf-8").splitlines()[:12]:
        text = tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert len(ids) >= ROWS * SEQ_LEN
    return torch.tensor(ids[: ROWS * SEQ_LEN]).view(ROWS, SEQ_LEN)


def test_the_matrix_covers_every_method() -> None:
    assert set(method_names()) - set(METHODS) == {"qlora"}
    assert set(METHODS) == {
        "lora",
        "dora",
        "rslora",
        "pissa",
        "ia3",
        "loha",
        "lokr",
        "prompt_tuning",
        "prefix_tuning",
        "full",
    }


# 1. Training lowers the loss, and only the method's own parameters train.


@pytest.mark.parametrize("name", METHODS)
def test_trains_and_the_loss_falls(name: str, tiny_llama_dir: Path, batch: torch.Tensor) -> None:
    model = _adapted(tiny_llama_dir, name)
    trainable, total = count_parameters(model)
    if get_method(name).peft:
        assert isinstance(model, PeftModel)
        assert 0 < trainable < total
    else:
        assert trainable == total
    losses = _train(model, batch, name, TRAIN_STEPS)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


# 2. Saved and reloaded, the model computes exactly what it computed in memory.


@pytest.mark.parametrize("name", [m for m in METHODS if m != "pissa"])
def test_save_and_reload_gives_identical_logits(
    name: str, tiny_llama_dir: Path, batch: torch.Tensor, tmp_path: Path
) -> None:
    model = _adapted(tiny_llama_dir, name)
    _train(model, batch, name, WARM_STEPS)
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path)  # type: ignore[operator]
    if get_method(name).peft:
        reloaded: torch.nn.Module = PeftModel.from_pretrained(_load(tiny_llama_dir), tmp_path)
    else:
        reloaded = _load(tmp_path)
    assert _max_diff(_logits(reloaded, batch), _logits(_load(tiny_llama_dir), batch)) > 1e-3  # training did something
    torch.testing.assert_close(_logits(reloaded, batch), expected, atol=1e-6, rtol=0)


def test_pissa_adapter_reloads_on_the_original_base(tiny_llama_dir: Path, batch: torch.Tensor, tmp_path: Path) -> None:
    """PiSSA subtracts its initial B0·A0 from the base weights in place. Saved as is, the adapter only fits that
    residual base; PEFT's conversion (the adapter saved at initialisation, passed back at save time) rewrites it as
    a plain rank-2r LoRA, ΔW = B·A − B0·A0, that applies to the original, untouched base model.

    The conversion is exact in exact arithmetic, but W·x + ΔW·x and W_res·x + B·A·x round differently: the residual
    W_res = W − B0·A0 is itself rounded to float32 at initialisation (PEFT refuses to run PiSSA in float64). That
    costs ~3e-5 on logits of magnitude ~7 (4e-6 relative), so this comparison uses the merge tolerance, 1e-4.
    """
    original = _logits(_load(tiny_llama_dir), batch)
    model = _adapted(tiny_llama_dir, "pissa")
    assert isinstance(model, PeftModel)
    assert _max_diff(_logits(model, batch), original) < 1e-4  # residual + B0·A0 == W at initialisation

    # At initialisation, before any step: save the starting adapter, marked so that loading it does not re-run the SVD.
    init_dir = tmp_path / "pissa_init"
    config: Any = model.peft_config["default"]
    saved_init, config.init_lora_weights = config.init_lora_weights, True
    model.save_pretrained(str(init_dir))
    config.init_lora_weights = saved_init

    _train(model, batch, "pissa", WARM_STEPS)
    expected = _logits(model, batch)
    model.save_pretrained(str(tmp_path / "naive"))  # what a plain save gives: an adapter for the residual base only
    model.save_pretrained(str(tmp_path / "adapter"), path_initial_model_for_weight_conversion=str(init_dir))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 16 and saved["lora_alpha"] == 32 and saved["init_lora_weights"] is True  # a plain LoRA

    base = _load(tiny_llama_dir)
    untouched = {k: v.clone() for k, v in base.state_dict().items()}
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert _max_diff(_logits(reloaded, batch), original) > 1e-3  # the adapter does something
    torch.testing.assert_close(_logits(reloaded, batch), expected, atol=1e-4, rtol=0)
    # Loading did not modify the base: unloading the adapter gives the original weights back.
    for key, value in reloaded.unload().state_dict().items():
        torch.testing.assert_close(value, untouched[key], atol=0, rtol=0)

    # Without the conversion the adapter does not reproduce the trained model on the original base.
    naive = PeftModel.from_pretrained(_load(tiny_llama_dir), tmp_path / "naive")
    assert _max_diff(_logits(naive, batch), expected) > 1e-2


# 3. Merging folds the adapter into the weights without changing the outputs; the flag matches PEFT's reality.


@pytest.mark.parametrize("name", METHODS)
def test_merge_gives_the_same_logits(name: str, tiny_llama_dir: Path, batch: torch.Tensor) -> None:
    info = get_method(name)
    model = _adapted(tiny_llama_dir, name)
    _train(model, batch, name, WARM_STEPS)
    if not info.peft:
        # Full fine-tuning: the trained model already is the merged model.
        assert info.mergeable and not isinstance(model, PeftModel)
        return
    assert isinstance(model, PeftModel)
    expected = _logits(model, batch)
    if not info.mergeable:
        assert name in PROMPT_LEARNING
        with pytest.raises((AttributeError, ValueError, NotImplementedError)):
            model.merge_and_unload()
        return
    merged = model.merge_and_unload()
    assert not isinstance(merged, PeftModel)
    assert not any(hasattr(m, "base_layer") for m in merged.modules())
    assert _max_diff(_logits(merged, batch), expected) < 1e-4


def test_the_mergeable_flags() -> None:
    assert {m for m in METHODS if not get_method(m).mergeable} == {"prompt_tuning", "prefix_tuning"}


# 4. Default target modules fit the architecture.


def test_default_target_modules_on_llama(tiny_llama_dir: Path) -> None:
    assert default_target_modules(_load(tiny_llama_dir)) == LLAMA_MODULES
    assert set(LLAMA_MODULES) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_default_target_modules_on_phi3(tiny_phi3_dir: Path) -> None:
    assert default_target_modules(_load(tiny_phi3_dir)) == PHI3_MODULES
    assert set(PHI3_MODULES) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


@pytest.mark.parametrize("name", WEIGHT_ADAPTERS)
def test_weight_adapters_adapt_and_train_the_fused_phi3_projections(
    name: str, tiny_phi3_dir: Path, batch: torch.Tensor
) -> None:
    model = _adapted(tiny_phi3_dir, name)
    assert len(_lora_layers(model, "qkv_proj")) == 2  # one per layer: the fused attention input is adapted
    assert not _lora_layers(model, "lm_head")
    if name != "ia3":  # IA3 scales keys/values (qkv_proj here) and the MLP input (down_proj) only
        for module in PHI3_MODULES:
            assert len(_lora_layers(model, module)) == 2, module
    losses = _train(model, batch, name, TRAIN_STEPS)
    assert losses[-1] < 0.9 * losses[0], f"{name} on Phi-3: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_lora_on_phi3_has_lora_weights_on_qkv_proj(tiny_phi3_dir: Path) -> None:
    model = _adapted(tiny_phi3_dir, "lora")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("qkv_proj.lora_A" in n for n in names) and any("qkv_proj.lora_B" in n for n in names)
    assert any("gate_up_proj.lora_A" in n for n in names)


# 5. Unknown names fail with the list of valid ones.


def test_unknown_method_lists_the_valid_names(tiny_llama_dir: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        get_method("lorra")
    message = str(excinfo.value)
    assert "lorra" in message
    assert all(name in message for name in METHODS)
    with pytest.raises(ConfigError):
        apply_method(_load(tiny_llama_dir), _spec("lorra"))
