"""How high MFU could go on this machine: the training step against the same step's matmuls alone.

One single-threaded process (what `tunelab train` runs per core) trains LoRA r16 on the embedded model, 4 x 256
tokens, in the precision given. One step is profiled to list every matmul it runs (shapes included); those matmuls
are then replayed alone on random tensors of the same shapes and dtype. Timed in alternation in this process:
- the step (as tunelab runs it: chunked loss, lean dropout),
- the replay: the step's time if everything between the matmuls (norms, rotary, SiLU, dropout, casts, softmax,
  attention, optimizer) took no time at all,
- the replay plus the step's attention (PyTorch's CPU flash attention, forward and backward, same shapes): the
  floor for a step that keeps PyTorch's kernels and fuses everything else away,
- the peak: the 2048-square matmul `bench/train_throughput.py` and `tunelab plan` measure.

MFU counts 4 x parameters FLOPs per token (as bench/train_throughput.py). The replay's MFU is the ceiling that no
fusion of the work between matmuls could pass; its FLOPs also count LoRA's and the attention-free extra matmuls.

    .venv/bin/python bench/mfu_ceiling.py [--precision bf16|fp32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from tunelab.config import MethodSpec
from tunelab.methods import apply_method
from tunelab.models import load_model, resolve
from tunelab.plan import measure_flops
from tunelab.train.chunked_loss import chunked_cross_entropy

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")
ATTENTION = "aten::_scaled_dot_product_flash_attention_for_cpu"
BATCH, SEQ = 4, 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = apply_method(load_model(resolve("embedded"), None), MethodSpec(name="lora", r=16, alpha=32, dropout=0.05))
    model.train()
    params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    step = _training_step(model, args.precision == "bf16")
    step()  # warm-up: allocator, kernels
    shapes, attention = _matmul_and_attention_shapes(step)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    replay, attend = _replay(shapes, dtype), _attention(attention, dtype)

    def replay_and_attend() -> None:
        replay()
        attend()

    runs = {"step": step, "matmuls alone": replay, "+ attention": replay_and_attend}
    times: dict[str, list[float]] = {name: [] for name in runs}
    peaks = []
    for _ in range(args.rounds):  # alternated: drift in machine speed hits all of them alike
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        peaks.append(_peak(args.precision))
    _report(times, statistics.median(peaks), shapes, params, args.precision)


def _training_step(model: torch.nn.Module, bf16: bool) -> Callable[[], None]:
    ids = torch.randint(100, 30000, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    head = model.get_output_embeddings()
    inner = model.get_base_model().model

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hidden = inner(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
            flat = hidden.reshape(-1, hidden.shape[-1])
            loss = chunked_cross_entropy(flat, head, ids[:, 1:].reshape(-1), ids.numel())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


Shapes = list[tuple[list[int], ...]]


def _matmul_and_attention_shapes(step: Callable[[], None]) -> tuple[Shapes, Shapes]:
    """The (input, other) shapes of every matmul one step runs (addmm's bias dropped), and the (query, key, value)
    shapes of every attention call."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    matmuls, attention = [], []
    for event in prof.events():
        if event.name in MATMULS:
            operands = event.input_shapes[1:3] if event.name == "aten::addmm" else event.input_shapes[:2]
            matmuls.append((list(operands[0]), list(operands[1])))
        elif event.name == ATTENTION:
            attention.append(tuple(list(shape) for shape in event.input_shapes[:3]))
    return matmuls, attention


def _replay(shapes: Shapes, dtype: torch.dtype) -> Callable[[], None]:
    tensors = [(torch.randn(a, dtype=dtype), torch.randn(b, dtype=dtype)) for a, b in shapes]

    def run() -> None:
        for a, b in tensors:
            torch.matmul(a, b)

    return run


def _attention(shapes: Shapes, dtype: torch.dtype) -> Callable[[], None]:
    """Causal grouped-query attention forward and backward, as the model calls it."""
    inputs = [[torch.randn(shape, dtype=dtype, requires_grad=True) for shape in qkv] for qkv in shapes]

    def run() -> None:
        for q, k, v in inputs:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            out.backward(torch.ones_like(out))

    return run


def _peak(precision: str) -> float:
    """The peak bench/train_throughput.py sets its MFU goal against: `tunelab plan`'s 2048-square fp32 matmuls, under
    bf16 autocast for bf16 (as the training step runs; the two casts per matmul included)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        return measure_flops(2048, 4)


def _flops(shapes: Shapes) -> float:
    total = 0.0
    for a, b in shapes:
        batch = a[0] if len(a) == 3 else 1
        total += 2 * batch * a[-2] * a[-1] * b[-1]
    return total


def _report(times: dict[str, list[float]], peak: float, shapes: Shapes, params: int, precision: str) -> None:
    median = {name: statistics.median(t) for name, t in times.items()}
    model_flops = 4 * params * BATCH * SEQ
    print(f"embedded model, LoRA r16, {BATCH} x {SEQ} tokens, 1 thread, {precision}, {len(times['step'])} rounds")
    print(f"peak (2048-square matmul): {peak / 1e9:.1f} GFLOP/s")
    print(
        f"{len(shapes)} matmuls per step, {_flops(shapes) / 1e9:.1f} GFLOP; model FLOPs (4 x params) "
        f"{model_flops / 1e9:.1f} GFLOP"
    )
    for name in ("step", "matmuls alone", "+ attention"):
        achieved = model_flops / median[name]
        print(f"{name:14} {median[name]:7.3f} s  {achieved / 1e9:6.1f} GFLOP/s  MFU {100 * achieved / peak:4.1f} %")
    print(
        f"matmuls alone / step: {median['matmuls alone'] / median['step']:.2f} of the step's time; "
        f"their own speed {_flops(shapes) / median['matmuls alone'] / 1e9:.1f} GFLOP/s "
        f"= {100 * _flops(shapes) / median['matmuls alone'] / peak:.0f} % of the peak"
    )


if __name__ == "__main__":
    main()
