"""Save adapters and merged models in the formats their users' libraries open."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from tunelab.errors import TunelabError


def save_adapter(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out: Path, pissa_init: Path | None = None
) -> Path:
    """PEFT adapters open with `PeftModel.from_pretrained`; a fully fine-tuned model is saved whole.

    PiSSA rewrites the base weights when it initialises; `pissa_init` (the adapter saved at initialisation)
    lets PEFT convert the result to a plain LoRA that applies to the original, untouched base model.
    """
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        init = str(pissa_init) if pissa_init else None
        model.save_pretrained(str(out), path_initial_model_for_weight_conversion=init)
        if init:
            _restore_trained_modules(model, out)
    else:
        model.save_pretrained(out)  # type: ignore[operator]
    tokenizer.save_pretrained(out)
    return out


def _restore_trained_modules(model: PeftModel, out: Path) -> None:
    """PEFT's PiSSA-to-LoRA conversion writes only the LoRA matrices (PEFT 0.21), dropping the modules trained in
    full next to them (modules_to_save: a classification head). They do not depend on the base, so they are
    added back as saved."""
    path = out / "adapter_model.safetensors"
    saved = load_file(path)
    dropped = {k: v for k, v in get_peft_model_state_dict(model).items() if k not in saved and "lora_" not in k}
    if dropped:
        save_file({**saved, **{k: v.detach().contiguous() for k, v in dropped.items()}}, path, {"format": "pt"})


def save_merged(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out: Path) -> Path:
    """Fold the adapter into the base weights; the result opens with `AutoModelForCausalLM.from_pretrained` (or
    the AutoModelFor*Classification class of a classification head).

    This unloads the adapter from `model`: call it last.
    """
    if isinstance(model, PeftModel):
        try:
            model = model.merge_and_unload()
        except (AttributeError, ValueError, NotImplementedError) as exc:
            raise TunelabError(f"this adapter cannot be merged ({exc}); use the adapter folder instead") from exc
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # type: ignore[operator]
    tokenizer.save_pretrained(out)
    return out
