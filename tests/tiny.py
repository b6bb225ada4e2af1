"""Tiny in-code models and tokenizer for fast tests: built in seconds, no network, no model download.

The tokenizer is a byte-level BPE (vocab ~512) trained on the repo's own chat data, with SmolLM2's ChatML
template and specials; the models are 2-layer Llama and Phi-3 with seeded random weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

ROOT = Path(__file__).parents[1]
CHAT_DATA = ROOT / "data" / "chat" / "train.jsonl"

BOS = "<|im_start|>"
EOS = "<|im_end|>"
PAD = "<|pad|>"
VOCAB_SIZE = 512
# Weights drawn with std 0.2, not the usual 0.02: with 0.02 a random model's frozen lm_head bounds every logit to about
# ±1, so its predictions stay near uniform and no adapter can lower the loss much. At 0.2 the random model is peaked,
# like a trained one, and every method's loss visibly falls within a few steps.
INIT_STD = 0.2

# SmolLM2-Instruct's template: ChatML, no BOS prepended by the tokenizer (the template writes <|im_start|>).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chat_texts(path: Path = CHAT_DATA) -> list[str]:
    """Every message text of an OpenAI-chat JSONL file, in order."""
    texts: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            texts.extend(str(m["content"]) for m in json.loads(line)["messages"])
    return texts


def build_tiny_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the chat data, wrap it with ChatML specials and template, save it to `out_dir`."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: lossless round trip
        show_progress=False,
    )
    backend.train_from_iterator(chat_texts(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    ids["pad_token_id"] = tokenizer.pad_token_id
    assert all(isinstance(v, int) for v in ids.values()) and len(set(ids.values())) == 3
    return ids


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> Path:
    ids = _special_ids(tokenizer)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_tiny_llama(out_dir: Path, tokenizer: PreTrainedTokenizerFast) -> Path:
    """A 2-layer Llama (hidden 64, GQA 4/2 heads), seeded, saved with the tokenizer into `out_dir`."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=INIT_STD,
        **_special_ids(tokenizer),
    )
    torch.manual_seed(0)
    return _save(LlamaForCausalLM(config), tokenizer, out_dir)


def build_tiny_phi3(out_dir: Path, tokenizer: PreTrainedTokenizerFast) -> Path:
    """A 2-layer Phi-3 (fused qkv_proj and gate_up_proj), seeded, saved with the tokenizer into `out_dir`."""
    config = Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        original_max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=INIT_STD,
        **_special_ids(tokenizer),
    )
    torch.manual_seed(0)
    return _save(Phi3ForCausalLM(config), tokenizer, out_dir)
