"""End to end on the real embedded model (SmolLM2-135M-Instruct): the README's main job, a few steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.models import _embedded_gguf_path, embedded_model_dir

ROOT = Path(__file__).parents[1]
runner = CliRunner()


@pytest.mark.slow
def test_main_job_on_the_embedded_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "tunelab.cli",
        "train",
        str(ROOT / "examples/chat.yaml"),
        "--set",
        "train.max_steps=4",
        "--set",
        "train.batch_size=2",  # 4 steps of 2 rows: the loss still falls, in a quarter of the time of 8 rows
        "--set",
        "train.lr=1e-3",
        "--set",
        "eval.max_examples=12",
        "--set",
        "eval.samples=1",
        "--set",
        "eval.generations=4",
        "--set",
        "eval.max_new_tokens=8",
        "--set",
        f"output_dir={out}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    # --nproc auto: the 135M model trains in one single-threaded process per core (batch 2 = 1 row each on 2 cores)
    expected = 2 if len(os.sched_getaffinity(0)) == 2 else 1  # more cores: batch 2 does not split into them
    assert f"processes: {expected} (auto:" in done.stderr
    said = done.stdout + done.stderr
    assert "time: tunelab plan estimates" in said  # how long, before the first step (measured after step 8)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["loss"] < summary["before"]["loss"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if r.get("eval") == "validation"]) == 4  # the curve, under DDP too
    assert summary["trainable_params"] == 4_884_480  # LoRA r=16 on all 7 projections of 30 layers
    assert "report:" in done.stdout and (out / "report.html").is_file()

    base_dir = embedded_model_dir()
    tok = AutoTokenizer.from_pretrained(out / "merged")
    ids = torch.tensor(
        [
            tok.apply_chat_template(
                [{"role": "user", "content": "what is your name"}], add_generation_prompt=True, tokenize=True
            )["input_ids"]
        ]
    )
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    kw = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 10, "do_sample": False}
    assert merged.generate(ids, **kw).tolist() == adapted.generate(ids, **kw).tolist()


@pytest.mark.slow
def test_a_gguf_file_loads_as_the_model() -> None:
    """`model.name: file.gguf` dequantises the file on load: it answers like the embedded model converted from it."""
    gguf = _embedded_gguf_path()
    args = ["generate", "what is your name", "--max-new-tokens", "12"]
    from_gguf = runner.invoke(app, [*args, "--model", str(gguf)])
    assert from_gguf.exit_code == 0, from_gguf.output
    embedded = runner.invoke(app, [*args, "--model", "embedded"])
    assert embedded.exit_code == 0, embedded.output
    assert from_gguf.stdout.strip() and from_gguf.stdout == embedded.stdout
