"""`train.precision: auto`: measured once per machine, cached, the faster precision trained in and logged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from test_resume import _model, _rows
from tunelab.config import CheckpointSpec, TrainSpec
from tunelab.errors import TunelabError
from tunelab.train import precision
from tunelab.train.distributed import SINGLE
from tunelab.train.loop import train
from tunelab.train.precision import PIN_ENV, Timing, choose_precision, decide, measure


@pytest.fixture(autouse=True)
def _unpinned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PIN_ENV, raising=False)  # conftest pins the suite to fp32; these tests measure


def test_the_rule_takes_bf16_only_when_clearly_faster() -> None:
    assert decide(Timing(fp32_s=1.0, bf16_s=0.25), "k").precision == "bf16"  # AMX: 4x
    assert decide(Timing(fp32_s=1.0, bf16_s=1.4), "k").precision == "fp32"  # no AMX: 0.7x
    assert decide(Timing(fp32_s=1.0, bf16_s=0.95), "k").precision == "fp32"  # within noise: keep fp32
    assert "0.71x" in decide(Timing(fp32_s=1.0, bf16_s=1.4), "k").reason


def test_measure_times_both_precisions() -> None:
    timing = measure(64, 256, "cpu", budget_s=0.02)
    assert 0 < timing.fp32_s < 1 and 0 < timing.bf16_s < 1


def test_auto_measures_once_then_reads_the_cache(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = torch.nn.Linear(4, 4)
    model.config = type("Config", (), {"hidden_size": 64, "intermediate_size": 256})()  # type: ignore[assignment]
    cache = tmp_path / "precision.json"
    first = choose_precision("auto", model, SINGLE, cache)
    stored = json.loads(cache.read_text())
    (key,) = stored
    assert "64x256" in key and first.precision == decide(Timing(**stored[key]), key).precision

    def no_measuring(*args: object, **kwargs: object) -> Timing:
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(precision, "measure", no_measuring)
    assert choose_precision("auto", model, SINGLE, cache) == first
    # What the spec sets is taken as it is, without measuring.
    assert choose_precision("bf16", model, SINGLE, cache).precision == "bf16"


def test_a_pinned_answer_wins_and_a_bad_pin_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 4)
    monkeypatch.setenv(PIN_ENV, "bf16")
    assert choose_precision("auto", model, SINGLE, tmp_path / "p.json").precision == "bf16"
    monkeypatch.setenv(PIN_ENV, "fp16")
    with pytest.raises(TunelabError, match=PIN_ENV):
        choose_precision("auto", model, SINGLE, tmp_path / "p.json")


def test_a_run_trains_in_the_chosen_precision_and_logs_it(
    tiny_llama_dir: Path, tiny_tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    # Make bf16 the measured winner, so the run must switch away from fp32 for the test to pass.
    monkeypatch.setattr(precision, "measure", lambda *a, **k: Timing(fp32_s=1.0, bf16_s=0.2))
    rows, pad = _rows(tiny_tokenizer_dir)
    spec = TrainSpec(max_steps=2, batch_size=2, lr=3e-3, max_seq_len=64)
    assert spec.precision == "auto"
    result = train(
        _model(tiny_llama_dir),
        rows,
        pad_id=pad,
        packed=True,
        train_spec=spec,
        ckpt_spec=CheckpointSpec(),
        out_dir=tmp_path / "run",
    )
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["precision"] for row in logged if "eval" not in row] == ["bf16", "bf16"]
    assert result.backend.precision == "bf16"  # type: ignore[attr-defined]
    assert all(math.isfinite(row["loss"]) for row in logged)  # bf16 autocast trained
