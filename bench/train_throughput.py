"""Training throughput: tunelab vs TRL's SFTTrainer + PEFT on the same work, alternated in one run.

    .venv/bin/pip install -e '.[bench]'    # TRL, for the baseline only
    .venv/bin/python bench/train_throughput.py [--model embedded] [--steps 12] [--rounds 2] [--variants a,b]

Same model, bundled chat data, LoRA (r=16, alpha 32, all seven projections), maximum length, batch, learning rate
and schedule, and number of optimizer steps. TRL runs as the cookbook does (padded batches) and packed
(`packing=True`, padding-free), both with TRL's defaults (gradient checkpointing and bf16 autocast on), and at its
fastest here ("trl-best": packed, no gradient checkpointing, in the precision whose matmuls are faster on this
machine: bf16 autocast with AMX, fp32 without — measured as tunelab's `precision: auto` measures it). tunelab runs
with its defaults ("tunelab": `--nproc auto` chooses the process layout and `precision: auto` the precision; the
line it printed is shown), as one process (PyTorch's threads over the cores, "tunelab-1proc") and as two
single-threaded data-parallel processes ("tunelab-2proc", `tunelab train --nproc 2`, DDP; same global batch), and
once more with the model's own loss over the full logits
("tunelab-full-logits", `train.chunked_loss: false`) to show what the chunked cross-entropy saves. The loss
covers every token in all of them (TRL's default; tunelab with `task.train_on_prompt`), so final losses compare
like with like. Each run is its own process (peak RSS is per process: a launch's largest). Prints real tokens/s
(padding excluded), the ratio tunelab/TRL, peak RSS, the last steps' mean loss, and tunelab's model-FLOPs
utilisation against this machine's matmul FLOP/s, measured in the same run in the precision tunelab trained in
(fp32, or bf16 autocast).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data/chat/train.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = (
    "tunelab",
    "tunelab-1proc",
    "tunelab-2proc",
    "tunelab-full-logits",
    "trl-padded",
    "trl-packed",
    "trl-best",
)
LR = 5e-4


def run_tunelab(
    model: str, steps: int, seq_len: int, batch: int, out: Path, nproc: str = "auto", chunked: bool = True
) -> dict[str, Any]:
    """tunelab as users run it, `tunelab train SPEC --nproc N`: auto (the default) picks one process or one
    single-threaded process per core (DDP, batch/N rows each, same global batch); "1" forces one process with
    PyTorch's threads, "2" two DDP processes; `chunked=False`: the model's own loss over the full logits instead of
    the chunked cross-entropy (train.chunked_loss)."""
    base = _tunelab_spec(model, steps, seq_len, batch, out)
    base["train"]["chunked_loss"] = chunked
    if nproc == "2":
        base["train"]["batch_size"] = batch // 2
        base["distributed"] = {"strategy": "ddp"}
    spec = out / "spec.yaml"
    spec.write_text(json.dumps(base), encoding="utf-8")  # JSON is YAML
    cmd = [sys.executable, "-m", "tunelab.cli", "train", str(spec), "--nproc", nproc]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    layout = next((line for line in done.stderr.splitlines() if line.startswith("processes:")), "processes: given")
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval" not in r]
    return {
        "tokens": rows[-1]["tokens"],
        "seconds": rows[-1]["elapsed_s"],
        "losses": [r["loss"] for r in rows],
        "layout": layout,
        "precision": rows[-1]["precision"],
    }


def _tunelab_spec(model: str, steps: int, seq_len: int, batch: int, out: Path) -> dict[str, Any]:
    return {
        "model": {"name": model},
        "method": {"name": "lora", "r": 16, "alpha": 32},
        "task": {"scenario": "chat", "train_on_prompt": True},
        "data": {"train": str(DATA), "validation_split": 0.05},
        "train": {"max_steps": steps, "batch_size": batch, "lr": LR, "max_seq_len": seq_len, "seed": 0},
        "eval": {"enabled": False},
        "output_dir": str(out),
    }


def run_trl(model: str, steps: int, seq_len: int, batch: int, out: Path, variant: str) -> dict[str, Any]:
    """TRL with its defaults (gradient checkpointing and bf16 autocast on), padded or packed; "trl-best" turns
    gradient checkpointing off (no recomputation) and trains in the precision that is faster here."""
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from tunelab.models import load_model, load_tokenizer, resolve

    source = resolve(model)
    config = SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,  # a float is a ratio of the total steps in transformers 5
        max_length=seq_len,
        packing=variant != "trl-padded",
        padding_free=variant != "trl-padded",
        **({"gradient_checkpointing": False, "bf16": _bf16_faster(model)} if variant == "trl-best" else {}),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        include_num_input_tokens_seen="non_padding",
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    timer = _StepTimer()
    if variant == "trl-best":
        print(f"trl-best precision: {'bf16' if config.bf16 else 'fp32'}", file=sys.stderr)
    trainer = SFTTrainer(
        model=load_model(source),
        args=config,
        train_dataset=load_dataset("json", data_files=str(DATA), split="train"),
        processing_class=load_tokenizer(source),
        peft_config=lora,
        callbacks=[timer],
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return {"tokens": trainer.state.num_input_tokens_seen, "seconds": timer.seconds, "losses": losses}


def _bf16_faster(model: str) -> bool:
    """Whether bf16 autocast matmuls beat fp32 on this machine for this model (tunelab's `auto` rule)."""
    from tunelab.plan import load_config
    from tunelab.train.precision import BF16_MIN_SPEEDUP, measure

    config = load_config(model)
    return measure(config.hidden_size, config.intermediate_size, "cpu").speedup >= BF16_MIN_SPEEDUP


class _StepTimer(TrainerCallback):
    """Time spent inside training steps only (like tunelab's elapsed_s): no setup, no data preparation."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def on_step_begin(self, *args: object, **kwargs: object) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, *args: object, **kwargs: object) -> None:
        self.seconds += time.perf_counter() - self._start


def child(variant: str, model: str, steps: int, seq_len: int, batch: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if variant.startswith("tunelab"):
            nproc = {"tunelab-1proc": "1", "tunelab-2proc": "2"}.get(variant, "auto")
            result = run_tunelab(model, steps, seq_len, batch, Path(tmp), nproc, variant != "tunelab-full-logits")
            rusage = resource.RUSAGE_CHILDREN  # the largest training process of the launch
        else:
            result = run_trl(model, steps, seq_len, batch, Path(tmp), variant)
            rusage = resource.RUSAGE_SELF
    result["rss_mib"] = resource.getrusage(rusage).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def _tiny_model() -> str:
    """The test suite's 2-layer Llama, built in a temporary folder (kept for the children of this run)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import build_tiny_llama, build_tiny_tokenizer

    out = Path(tempfile.mkdtemp(prefix="tunelab-tiny-"))
    return str(build_tiny_llama(out / "model", build_tiny_tokenizer(out / "tokenizer")))


def model_params(model: str) -> int:
    from tunelab.models import load_model, resolve

    return sum(p.numel() for p in load_model(resolve(model)).parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (tunelab always runs)")
    parser.add_argument("--child", choices=VARIANTS)
    args = parser.parse_args()
    chosen = ["tunelab", *(v for v in VARIANTS if v != "tunelab" and v in args.variants.split(","))]
    if args.child:
        child(args.child, args.model, args.steps, args.seq_len, args.batch)
        return
    if args.model == "tiny":
        args.model = _tiny_model()
    peak = peak_flops()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in chosen}
    for round_ in range(args.rounds):
        for variant in chosen:  # alternated, so drift in machine load hits every variant alike
            cmd = [sys.executable, __file__, "--child", variant, "--model", args.model, "--steps", str(args.steps)]
            cmd += ["--seq-len", str(args.seq_len), "--batch", str(args.batch)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
            runs[variant].append(json.loads(line[7:]))
            r = runs[variant][-1]
            print(f"round {round_ + 1} {variant:11} {r['tokens'] / r['seconds']:7.1f} tokens/s", flush=True)
            if "layout" in r:
                print(f"  {r['layout']}", flush=True)
    _report(runs, args, peak, model_params(args.model))


def peak_flops() -> dict[str, float]:
    """This machine's matmul FLOP/s over all cores, fp32 and under bf16 autocast (2048-square, as in tunelab plan)."""
    from tunelab.plan import measure_flops

    fp32 = measure_flops(2048, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = measure_flops(2048, 4)
    return {"fp32": fp32, "bf16": bf16}


def _report(
    runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace, peak: dict[str, float], params: int
) -> None:
    tps = {v: statistics.median(r["tokens"] / r["seconds"] for r in rs) for v, rs in runs.items()}
    print(f"\n{args.model}: LoRA r16, seq {args.seq_len}, batch {args.batch}, {args.steps} steps, {args.rounds} rounds")
    print(f"{'variant':19} {'tokens/s':>9} {'tunelab/x':>10} {'2proc/x':>8} {'peak RSS MiB':>13} {'final loss':>11}")
    for variant, rs in runs.items():
        loss = statistics.mean(statistics.mean(r["losses"][-3:]) for r in rs)  # last 3 steps: less noise
        rss = max(r["rss_mib"] for r in rs)
        two = f"{tps['tunelab-2proc'] / tps[variant]:8.2f}" if "tunelab-2proc" in tps else f"{'-':>8}"
        print(f"{variant:19} {tps[variant]:9.1f} {tps['tunelab'] / tps[variant]:10.2f} {two} {rss:13.0f} {loss:11.4f}")
    # LoRA: forward 2P + backward through activations 2P FLOPs per token (no weight gradients for the base).
    print(f"machine matmul (all cores): fp32 {peak['fp32'] / 1e9:.1f}, bf16 autocast {peak['bf16'] / 1e9:.1f} GFLOP/s")
    for variant in ("tunelab", "tunelab-1proc", "tunelab-2proc"):
        if variant not in tps:
            continue
        achieved = 4 * params * tps[variant]
        precision = runs[variant][0]["precision"]  # against the matmul speed of the precision it trained in
        print(f"{variant} ({precision}): {achieved / 1e9:.1f} GFLOP/s = {100 * achieved / peak[precision]:.0f}% MFU")


if __name__ == "__main__":
    main()
