"""PEFT-based methods. Each builds a PEFT config from the MethodSpec; PEFT does the rest."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from peft import (
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)

from tunelab.methods.lean_dropout import lean_lora_dropout
from tunelab.methods.registry import VIRTUAL_TOKEN_SETTINGS, MethodInfo, register_method

if TYPE_CHECKING:
    from tunelab.config import MethodSpec

# Llama-style attention and MLP projections (Llama, Mistral, Qwen2, SmolLM).
LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Phi-3 fuses q/k/v and gate/up into single projections: targeting q_proj there would adapt nothing.
PHI3_MODULES = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def linear_module_names(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """The adapted projections for this architecture, found from the model's own module names."""
    present = linear_module_names(model)
    for family in (PHI3_MODULES, LLAMA_MODULES):
        chosen = [m for m in family if m in present]
        if chosen and (family is LLAMA_MODULES or "qkv_proj" in present):
            return chosen
    # Unknown architecture: every linear layer except the output head, PEFT's own convention.
    return sorted(present - {"lm_head", "score", "classifier"})


def peft_task_type(model: torch.nn.Module) -> TaskType:
    """PEFT's task type for the model's head. For a classification head it makes PEFT train and save the new
    `score` layer in full (modules_to_save) next to the adapter: a fresh head has nothing to adapt."""
    name = type(model).__name__  # transformers names each head class <Arch>For<Head>
    if name.endswith("ForSequenceClassification"):
        return TaskType.SEQ_CLS
    if name.endswith("ForTokenClassification"):
        return TaskType.TOKEN_CLS
    return TaskType.CAUSAL_LM


def _targets(model: torch.nn.Module, spec: MethodSpec) -> list[str]:
    return spec.target_modules or default_target_modules(model)


def _lora(**extra: Any) -> Any:
    def build(model: torch.nn.Module, spec: MethodSpec) -> torch.nn.Module:
        config = LoraConfig(
            task_type=peft_task_type(model),
            r=spec.r,
            lora_alpha=spec.alpha,  # type: ignore[arg-type]  # PEFT annotates int; floats work
            lora_dropout=spec.dropout,
            target_modules=_targets(model, spec),
            **extra,
        )
        wrapped = _wrap(model, config)
        lean_lora_dropout(wrapped)
        return wrapped

    return build


def _wrap(model: torch.nn.Module, config: PeftConfig) -> torch.nn.Module:
    return get_peft_model(model, config)


def _ia3(model: torch.nn.Module, spec: MethodSpec) -> torch.nn.Module:
    targets = spec.target_modules or [
        m for m in ("k_proj", "v_proj", "qkv_proj", "down_proj") if m in linear_module_names(model)
    ]
    feedforward = [m for m in targets if m in ("down_proj", "fc2", "mlp.c_proj")]
    config = IA3Config(task_type=peft_task_type(model), target_modules=targets, feedforward_modules=feedforward)
    return _wrap(model, config)


def _lycoris(config_cls: type[LoHaConfig] | type[LoKrConfig]) -> Any:
    """LoHa and LoKr (the LyCORIS family) share their options."""

    def build(model: torch.nn.Module, spec: MethodSpec) -> torch.nn.Module:
        config = config_cls(
            task_type=peft_task_type(model),
            r=spec.r,
            alpha=spec.alpha,  # type: ignore[arg-type]  # PEFT annotates int; floats work
            module_dropout=spec.dropout,
            target_modules=_targets(model, spec),
        )
        return _wrap(model, config)

    return build


def _prompt_tuning(model: torch.nn.Module, spec: MethodSpec) -> torch.nn.Module:
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=spec.num_virtual_tokens)
    return _wrap(model, config)


def _prefix_tuning(model: torch.nn.Module, spec: MethodSpec) -> torch.nn.Module:
    config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=spec.num_virtual_tokens)
    return _wrap(model, config)


for _info in (
    MethodInfo("lora", _lora(), "low-rank update B·A added to each target projection"),
    MethodInfo("dora", _lora(use_dora=True), "LoRA with the weight split into magnitude and direction"),
    MethodInfo("rslora", _lora(use_rslora=True), "LoRA scaled by alpha/sqrt(r): stable at high rank"),
    MethodInfo(
        "pissa",
        _lora(init_lora_weights="pissa_niter_4"),
        "LoRA initialised from the weight's principal singular vectors (fast SVD)",
    ),
    MethodInfo(
        "ia3", _ia3, "learned rescaling vectors on keys, values and MLP inputs", settings=frozenset({"target_modules"})
    ),
    MethodInfo("loha", _lycoris(LoHaConfig), "low-rank Hadamard product update"),
    MethodInfo("lokr", _lycoris(LoKrConfig), "low-rank Kronecker product update"),
    MethodInfo(
        "prompt_tuning",
        _prompt_tuning,
        "trainable virtual tokens prepended to the input",
        settings=VIRTUAL_TOKEN_SETTINGS,
        mergeable=False,
        prompt_learning=True,
    ),
    MethodInfo(
        "prefix_tuning",
        _prefix_tuning,
        "trainable key/value prefixes in every layer",
        settings=VIRTUAL_TOKEN_SETTINGS,
        mergeable=False,
        prompt_learning=True,
    ),
):
    register_method(_info)
