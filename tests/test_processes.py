"""`--nproc auto`: the rule that picks one process or one per core, and what `tunelab train` does with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig

from tiny import ROOT
from tunelab.config import load_spec
from tunelab.plan import KNOWN, MEMORY_MARGIN, GiB, estimate, model_shape
from tunelab.train import processes
from tunelab.train.processes import Layout, Workload, choose_layout, layout_for

EMBEDDED = model_shape(KNOWN["smollm2-135m"])
LORA = Workload("lora", batch_size=8, seq_len=256)


def _choose(work: Workload = LORA, cores: int = 2, available: float = 20 * GiB, gpu: bool = False) -> Layout:
    return choose_layout(EMBEDDED, work, processes=cores, available=available, gpu=gpu)


def test_the_embedded_model_trains_in_one_process_per_core_with_the_batch_split() -> None:
    layout = _choose()
    assert layout.processes == 2
    assert layout.overrides(8) == ["distributed.strategy=ddp", "train.batch_size=4"]  # the same global batch
    assert str(layout).startswith("2 (auto: single-threaded, DDP, 4 rows")
    assert _choose(cores=4).overrides(8) == ["distributed.strategy=ddp", "train.batch_size=2"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"gpu": True}, "a GPU"),
        ({"cores": 1}, "one core"),
        ({"work": Workload("lora", 8, 256, strategy="zero2")}, "distributed.strategy zero2 is set"),
        ({"work": Workload("full", 8, 256)}, "method full"),
        ({"work": Workload("qlora", 8, 256)}, "method qlora"),
        ({"work": Workload("lora", 8, 256, head=True)}, "a classification/token head"),
        ({"work": Workload("lora", 7, 256)}, "train.batch_size 7 does not split into 2 processes"),
        ({"available": 6 * GiB}, "2 processes would need"),
    ],
)
def test_each_condition_keeps_one_process_and_says_why(change: dict, reason: str) -> None:
    layout = _choose(**change)
    assert layout.processes == 1
    assert reason in layout.reason
    assert layout.overrides(8) == []


def test_a_small_model_stays_in_one_process() -> None:
    tiny = model_shape(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=500))  # fmt: skip
    layout = choose_layout(tiny, LORA, processes=2, available=20 * GiB, gpu=False)
    assert layout.processes == 1
    assert "below 50M" in layout.reason


def test_the_memory_condition_counts_every_process() -> None:
    one = estimate(EMBEDDED, "lora", seq_len=256, batch=4, strategy="ddp").total  # one process's share
    assert _choose(available=2.5 * one / MEMORY_MARGIN).processes == 2
    assert _choose(available=1.5 * one / MEMORY_MARGIN).processes == 1  # one copy would fit, two do not


def test_a_resume_keeps_the_checkpoints_process_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processes, "load_config", lambda name: KNOWN["smollm2-135m"])
    monkeypatch.setattr(processes, "available_memory", lambda: 20 * GiB)
    monkeypatch.setattr(processes.os, "sched_getaffinity", lambda pid: {0, 1})  # a 2-core machine
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"model: {{name: embedded}}\ndata: {{train: {ROOT / 'data/chat/train.jsonl'}}}\n"
                    f"output_dir: {tmp_path / 'run'}\n", encoding="utf-8")  # fmt: skip
    job = load_spec(spec)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 4, "world_size": 1}))
    one = layout_for(job, resume=True)
    assert one.processes == 1
    assert "resuming a checkpoint written by one process" in one.reason
    assert layout_for(job, resume=False).processes == 2  # a new run splits
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 4, "world_size": 2}))
    assert layout_for(job, resume=True).processes == 2


def test_train_says_which_layout_it_chose(tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"model: {{name: {tiny_llama_dir}}}\ndata: {{train: {ROOT / 'data/chat/train.jsonl'}}}\n"
                    "train: {max_steps: 1, batch_size: 2, max_seq_len: 32}\neval: {enabled: false}\n"
                    f"output_dir: {tmp_path / 'run'}\n", encoding="utf-8")  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "tunelab.cli", "train", str(spec)], capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "processes: 1 (auto:" in done.stderr and "below 50M" in done.stderr
    wide = {**os.environ, "COLUMNS": "200"}  # typer's error panel wraps at the terminal width
    bad = subprocess.run([sys.executable, "-m", "tunelab.cli", "train", str(spec), "--nproc", "two"],
                         capture_output=True, text=True, timeout=300, check=False, env=wide)  # fmt: skip
    assert bad.returncode != 0 and "--nproc" in bad.stderr and "or auto" in bad.stderr
