"""`tunelab export gguf`: a merged Llama-architecture model as one GGUF file for llama.cpp and Ollama.

Built on the `gguf` package (llama.cpp's own Python library): its tensor name map, its quantisers and its
`SpecialVocab` reader do the format work; this module only chooses what goes where, as llama.cpp's
`convert_hf_to_gguf.py` does for `LlamaModel` (that script is not published as a library).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from tunelab.errors import TunelabError
from tunelab.train.progress import phase

# The types `gguf.quants` can write; K-quants (q4_k, ...) are only read there, so llama.cpp's own
# `llama-quantize` makes them from the f16 file.
QUANT_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (gguf.GGMLQuantizationType.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (gguf.GGMLQuantizationType.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (gguf.GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA}
CHATML_STOPS = ("<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class GgufExport:
    path: Path
    modelfile: Path
    quant: str
    tensors: int


def export_gguf(
    model_dir: Path, out: Path, quant: str = "q8_0", system: str | None = None, name: str | None = None
) -> GgufExport:
    """Write `out` (a .gguf file) from a merged Hugging Face model folder, and a `Modelfile` beside it.
    `name` is the model's name in the file (default: the folder's); `system` the Modelfile's system message."""
    qtype, file_type = _quant_type(quant)
    arch = _architecture(AutoConfig.from_pretrained(model_dir))  # refuse before loading any weights
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed at the end: an interrupted export never leaves a truncated .gguf.
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[arch])
    try:
        _write_hparams(writer, model.config, file_type, name or model_dir.name)
        _write_vocab(writer, tokenizer, model_dir, model.config.vocab_size)
        state = _exported(model.state_dict(), model.config)
        # Quantising is the long part (q8_0 of a 135M model: tens of seconds): shown when the caller asks for it.
        with phase("tensors", len(state), "tensors") as shown:
            for tensor_name, data in _tensors(state, model.config, arch, qtype):
                writer.add_tensor(tensor_name, data.array, raw_dtype=data.qtype)
                shown.advance(1)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    partial.replace(out)
    return GgufExport(out, write_modelfile(out, tokenizer, system), quant, len(state))


def _quant_type(quant: str) -> tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]:
    if quant not in QUANT_TYPES:
        hint = " (K-quants: export f16, then run llama.cpp's llama-quantize on it)" if "_k" in quant else ""
        raise TunelabError(f"--quant {quant!r} is not supported; choose one of: {', '.join(QUANT_TYPES)}{hint}")
    return QUANT_TYPES[quant]


def _architecture(config: PretrainedConfig) -> gguf.MODEL_ARCH:
    if config.model_type not in ARCHITECTURES:
        raise TunelabError(
            f"GGUF export supports the {', '.join(ARCHITECTURES)} architecture, not {config.model_type!r}: "
            "use the merged Hugging Face folder, or llama.cpp's convert_hf_to_gguf.py on it"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise TunelabError(f"GGUF export supports plain RoPE only, not rope_type {rope['rope_type']!r}")
    return ARCHITECTURES[config.model_type]


def _write_hparams(writer: gguf.GGUFWriter, config: Any, file_type: gguf.LlamaFileType, name: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_vocab(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, model_dir: Path, n_vocab: int) -> None:
    """GPT-2 style byte-level BPE: tokens as the vocabulary spells them, their types, merges, specials, template."""
    tokens, types = _tokens(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(model_dir))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    # Say explicitly whether BOS/EOS are added: llama.cpp's default for BPE vocabularies adds BOS, which would
    # double ChatML's <|im_start|> (SmolLM2's BOS) in front of every prompt.
    probe = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = bool(probe) and probe[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = bool(probe) and probe[-1] == tokenizer.eos_token_id
    if tokenizer.chat_template and special.chat_template is None:
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


def _tokens(tokenizer: PreTrainedTokenizerBase, n_vocab: int) -> tuple[list[str], list[int]]:
    """As convert_hf_to_gguf's get_vocab_base: added special tokens are CONTROL, other added ones USER_DEFINED,
    and ids the tokenizer lacks (a vocabulary padded to a round size) are placeholders."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _pre_tokenizer(model_dir: Path) -> str:
    """llama.cpp's name for how text is split before BPE, read from tokenizer.json's pre_tokenizer.

    convert_hf_to_gguf recognises a tokenizer by hashing its output on a test text; tokenizer.json states the
    split directly, so the known shapes are matched here and anything else is refused rather than guessed.
    """
    spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    steps = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        regex = steps[0].get("pattern", {}).get("Regex")
        for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
            if split == regex:
                return name
    raise TunelabError(
        f"GGUF export: the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) has no llama.cpp name "
        "known here; use llama.cpp's convert_hf_to_gguf.py on the merged folder"
    )


@dataclass(frozen=True)
class _Tensor:
    array: np.ndarray
    qtype: gguf.GGMLQuantizationType


def _exported(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    # Tied embeddings are written once: llama.cpp reuses token_embd when the file has no output.weight.
    return {k: v for k, v in state.items() if not (k == "lm_head.weight" and config.tie_word_embeddings)}


def _tensors(
    state: dict[str, torch.Tensor], config: Any, arch: gguf.MODEL_ARCH, qtype: gguf.GGMLQuantizationType
) -> Iterator[tuple[str, _Tensor]]:
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for hf_name, tensor in state.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise TunelabError(f"GGUF export: no llama.cpp name for tensor {hf_name!r}")
        data = _permuted(hf_name, tensor.detach().float().numpy(), config)
        yield name, _quantized(data, qtype)


def _permuted(hf_name: str, data: np.ndarray, config: Any) -> np.ndarray:
    """llama.cpp's RoPE pairs dimensions (i, i+1) where Hugging Face's pairs (i, i+d/2), so q and k rows are
    reordered per head, as convert_hf_to_gguf's LlamaModel.permute does (transformers' reader undoes it)."""
    if hf_name.endswith("q_proj.weight"):
        heads = config.num_attention_heads
    elif hf_name.endswith("k_proj.weight"):
        heads = config.num_key_value_heads
    else:
        return data
    rows = data.shape[0]
    return data.reshape(heads, 2, rows // heads // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


def _quantized(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> _Tensor:
    # Norms and other 1-D tensors stay f32, as llama.cpp keeps them; a matrix whose rows do not split into the
    # type's blocks falls back to f16, as convert_hf_to_gguf does.
    if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return _Tensor(data.astype(np.float32), gguf.GGMLQuantizationType.F32)
    try:
        return _Tensor(gguf.quants.quantize(data, qtype), qtype)
    except gguf.QuantError:
        return _Tensor(data.astype(np.float16), gguf.GGMLQuantizationType.F16)


def write_modelfile(gguf_path: Path, tokenizer: PreTrainedTokenizerBase, system: str | None = None) -> Path:
    """An Ollama Modelfile beside the GGUF file: `ollama create NAME -f Modelfile`, then `ollama run NAME`."""
    lines = [f"FROM ./{gguf_path.name}", ""]
    if "<|im_start|>" in str(tokenizer.chat_template or ""):
        lines += [f'TEMPLATE """{CHATML_TEMPLATE}"""', ""]
        lines += [f'PARAMETER stop "{stop}"' for stop in CHATML_STOPS]
    else:
        # Ollama reads the GGUF's own chat template when the Modelfile gives none.
        lines.append("# no TEMPLATE: Ollama uses the chat template stored in the GGUF file")
    system = system or _default_system(str(tokenizer.chat_template or ""))
    if system:
        lines += ["", f'SYSTEM """{system}"""']
    path = gguf_path.parent / "Modelfile"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _default_system(chat_template: str) -> str | None:
    """The system message a chat template writes when the conversation has none (SmolLM2's: "You are a helpful AI
    assistant named SmolLM, ..."): training and tunelab's generation saw it, so Ollama must send it too."""
    found = re.search(r"<\|im_start\|>system(?:\\n|\n)(.+?)<\|im_end\|>", chat_template)
    return found.group(1) if found else None


# ChatML in Ollama's Go-template syntax: every message as <|im_start|>role\ncontent<|im_end|>\n, then the
# assistant's turn opened when the last message is not the assistant's (as add_generation_prompt does).
CHATML_TEMPLATE = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}"
    '{{- if ne .Role "system" }}'
    "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    "{{ end }}"
    "{{- end }}<|im_start|>assistant\n"
)
