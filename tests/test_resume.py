"""Exact resume: a run stopped after step k and resumed equals an uninterrupted run. Ctrl-C saves first."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.config import CheckpointSpec, MethodSpec, TrainSpec
from tunelab.data.formats import to_example
from tunelab.data.packing import Row, pack
from tunelab.data.render import tokenize
from tunelab.methods import apply_method
from tunelab.train.checkpoint import latest_checkpoint
from tunelab.train.loop import train
from tunelab.train.progress import ProgressReporter

ROOT = Path(__file__).parents[1]
TRAIN = TrainSpec(max_steps=6, batch_size=2, grad_accum=2, lr=3e-3, max_seq_len=64, seed=3, warmup_ratio=0.2)


def _rows(tokenizer_dir: Path, split: str = "train") -> tuple[list[Row], int]:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    lines = (ROOT / f"data/chat/{split}.jsonl").read_text(encoding="utf-8").splitlines()[:40]
    examples = [tokenize(to_example(json.loads(line), i, "messages"), tok, 64) for i, line in enumerate(lines, 1)]
    return pack(examples, 64), tok.pad_token_id


def _model(model_dir: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    # Dropout on: resume must restore the RNG too, not only weights and optimizer.
    return apply_method(base, MethodSpec(name="lora", r=4, alpha=8, dropout=0.1))


def _adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_stop_and_resume_equals_uninterrupted(tiny_llama_dir: Path, tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    rows, pad = _rows(tiny_tokenizer_dir)
    val, _ = _rows(tiny_tokenizer_dir, "validation")  # validation loss every 2 steps (the default: ~5 points)
    ckpt = CheckpointSpec(every_steps=2, keep_last=2)

    straight = _model(tiny_llama_dir)
    full = train(
        straight, rows, pad_id=pad, packed=True, train_spec=TRAIN, ckpt_spec=ckpt, out_dir=tmp_path / "a", val_rows=val
    )

    first = _model(tiny_llama_dir)
    part = train(
        first,
        rows,
        pad_id=pad,
        packed=True,
        train_spec=TRAIN,
        ckpt_spec=ckpt,
        out_dir=tmp_path / "b",
        stop_after=3,
        val_rows=val,
    )
    assert part.interrupted and part.state.step == 3
    torch.manual_seed(1234)  # a different process state: resume must not depend on it
    second = _model(tiny_llama_dir)
    resumed = train(
        second,
        rows,
        pad_id=pad,
        packed=True,
        train_spec=TRAIN,
        ckpt_spec=ckpt,
        out_dir=tmp_path / "b",
        resume_from=latest_checkpoint(tmp_path / "b" / "checkpoints"),
        val_rows=val,
    )

    losses = [h["loss"] for h in full.state.history]
    assert [h["loss"] for h in resumed.state.history] == losses
    assert losses[-1] < losses[0]
    for name, value in _adapter(straight).items():
        torch.testing.assert_close(_adapter(second)[name], value, rtol=0, atol=0)
    points = [(v["step"], v["loss"]) for v in full.state.validation]
    assert [s for s, _ in points] == [2, 4, 6] and points[-1][1] < points[0][1]
    assert [(v["step"], v["loss"]) for v in resumed.state.validation] == points  # the step-2 point came back too
    logged = [json.loads(line) for line in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert [(r.get("eval", ""), r["step"]) for r in logged] == [
        ("", 1), ("", 2), ("validation", 2), ("", 3), ("", 4), ("validation", 4), ("", 5), ("", 6), ("validation", 6)
    ]  # fmt: skip
    assert [r["loss"] for r in logged if r.get("eval")] == [loss for _, loss in points]
    assert len(list((tmp_path / "b/checkpoints").glob("step-*"))) == 2  # keep_last


class _CtrlCAt(ProgressReporter):
    """Presses Ctrl-C (a real SIGINT to this process) when step `at` is logged."""

    def __init__(self, at: int, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.at = at

    def update(self, row: dict[str, float], eta_s: float) -> None:
        super().update(row, eta_s)
        if row["step"] == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_saves_a_checkpoint(tiny_llama_dir: Path, tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    rows, pad = _rows(tiny_tokenizer_dir)
    (tmp_path / "run").mkdir()
    # Whatever handled SIGINT before (the default, or SIG_IGN when the suite runs in a background job) comes back.
    before = signal.getsignal(signal.SIGINT)
    reporter = _CtrlCAt(2, TRAIN.max_steps, 0, tmp_path / "run" / "metrics.jsonl")
    result = train(
        _model(tiny_llama_dir),
        rows,
        pad_id=pad,
        packed=True,
        train_spec=TRAIN,
        ckpt_spec=CheckpointSpec(),
        out_dir=tmp_path / "run",
        reporter=reporter,
    )
    assert result.interrupted and result.state.step == 2
    assert result.checkpoint is not None and result.checkpoint.name == "step-000002"
    assert (result.checkpoint / "trainable.safetensors").is_file()
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


@pytest.fixture
def checkpoint_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Grows by one each time transformers recomputes a layer under activation checkpointing."""
    import transformers.modeling_utils as modeling

    calls: list[int] = []
    original = modeling.checkpoint

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling, "checkpoint", counting)
    return calls


def test_gradient_checkpointing_computes_the_same_steps(
    tiny_llama_dir: Path, tmp_path: Path, checkpoint_calls: list[int]
) -> None:
    from tunelab.config import load_spec
    from tunelab.recipe import run_job

    def losses(checkpointing: bool) -> list[float]:
        out = tmp_path / f"gc-{checkpointing}"
        base = {
            "model": {"name": str(tiny_llama_dir)},
            "method": {"name": "lora", "r": 4, "dropout": 0.0},
            "data": {"train": str(ROOT / "data/chat/train.jsonl"), "validation_split": 0.1},
            "train": {"max_steps": 4, "batch_size": 2, "max_seq_len": 64, "gradient_checkpointing": checkpointing},
            "eval": {"enabled": False},
            "output_dir": str(out),
        }
        run_job(load_spec(None, base=base))
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    with_checkpointing = losses(True)
    assert len(checkpoint_calls) == 4 * 2  # it is on: each of the 2 layers is checkpointed at each of the 4 steps
    assert with_checkpointing == pytest.approx(losses(False), abs=1e-5)


@pytest.mark.parametrize(("available_gib", "expected"), [(1e-3, True), (1e3, False)])
def test_gradient_checkpointing_auto_turns_on_only_when_memory_is_short(
    tiny_llama_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    checkpoint_calls: list[int],
    available_gib: float,
    expected: bool,
) -> None:
    """The default (auto) asks `tunelab plan`'s estimate of the run without checkpointing against the memory the
    process has: a machine with 1 MiB free gets it, one with 1,000 GiB does not; the log says which and why."""
    import io

    from rich.console import Console

    import tunelab.recipe
    from tunelab.config import load_spec
    from tunelab.recipe import run_job

    monkeypatch.setattr(tunelab.recipe, "available_memory", lambda processes=1: available_gib * 2**30)
    base = {
        "model": {"name": str(tiny_llama_dir)},
        "method": {"name": "lora", "r": 4, "dropout": 0.0},
        "data": {"train": str(ROOT / "data/chat/train.jsonl"), "validation_split": 0.1},
        "train": {"max_steps": 2, "batch_size": 2, "max_seq_len": 64},
        "eval": {"enabled": False},
        "output_dir": str(tmp_path / "run"),
    }
    log = io.StringIO()
    run_job(load_spec(None, base=base), console=Console(file=log, width=200))
    assert len(checkpoint_calls) == (2 * 2 if expected else 0)
    line = next(x for x in log.getvalue().splitlines() if x.startswith("activation checkpointing:"))
    assert line.startswith(f"activation checkpointing: {'on' if expected else 'off'} (auto: plan ")
    assert f"{available_gib:.1f} GiB available" in line
