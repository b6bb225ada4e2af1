"""LoRA's input dropout, PEFT's (nn.Dropout, then lora_A) against tunelab's (folded into lora_A: a boolean mask drawn
with NumPy), on the embedded model: time per step and peak RSS, each in its own single-threaded process, the two
running side by side as `--nproc 2`'s two processes do (so both see the same machine).

    .venv/bin/python bench/lean_dropout.py [--steps 5] [--batch 4] [--seq-len 256]

LoRA r16 on all seven projections, dropout 0.05, fp32, the chunked loss, AdamW; random tokens (time and memory do
not depend on them). The first step is left out of the time (allocation warm-up). Prints both and the ratios.
Goal: less memory and no slower than PEFT's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(variant: str, steps: int, batch: int, seq_len: int) -> None:
    import torch

    import tunelab.methods.peft_methods as peft_methods
    from tunelab.config import MethodSpec
    from tunelab.methods import apply_method
    from tunelab.models import load_model, resolve
    from tunelab.train.chunked_loss import chunked_cross_entropy

    if variant == "peft":
        peft_methods.lean_lora_dropout = lambda model: 0  # PEFT's own dropout modules stay
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = apply_method(load_model(resolve("embedded"), None), MethodSpec(name="lora", dropout=0.05))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(100, 30000, (batch, seq_len))
    head = model.get_output_embeddings()
    inner = model.get_base_model().model  # the decoder stack: hidden states go to the chunked loss
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        hidden = inner(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
        loss = chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head, ids[:, 1:].reshape(-1), ids.numel())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"s_per_step": sum(times[1:]) / (steps - 1), "rss": peak, "losses": losses}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--child", choices=("peft", "lean"))
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.batch, args.seq_len)
        return
    shape = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq-len", str(args.seq_len)]
    procs = {
        v: subprocess.Popen([sys.executable, __file__, "--child", v, *shape], stdout=subprocess.PIPE, text=True)
        for v in ("peft", "lean")
    }
    results = {v: json.loads(p.communicate()[0].strip().splitlines()[-1]) for v, p in procs.items()}
    print(f"embedded model, LoRA r16, dropout 0.05, {args.batch} x {args.seq_len} tokens, {args.steps} steps, 1 thread")
    print(f"{'dropout':8} {'s/step':>7} {'peak RSS MiB':>13} {'first loss':>11} {'last loss':>10}")
    for v, r in results.items():
        print(f"{v:8} {r['s_per_step']:7.2f} {r['rss']:13.0f} {r['losses'][0]:11.4f} {r['losses'][-1]:10.4f}")
    peft, lean = results["peft"], results["lean"]
    print(
        f"lean / peft: time {lean['s_per_step'] / peft['s_per_step']:.2f}x, peak RSS {lean['rss'] / peft['rss']:.2f}x"
    )


if __name__ == "__main__":
    main()
