"""`tunelab bench` on the tiny Llama: real subprocess runs, real numbers, and failures that do not stop the bench."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from tiny import ROOT
from tunelab.bench import BenchSettings, bench_rows, last_error_line, run_bench, steady_tokens_per_s
from tunelab.cli import app
from tunelab.config import MethodSpec
from tunelab.methods import apply_method, count_parameters
from tunelab.models import load_model, resolve

runner = CliRunner()
METHODS = ("lora", "ia3")


@pytest.fixture(scope="module")
def bench(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench")
    args = ["bench", "--model", str(tiny_llama_dir), "--methods", ",".join(METHODS), "--steps", "2"]
    args += ["--seq-len", "64", "--eval-examples", "8", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_one_row_per_method_with_real_numbers(bench: tuple[Path, str], tiny_llama_dir: Path) -> None:
    out, _ = bench
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [r["name"] for r in rows] == list(METHODS)
    for row in rows:
        assert row["status"] == "ok"
        model = apply_method(load_model(resolve(str(tiny_llama_dir))), MethodSpec(name=row["method"]))
        assert row["trainable_params"] == count_parameters(model)[0]
        weights = sum(p.stat().st_size for p in (out / "runs" / row["name"] / "adapter").glob("*.safetensors"))
        assert row["adapter_bytes"] == weights > 0
        assert row["peak_rss_bytes"] > 50 * 2**20  # a Python process with torch loaded
        lines = (out / "runs" / row["name"] / "metrics.jsonl").read_text().splitlines()
        steps = [r for r in map(json.loads, lines) if "eval" not in r]  # training steps, not evaluation rows
        assert row["tokens_per_s"] == steady_tokens_per_s(steps) > 0 and row["wall_s"] > 0
        assert math.isfinite(row["loss_before"]) and math.isfinite(row["loss_after"])


def test_table_chart_and_stdout(bench: tuple[Path, str]) -> None:
    out, printed = bench
    table = (out / "bench.md").read_text()
    body = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [line.split(" | ")[0].removeprefix("| ") for line in body] == list(METHODS)
    assert all("—" not in line and "failed" not in line for line in body)
    assert table in printed  # the markdown table is what the command prints
    assert (out / "bench.png").read_bytes().startswith(b"\x89PNG")


def test_unknown_method_lists_the_valid_ones(tmp_path: Path) -> None:
    result = runner.invoke(app, ["bench", "--methods", "lora,lorra", "--out", str(tmp_path)])
    message = " ".join(result.output.split())  # the console wraps long lines
    assert result.exit_code == 2
    assert "unknown method(s) 'lorra' (did you mean 'lora'?)" in message
    assert "valid: dora, full, ia3" in message and "Traceback" not in message
    with pytest.raises(Exception, match="need --nproc 2"):
        bench_rows("zero2", nproc=1)
    assert bench_rows("lora", nproc=2) == ("lora", "zero1", "zero2", "zero3")


def test_a_failing_method_is_a_row_and_the_bench_goes_on(tmp_path: Path) -> None:
    empty_model = tmp_path / "not-a-model"
    empty_model.mkdir()
    settings = BenchSettings(
        out_dir=tmp_path / "bench", data_dir=ROOT / "data" / "chat", rows=("lora", "ia3"), model=str(empty_model)
    )
    result = run_bench(settings, Console(quiet=True))
    assert [r.name for r in result.rows] == ["lora", "ia3"]
    assert all(r.status.startswith("failed: ") and not r.ok for r in result.rows)
    assert all(r.status.startswith("failed: error: cannot load model folder") for r in result.rows), result.rows
    assert result.markdown.count("failed: ") == 2 and result.chart.is_file()


def test_tokens_per_s_leaves_out_the_first_step() -> None:
    steps = [{"tokens": 100, "elapsed_s": 30.0, "tokens_per_s": 3.3}, {"tokens": 300, "elapsed_s": 32.0}]
    assert steady_tokens_per_s(steps) == 100.0
    assert steady_tokens_per_s(steps[:1]) == 3.3


def test_last_error_line_finds_the_cause_under_a_launcher_summary() -> None:
    text = (
        "Traceback (most recent call last):\n  File 'x.py', line 1\n"
        "RuntimeError: out of memory\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
        "============================================================\n"
        "tunelab.cli FAILED\n"
    )
    assert last_error_line(text, 1) == "RuntimeError: out of memory"
    friendly = "model: x\nerror: 1 problem(s) in the job spec:\n  - train.lr: must be > 0\n"
    assert last_error_line(friendly, 2) == "error: 1 problem(s) in the job spec: - train.lr: must be > 0"
    wrapped = "error: cannot load model folder\n/tmp/x: no\ntokenizer\nE1125 14:37:01 torch failed\n=====\n"
    assert last_error_line(wrapped, 2) == "error: cannot load model folder /tmp/x: no tokenizer"
    assert last_error_line("", 9) == "exit code 9"
