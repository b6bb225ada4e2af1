"""Load a base model with an optional adapter for generation, chat and export."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from tunelab.data.formats import ChatExample
from tunelab.data.render import tokenize
from tunelab.errors import TunelabError
from tunelab.layout import RunLayout
from tunelab.models import ModelSource, load_model, load_tokenizer, resolve


def load_for_inference(
    model: str, adapter: Path | None = None, load: Callable[[ModelSource], torch.nn.Module] = load_model
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The base model, with `adapter` applied when given (a PEFT adapter, or a fully fine-tuned model folder).
    `load` loads a model folder: the causal LM by default, a task's classifier for a head."""
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        if (adapter / "config.json").is_file():  # full fine-tuning saves the whole model
            source = resolve(str(adapter))
            return load(source).eval(), load_tokenizer(source)
        raise TunelabError(f"{adapter} is not an adapter folder (no adapter_config.json)")
    source = resolve(model)
    base = load(source)
    tokenizer = load_tokenizer(source)
    if adapter is None:
        return base.eval(), tokenizer
    return PeftModel.from_pretrained(base, adapter).eval(), tokenizer


def run_base_and_adapter(run: Path | None, model: str | None, adapter: Path | None) -> tuple[str, Path]:
    """(base model name, adapter folder) from a run folder, or from explicit --model/--adapter."""
    if run is not None:
        layout = RunLayout(run)
        if not layout.spec.is_file():
            raise TunelabError(f"{run} is not a tunelab run folder (no {layout.spec.name})")
        spec = yaml.safe_load(layout.spec.read_text(encoding="utf-8"))
        return str(spec["model"]["name"]), layout.adapter
    if model is None or adapter is None:
        raise TunelabError("give --run RUN_DIR, or both --model and --adapter")
    return model, adapter


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def token_counter(model: str) -> Callable[[ChatExample], int]:
    tokenizer = load_tokenizer(resolve(model))
    return lambda example: len(tokenize(example, tokenizer).input_ids)
