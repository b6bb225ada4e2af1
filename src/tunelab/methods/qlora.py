"""QLoRA: the base model's linear layers quantised by bitsandbytes (4-bit NF4 with double quantisation, or 8-bit),
a LoRA (or DoRA) trained on top in the compute dtype. bitsandbytes runs on CPU as well as CUDA.

Quantisation happens while the model loads (`quantization_config`), so the recipe asks the method for it. Merging
must not fold the update into the original fp32 weights: training saw the *quantised* weights, so the merged model
is built from their dequantised values (`dequantized_base`), which is what base + adapter computes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig

from tunelab.errors import TunelabError
from tunelab.extras import optional_import
from tunelab.methods.lean_dropout import lean_lora_dropout
from tunelab.methods.peft_methods import default_target_modules
from tunelab.methods.registry import LORA_SETTINGS, MethodInfo, register_method

if TYPE_CHECKING:
    from tunelab.config import MethodSpec

FEATURE = "method qlora (a 4-bit or 8-bit base)"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def quantization_config(spec: MethodSpec) -> BitsAndBytesConfig:
    _check_backend()
    if spec.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,  # quantise the quantisation constants too: ~0.4 bit/parameter saved
        bnb_4bit_compute_dtype=DTYPES[spec.compute_dtype],
    )


def _check_backend() -> None:
    optional_import("bitsandbytes", "qlora", FEATURE)


def _build(model: torch.nn.Module, spec: MethodSpec) -> torch.nn.Module:
    # Casts norms to fp32 and lets gradients reach the adapter through frozen quantised layers.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=spec.r,
        lora_alpha=spec.alpha,  # type: ignore[arg-type]  # PEFT annotates int; floats work
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules or default_target_modules(model),
        use_dora=spec.dora,
    )
    wrapped = get_peft_model(model, config)
    lean_lora_dropout(wrapped)
    return wrapped


@torch.no_grad()
def dequantized_base(quantized: torch.nn.Module, fp32_base: torch.nn.Module) -> torch.nn.Module:
    """`fp32_base` with every quantised linear weight of `quantized` (a PEFT model or a bare model) replaced by its
    dequantised value, so that merging an adapter into it reproduces what the adapter computed in training."""
    bnb = optional_import("bitsandbytes", "qlora", FEATURE)
    from peft.utils.integrations import dequantize_module_weight

    targets = dict(fp32_base.named_modules())
    for name, module in quantized.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt):
            continue
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        target = targets.get(key)
        if not isinstance(target, torch.nn.Linear):
            raise TunelabError(f"cannot dequantise {name}: no matching linear layer {key} in the base model")
        target.weight.copy_(dequantize_module_weight(module).to(target.weight.dtype))
    return fp32_base


register_method(
    MethodInfo(
        "qlora",
        _build,
        "LoRA (or DoRA: method.dora) on a 4-bit NF4 (or 8-bit: method.bits) quantised base",
        settings=LORA_SETTINGS | {"bits", "compute_dtype", "dora"},
        quantized=True,
    )
)
