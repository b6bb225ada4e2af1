"""`tunelab plan`: will it fit? Memory per device and a time estimate for a model, method and strategy, from the
model's config alone (the model is built on the meta device: no weights are read or downloaded).

Memory per device, in bytes (P = parameters, T = trainable parameters, N = devices):
- weights: P x bytes/parameter (fp32 4, bf16 2; QLoRA: linear layers at 4.127 bits with double quantisation,
  the rest in the compute dtype); ZeRO-3 divides them by N; parameter offload moves them to CPU.
- gradients: T x 4; ZeRO-2 and 3 divide them by N.
- optimizer (AdamW): T x 8 (two fp32 moments), + T x 4 fp32 master weights when training in bf16, + T x 4 for the
  step's temporary (PyTorch's foreach AdamW computes sqrt(v) for all tensors at once);
  ZeRO-1/2/3 divide them by N; optimizer offload moves them to CPU.
- activations: per layer and token, the tensors a Llama-style block keeps for backward
  (about 7h + 2kv + 4i values with SDPA attention, which stores no attention matrix); with activation
  checkpointing only each layer's input (h) plus one layer's full set; plus the loss: with the chunked
  cross-entropy (train.chunked_loss, the default) two fp32 chunks of logits (train/chunked_loss.py's CHUNK_BYTES)
  and the hidden states' gradient (h per token), with the model's own loss the logits and their gradient
  (3 x vocabulary values per token). LoRA-family adapters with dropout keep a mask over each adapted projection's
  input (6h + i values per layer and token for the seven Llama projections): one byte a value for tunelab's lean
  dropout (methods/lean_dropout.py), and for DoRA (PEFT's own dropout) a float mask and the dropped-out input.
- runtime: the framework itself — the interpreter and libraries on CPU (RUNTIME_GIB, measured: RSS after
  importing tunelab's training stack), the CUDA context on a GPU (about the same).
Time: 6P FLOPs per token for full fine-tuning, 4P for adapters (no weight gradients for the frozen base), divided
by the device's FLOP/s times an assumed utilisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Phi3Config, PretrainedConfig

from tunelab.train.chunked_loss import CHUNK_BYTES

Strategy = Literal["single", "ddp", "zero1", "zero2", "zero3"]
Offload = Literal["none", "optimizer", "parameters"]
GiB = 1024**3
QLORA_BITS = 4.127  # NF4 plus double-quantised block constants (Dettmers et al., 2023)
RUNTIME_GIB = 0.45  # RSS of a process that imported torch, transformers, peft and tunelab: 462 MiB here
LORA_FAMILY = ("lora", "qlora", "dora", "rslora", "pissa")
MEMORY_MARGIN = 0.65  # share of the available memory a run's estimate may take before checkpointing turns on

# Known architectures, so `plan` answers without any file: name -> config.
KNOWN: dict[str, PretrainedConfig] = {
    "smollm2-135m": LlamaConfig(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "tinyllama-1.1b": LlamaConfig(  # TinyLlama-1.1B's shape: where weights, not activations, dominate memory
        hidden_size=2048,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=5632,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "phi-3-mini": Phi3Config(
        hidden_size=3072,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=8192,
        vocab_size=32064,
        tie_word_embeddings=False,
    ),
    "llama-3-8b": LlamaConfig(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}


@dataclass(frozen=True)
class Shape:
    params: int
    linear_params: int  # in the transformer blocks' projections (what QLoRA quantises)
    lora_per_rank: int  # LoRA parameters per unit of rank over the default target projections
    hidden: int
    kv: int
    intermediate: int
    layers: int
    vocab: int


@dataclass(frozen=True)
class Estimate:
    method: str
    strategy: str
    weights: float
    gradients: float
    optimizer: float
    activations: float
    trainable: int
    seconds_per_step: float
    runtime: float = RUNTIME_GIB * GiB

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.runtime


def model_shape(config: PretrainedConfig) -> Shape:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return Shape(
        params=params,
        linear_params=sum(m.weight.numel() for m in linears),
        lora_per_rank=sum(m.in_features + m.out_features for m in linears),
        hidden=int(config.hidden_size),
        kv=int(getattr(config, "num_key_value_heads", heads) or heads) * head_dim,
        intermediate=int(config.intermediate_size),
        layers=int(config.num_hidden_layers),
        vocab=int(config.vocab_size),
    )


def load_config(model: str) -> PretrainedConfig:
    """A known architecture name, or the config of a model folder / 'embedded' (config.json only)."""
    if model.lower() in KNOWN:
        return KNOWN[model.lower()]
    from tunelab.models import resolve

    source = resolve(model)
    config: PretrainedConfig = AutoConfig.from_pretrained(source.path, local_files_only=True)
    return config


def estimate(
    shape: Shape,
    method: str,
    *,
    seq_len: int,
    batch: int,
    devices: int = 1,
    strategy: Strategy = "single",
    offload: Offload = "none",
    rank: int = 16,
    bf16: bool = False,
    checkpointing: bool = False,
    lora_dropout: float = 0.05,
    chunked_loss: bool = True,
    flops: float = 1e12,
    utilisation: float = 0.4,
) -> Estimate:
    full = method == "full"
    trainable = shape.params if full else rank * shape.lora_per_rank
    weights = _weights(shape, method, bf16)
    shards = {"single": (1, 1, 1), "ddp": (1, 1, 1), "zero1": (1, 1, devices), "zero2": (1, devices, devices)}
    w_div, g_div, o_div = shards.get(strategy, (devices, devices, devices))
    optimizer = trainable * (8 + 4 + (4 if bf16 else 0)) / o_div
    if offload in ("optimizer", "parameters"):
        optimizer = 0.0
    if offload == "parameters":
        weights, w_div = 0.0, 1
    tokens = seq_len * batch
    # Forward 2N, backward 2N for the input gradients (+2N for weight gradients when every weight trains); the
    # recomputed forward of checkpointing adds 2N.
    flops_per_token = ((6 if full else 4) + (2 if checkpointing else 0)) * shape.params
    return Estimate(
        method=method,
        strategy=strategy if offload == "none" else f"{strategy}+offload({offload})",
        weights=weights / w_div,
        gradients=trainable * 4 / g_div,
        optimizer=optimizer,
        activations=_activations(shape, tokens, bf16, checkpointing)
        + _loss(shape, tokens, chunked_loss)
        + (_dropout_masks(shape, tokens, method, bf16, checkpointing) if lora_dropout > 0 else 0.0),
        trainable=trainable,
        seconds_per_step=flops_per_token * tokens / (flops * utilisation),
    )


def _weights(shape: Shape, method: str, bf16: bool) -> float:
    dtype_bytes = 2 if bf16 else 4
    if method != "qlora":
        return float(shape.params * dtype_bytes)
    rest = shape.params - shape.linear_params
    return shape.linear_params * QLORA_BITS / 8 + rest * dtype_bytes


def _activations(shape: Shape, tokens: int, bf16: bool, checkpointing: bool) -> float:
    per_layer = 7 * shape.hidden + 2 * shape.kv + 4 * shape.intermediate
    kept = shape.layers * shape.hidden + per_layer if checkpointing else shape.layers * per_layer
    return float(tokens * kept * (2 if bf16 else 4))


def _loss(shape: Shape, tokens: int, chunked: bool) -> float:
    if not chunked:
        return float(tokens * 3 * shape.vocab * 4)  # logits, their fp32 softmax and gradient
    chunk = min(tokens, max(1, CHUNK_BYTES // (4 * shape.vocab)))
    return float(2 * chunk * shape.vocab * 4 + tokens * shape.hidden * 4)


def _dropout_masks(shape: Shape, tokens: int, method: str, bf16: bool, checkpointing: bool) -> float:
    """LoRA's dropout on the input of every adapted projection (q/k/v/o/gate/up see h values per token, down sees
    i) keeps a boolean mask for backward (lean_dropout); DoRA, PEFT's own, keeps a float mask and the dropped-out
    input. With checkpointing, one layer's."""
    if method not in LORA_FAMILY:
        return 0.0
    values = (1 if checkpointing else shape.layers) * (6 * shape.hidden + shape.intermediate)
    return float(tokens * values * (2 * (2 if bf16 else 4) if method == "dora" else 1))


def checkpointing_needed(estimate_without: Estimate, available: float) -> tuple[bool, str]:
    """Whether activation checkpointing is needed: only when the run's estimate without it exceeds 65 % of the
    memory available to this process. The margin is the estimate's error: it is low by up to a third for LoRA on
    long sequences (measured peak 7.7 GiB against 5.0 estimated for the embedded model at 8 x 256)."""
    need, have = estimate_without.total / GiB, available / GiB
    if estimate_without.total <= MEMORY_MARGIN * available:
        return False, f"auto: plan {need:.1f} GiB of {have:.1f} GiB available"
    return True, f"auto: plan {need:.1f} GiB without it, {have:.1f} GiB available"


def available_memory(processes: int = 1) -> float:
    """Bytes this process may use: a GPU's free memory, or the machine's available RAM shared by the processes
    training on it."""
    if torch.cuda.is_available():
        return float(torch.cuda.mem_get_info()[0])
    import psutil  # accelerate's dependency

    return float(psutil.virtual_memory().available) / max(processes, 1)


def plan_table(
    shape: Shape,
    *,
    seq_len: int,
    batch: int,
    devices: int,
    device_memory_gib: float,
    checkpointing: bool | None = None,
    **kwargs: Any,
) -> list[tuple[Estimate, bool]]:
    """Every method x strategy worth considering, with whether it fits in `device_memory_gib`. `checkpointing`
    None: as `tunelab train`'s auto does it, on for QLoRA only."""
    strategies: list[tuple[Strategy, Offload]] = [("single", "none")]
    if devices > 1:
        strategies = [("ddp", "none"), ("zero2", "none"), ("zero3", "none"), ("zero3", "optimizer")]
    rows = []
    for method in ("lora", "qlora", "full"):
        for strategy, offload in strategies:
            if method == "qlora" and strategy.startswith("zero3"):
                continue  # ZeRO-3 cannot shard bitsandbytes' packed 4-bit weights
            est = estimate(
                shape,
                method,
                seq_len=seq_len,
                batch=batch,
                devices=devices,
                strategy=strategy,
                offload=offload,
                checkpointing=method == "qlora" if checkpointing is None else checkpointing,
                **kwargs,
            )
            rows.append((est, est.total <= device_memory_gib * GiB))
    return rows


def recommend(rows: list[tuple[Estimate, bool]]) -> Estimate | None:
    """The simplest plan that fits: LoRA before QLoRA (faster, exact base) before full fine-tuning; no sharding
    when one device holds it."""
    fitting = [est for est, fits in rows if fits]
    return fitting[0] if fitting else None


def measure_flops(size: int = 1024, repeats: int = 8) -> float:
    """This machine's fp32 matmul FLOP/s (the ceiling a training step could reach on the CPU)."""
    import time

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)  # warm up the kernels and thread pool
    start = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - start)
