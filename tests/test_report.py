"""The before/after report: PNG and self-contained HTML, verdicts, escaping, the no-after case; the run's settings,
validation points from metrics.jsonl, samples by role with their scores, artefacts, versions and date."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import matplotlib.image
import pytest

from tunelab.config import JobSpec
from tunelab.report import DPI, FIGURE_WIDTH_IN, RunDetails, Sample, compare, panels, prompt_turns, write_report
from tunelab.report.chat import Turn
from tunelab.report.run import hyperparameters, loading_snippet, read_metrics

LOWER = frozenset({"loss", "perplexity"})
HISTORY = [
    {
        "step": s,
        "loss": 3.0 - 0.2 * s,
        "lr": 1e-3,
        "grad_norm": 1.0,
        "tokens": 64 * s,
        "tokens_per_s": 500.0,
        "elapsed_s": 0.1 * s,
    }
    for s in range(1, 9)
]


def _row(html: str, metric: str) -> str:
    found = re.search(rf'<tr data-metric="{metric}">.*?</tr>', html, re.DOTALL)
    assert found, f"no row for {metric}"
    return found.group(0)


def _write(tmp_path: Path, **overrides: object) -> tuple[str, Path]:
    kwargs: dict[str, object] = {
        "title": "tunelab: lora on chat",
        "before": {"loss": 2.5, "accuracy": 0.5},
        "after": {"loss": 1.25, "accuracy": 0.4},
        "history": HISTORY,
        "samples": [Sample("What is 2+2?", "4", "five", "4")],
        "info": {"model": "tiny-llama", "steps": "8"},
        "lower_is_better": LOWER,
    }
    kwargs.update(overrides)
    paths = write_report(tmp_path, **kwargs)  # type: ignore[arg-type]
    assert paths.html == tmp_path / "report.html" and paths.png == tmp_path / "report.png"
    assert paths.html.is_file() and paths.png.is_file()
    return paths.html.read_text(encoding="utf-8"), paths.png


def test_writes_png_and_html_with_metrics_and_verdicts(tmp_path: Path) -> None:
    html, png = _write(tmp_path)

    image = matplotlib.image.imread(png)
    height, width = image.shape[:2]
    # Shown at its own size on a 1280 px screen: the loss chart across the top, the two metric panels below.
    assert width == round(FIGURE_WIDTH_IN * DPI) <= 1140 and 600 < height < 1000

    b64 = base64.b64encode(png.read_bytes()).decode("ascii")
    assert f'src="data:image/png;base64,{b64}"' in html

    loss = _row(html, "loss")
    assert ">2.5<" in loss and ">1.25<" in loss and "↓ -50.0%" in loss
    assert 'class="change better"' in loss and "(better)" in loss
    accuracy = _row(html, "accuracy")
    assert ">0.5<" in accuracy and ">0.4<" in accuracy and "↓ -20.0%" in accuracy
    assert 'class="change worse"' in accuracy and "(worse)" in accuracy

    assert "<h1>tunelab: lora on chat</h1>" in html
    assert "<th>model</th><td>tiny-llama</td>" in html
    assert "What is 2+2?" in html and "five" in html
    assert "white-space: pre-wrap" in html
    assert "http://" not in html and "https://" not in html  # nothing external to fetch


def test_user_text_is_escaped(tmp_path: Path) -> None:
    attack = "<script>alert(1)</script>"
    html, _ = _write(
        tmp_path,
        title=f"run {attack}",
        samples=[Sample(f"say {attack}", "ok & done", attack, "line one\n  line two")],
        info={"model": attack},
    )
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "ok &amp; done" in html
    assert "line one\n  line two" in html  # whitespace kept for pre-wrap


def test_after_none_and_empty_history(tmp_path: Path) -> None:
    html, png = _write(
        tmp_path, after=None, history=[], samples=[Sample("p", "r", "b", None)], lower_is_better=frozenset()
    )
    assert matplotlib.image.imread(png).ndim == 3
    loss = _row(html, "loss")
    assert ">2.5<" in loss and loss.count("—") == 2  # no after value, no change
    assert "(better)" not in html and "(worse)" not in html
    assert "no values after training" in html
    assert '<div class="text missing">—</div>' in html  # the sample's missing after-generation


def test_no_metrics_at_all(tmp_path: Path) -> None:
    html, png = _write(tmp_path, before={}, after=None, history=[], samples=[])
    assert matplotlib.image.imread(png).shape[1] > 0
    assert "no metrics" in html and "no samples" in html


@pytest.mark.parametrize(
    ("old", "new", "lower_better", "expected"),
    [
        (2.0, 1.0, True, ("↓ -50.0%", "better")),
        (2.0, 1.0, False, ("↓ -50.0%", "worse")),
        (0.5, 0.75, False, ("↑ +50.0%", "better")),
        (0.5, 0.75, True, ("↑ +50.0%", "worse")),
        (1.0, 1.0, True, ("→ 0%", "unchanged")),
        (0.0, 0.25, False, ("↑ +0.25", "better")),
        (1.0, None, True, ("—", "")),
        (float("nan"), 1.0, True, ("—", "")),
    ],
)
def test_compare(old: float, new: float | None, lower_better: bool, expected: tuple[str, str]) -> None:
    assert compare(old, new, lower_better) == expected


def test_evaluation_times_are_in_the_table_not_the_picture(tmp_path: Path) -> None:
    """Times are not results: they get no panel; benchmark metrics share one."""
    before = {"loss": 2.5, "accuracy": 0.5, "eval_seconds": 3.0, "mmlu/acc": 0.3, "arc/acc": 0.4}
    assert panels(before, {"loss": 1.25}, ["mmlu/acc", "arc/acc"]) == ["loss", "accuracy", "benchmarks"]
    html, _ = _write(tmp_path / "timed", before=before, after={"loss": 1.25, "accuracy": 0.4})
    assert ">3<" in _row(html, "eval_seconds")


def test_benchmark_chart_alone(tmp_path: Path) -> None:
    from tunelab.report import benchmark_png

    names = ["truthfulqa_mc1/acc", "truthfulqa_mc2/acc"]
    png = tmp_path / "chart.png"
    png.write_bytes(benchmark_png({n: 0.25 for n in names}, {n: 0.3 for n in names}, names))
    height, width = matplotlib.image.imread(png).shape[:2]
    assert 200 < height < 1000 and width >= height


# -- what the report tells about the run ---------------------------------------------------------------------------

CHATML = (
    "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
)
LLAMA3 = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
PHI3 = "<|system|>\nYou are terse.<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n"


@pytest.mark.parametrize("text", [CHATML, LLAMA3, PHI3])
def test_prompts_are_parsed_back_into_turns(text: str) -> None:
    assert prompt_turns(text) == [Turn("system", "You are terse."), Turn("user", "What is 2+2?")]


def test_text_outside_a_template_is_one_prompt_turn() -> None:
    assert prompt_turns("Once upon a time") == [Turn("prompt", "Once upon a time")]
    # Template-looking text inside plain text is not a conversation.
    odd = "see <|im_start|>user\nhi<|im_end|>"
    assert prompt_turns(odd) == [Turn("prompt", odd)]


def test_samples_show_roles_and_scores_without_template_tokens(tmp_path: Path) -> None:
    sample = Sample(CHATML, "4", "five", "4", {"rouge_l": 0.0}, {"rouge_l": 1.0})
    html, _ = _write(tmp_path, samples=[sample])
    assert "im_start" not in html and "im_end" not in html
    assert '<div class="turn system"><div class="role">system</div><div class="text">You are terse.</div>' in html
    assert '<div class="turn user"><div class="role">user</div><div class="text">What is 2+2?</div>' in html
    assert "assistant · before" in html and "assistant · after" in html
    assert '<div class="score">rouge_l 0</div>' in html and '<div class="score">rouge_l 1</div>' in html


def test_model_output_with_markup_is_escaped_in_every_block(tmp_path: Path) -> None:
    attack = "<script>alert(1)</script>"
    prompt = f"<|im_start|>user\n{attack}<|im_end|>\n<|im_start|>assistant\n"
    html, _ = _write(tmp_path, samples=[Sample(prompt, attack, attack, attack)])
    assert "<script>" not in html
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 4  # the user turn, reference, before, after


def test_hyperparameters_validation_points_versions_and_artefacts(tmp_path: Path) -> None:
    """The settings from the spec, the validation points of metrics.jsonl, the loading snippet, versions, date."""
    spec = JobSpec.model_validate(
        {
            "data": {"train": "t.jsonl"},
            "method": {"name": "lora", "r": 8, "alpha": 16},
            "train": {
                **{"lr": 3e-4, "batch_size": 4, "grad_accum": 2, "max_seq_len": 128, "epochs": 2},
                "precision": "bf16",  # a run's spec holds what `auto` chose by then: run_job resolves it first
            },
            "output_dir": str(tmp_path / "run"),
        }
    )
    metrics = tmp_path / "metrics.jsonl"
    rows = [*HISTORY[:4], {"eval": "validation", "step": 4, "loss": 2.61, "rows": 8, "seconds": 0.5}, *HISTORY[4:]]
    rows += [{"eval": "validation", "step": 8, "loss": 1.93, "rows": 8, "seconds": 0.5}]
    rows += [{"eval": "after", "step": 8, "eval_seconds": 1.0}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    history, validation = read_metrics(metrics)
    assert [h["step"] for h in history] == list(range(1, 9)) and [v["step"] for v in validation] == [4, 8]

    adapter, merged = tmp_path / "run/adapter", tmp_path / "run/merged"
    snippet = loading_snippet(spec, adapter, merged)
    details = RunDetails(hyperparameters(spec, 8), {"training examples": "40"}, {"adapter": str(adapter)}, snippet)
    html, _ = _write(tmp_path / "run", history=history, validation=validation, details=details)

    hp = {m.group(1): m.group(2) for m in re.finditer(r'<tr data-hp="([^"]+)"><th>[^<]*</th><td>([^<]*)</td>', html)}
    assert hp["method"].startswith("lora (r 8, alpha 16.0") and "dropout 0.05" in hp["method"]
    assert hp["learning rate"] == "0.0003 (cosine, warmup 0.05)"
    assert hp["batch"] == "4 x 2 accumulation x 1 process(es) = 8 rows"
    assert hp["sequence length"].startswith("128 tokens") and hp["steps"] == "8 (2 epochs)"
    assert hp["precision"] == "bf16"
    # Each validation point beside the smoothed training loss of its step.
    for step, loss in ((4, "2.61"), (8, "1.93")):
        found = re.search(rf'<tr data-step="{step}"><td class="num">{step}</td>\s*<td class="num">([^<]+)</td>', html)
        assert found and found.group(1) == loss
    assert "<th>training examples</th><td>40</td>" in html
    assert f"AutoPeftModelForCausalLM.from_pretrained(&#34;{adapter.resolve()}&#34;)" in html
    assert len(snippet.splitlines()) == 3 and f'AutoModelForCausalLM.from_pretrained("{merged.resolve()}")' in snippet
    for library in ("tunelab", "torch", "transformers", "peft"):
        assert f"<tr><th>{library}</th><td>" in html
    assert re.search(r"<tr><th>date</th><td>\d{4}-\d\d-\d\d \d\d:\d\d UTC</td>", html)


def test_no_validation_points_says_why(tmp_path: Path) -> None:
    html, _ = _write(tmp_path)
    assert "not measured during training" in html and 'class="validation"' not in html
    untrained, _ = _write(tmp_path / "eval", history=[])  # `tunelab eval`: no training, no such section
    assert "Validation loss during training" not in untrained
