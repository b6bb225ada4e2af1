"""Save adapters and merged models in the formats their users' libraries open."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
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
    else:
        model.save_pretrained(out)  # type: ignore[operator]
    tokenizer.save_pretrained(out)
    return out


def save_merged(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out: Path) -> Path:
    """Fold the adapter into the base weights; the result opens with `AutoModelForCausalLM.from_pretrained`.

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
