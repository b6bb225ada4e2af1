"""The chunked loss under bf16 autocast: the output weight cast to bf16 once per call (train/chunked_loss.py)
against autocast's cast of it for every chunk, alternated call by call in one process (so machine drift hits both
alike).

    .venv/bin/python bench/bf16_casts.py [--calls 6] [--tokens 1020]

The embedded model's output layer (49,152 x 576, frozen, as under LoRA), one thread (as each `--nproc auto`
process trains), forward + backward over `--tokens` random hidden states. Prints the best time of each, the ratio,
and how close the two gradients are (the hidden states' gradient is now a bf16 matmul, as the model's own output
layer computes it under autocast). Meaningful only where bf16 is fast (AMX): elsewhere tunelab trains in fp32.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import tunelab.train.chunked_loss as chunked_loss
from tunelab.models import load_model, resolve

ONCE = chunked_loss._autocast_once


def loss_and_grad(
    head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, cast: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[float, float, torch.Tensor]:
    """(seconds, loss, gradient of the hidden states) with `cast` as the weight's cast for the whole call."""
    chunked_loss._autocast_once = cast
    hidden.grad = None
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_loss.chunked_cross_entropy(hidden, head, targets, float(len(targets)))
    loss.backward()
    seconds = time.perf_counter() - start
    chunked_loss._autocast_once = ONCE
    assert hidden.grad is not None
    return seconds, float(loss), hidden.grad.clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=1020)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    head = load_model(resolve("embedded"), None).get_output_embeddings()
    head.weight.requires_grad_(False)
    hidden = torch.randn(args.tokens, head.in_features, requires_grad=True)
    targets = torch.randint(0, head.out_features, (args.tokens,))
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"per chunk": lambda w: w, "once": ONCE}
    runs: dict[str, list[tuple[float, float, torch.Tensor]]] = {name: [] for name in variants}
    for _ in range(args.calls + 1):  # the first call of each is a warm-up
        for name, cast in variants.items():
            runs[name].append(loss_and_grad(head, hidden, targets, cast))
    best = {name: min(r[0] for r in rs[1:]) for name, rs in runs.items()}
    print(f"output layer {tuple(head.weight.shape)}, {args.tokens} tokens, 1 thread, bf16 autocast")
    for name, rs in runs.items():
        print(f"weight cast {name:9}: {best[name]:.3f} s, loss {rs[-1][1]:.6f}")
    old, new = runs["per chunk"][-1][2], runs["once"][-1][2]
    cosine = torch.nn.functional.cosine_similarity(old.flatten(), new.flatten(), dim=0)
    print(f"cast once: {best['per chunk'] / best['once']:.2f}x faster; gradients' cosine similarity {cosine:.6f}")


if __name__ == "__main__":
    main()
