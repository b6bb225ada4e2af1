"""DPO: the pair formats, the loss against a reference written out here, the reference model, and runs end to end
through `tunelab train` (one process and --nproc 2) on the tiny model."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import load_spec
from tunelab.data.packing import collate
from tunelab.data.preference import pair_rows, parse_pair
from tunelab.data.render import IGNORE, Tokenized, tokenize
from tunelab.errors import ConfigError
from tunelab.methods import apply_method
from tunelab.tasks import get_task
from tunelab.train.objectives import Dpo, dpo_terms, reference_logps, sequence_logps

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

OPENAI_ROW = {
    "input": {"messages": [{"role": "user", "content": "What colour is the sky?"}]},
    "preferred_output": [{"role": "assistant", "content": "Blue on a clear day."}],
    "non_preferred_output": [{"role": "assistant", "content": "Green, always."}],
}
TRL_ROW = {"prompt": "Q: Can pigs fly?\nA:", "chosen": " No, pigs cannot fly", "rejected": " Yes, at night"}


def _pairs_file(path: Path, n: int = 24) -> Path:
    rows = []
    for i in range(n):
        row = dict(TRL_ROW) if i % 2 else json.loads(json.dumps(OPENAI_ROW))
        if i % 2:
            row["prompt"] = f"Q: Question number {i}?\nA:"
        else:
            row["input"]["messages"][0]["content"] = f"Question number {i}?"
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _spec(tmp_path: Path, model_dir: Path, extra: str = "", method: str = "lora") -> Path:
    train = _pairs_file(tmp_path / "train.jsonl")
    val = _pairs_file(tmp_path / "val.jsonl", 6)
    spec = tmp_path / "dpo.yaml"
    # Full fine-tuning has no rank, scale or adapter dropout: the spec refuses those settings for it.
    settings = "" if method == "full" else ", r: 8, alpha: 16, dropout: 0.0"
    spec.write_text(
        f"model: {{name: {model_dir}}}\n"
        f"method: {{name: {method}{settings}}}\n"
        "task: {scenario: preference, beta: 0.1}\n"
        f"data: {{train: {train}, validation: {val}}}\n"
        "train: {max_steps: 6, batch_size: 4, lr: 5.0e-3, max_seq_len: 64, warmup_ratio: 0}\n"
        "eval: {samples: 2, max_new_tokens: 8}\n"
        f"output_dir: {tmp_path / 'run'}\n" + extra,
        encoding="utf-8",
    )
    return spec


# -- formats ----------------------------------------------------------------------------------------------------


def test_both_formats_parse_to_a_preferred_and_a_rejected_answer() -> None:
    pair = parse_pair(OPENAI_ROW, 1)
    assert [m.role for m in pair.chosen.messages] == ["user", "assistant"]
    assert pair.chosen.messages[-1].content == "Blue on a clear day."
    assert pair.rejected.messages[-1].content == "Green, always."
    assert not pair.chosen.messages[0].trained
    plain = parse_pair(TRL_ROW, 2)
    assert (plain.chosen.prompt, plain.chosen.completion) == (TRL_ROW["prompt"], TRL_ROW["chosen"])
    assert plain.rejected.completion == TRL_ROW["rejected"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": []}, "not a preference pair"),
        ({**OPENAI_ROW, "preferred_output": []}, "exactly one assistant message"),
        ({**OPENAI_ROW, "non_preferred_output": [{"role": "user", "content": "x"}]}, "non_preferred_output[0]"),
        ({**OPENAI_ROW, "input": {"messages": [{"role": "assistant", "content": "x"}]}}, "end with a user"),
        ({**TRL_ROW, "chosen": ""}, "must not be empty"),
        ({**TRL_ROW, "rejected": ["x"]}, "all be strings or all be lists"),
    ],
)
def test_bad_pairs_say_what_to_fix(row: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_pair(row, 3)
    assert message in str(info.value)


def test_a_bad_line_is_reported_with_its_number(tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec_path = _spec(tmp_path, tiny_llama_dir)
    train = tmp_path / "train.jsonl"
    lines = train.read_text().splitlines()
    lines[4] = json.dumps({**TRL_ROW, "chosen": 7})
    train.write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["train", str(spec_path)])
    assert result.exit_code != 0
    assert "train.jsonl:5" in result.output and "all be strings" in result.output


def test_prompt_learning_methods_are_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="DPO trains the LoRA family"):
        load_spec(_spec(tmp_path, tiny_llama_dir), ["method.name=prompt_tuning", "train.packing=false"])


# -- the loss -----------------------------------------------------------------------------------------------------


def test_dpo_terms_equal_the_formula_written_out() -> None:
    chosen = torch.tensor([-10.0, -4.0, -7.5], dtype=torch.float64)
    rejected = torch.tensor([-12.0, -3.0, -7.5], dtype=torch.float64)
    ref_chosen = torch.tensor([-11.0, -5.0, -6.0], dtype=torch.float64)
    ref_rejected = torch.tensor([-11.5, -2.0, -9.0], dtype=torch.float64)
    beta = 0.2
    losses, stats = dpo_terms(chosen, rejected, ref_chosen, ref_rejected, beta)
    for i in range(3):
        margin = beta * ((chosen[i] - ref_chosen[i]) - (rejected[i] - ref_rejected[i]))
        assert float(losses[i]) == pytest.approx(math.log(1 + math.exp(-float(margin))), abs=1e-9)
    rewards_c = [beta * float(c - r) for c, r in zip(chosen, ref_chosen, strict=True)]
    rewards_r = [beta * float(c - r) for c, r in zip(rejected, ref_rejected, strict=True)]
    assert stats["reward_accuracy"] == sum(c > r for c, r in zip(rewards_c, rewards_r, strict=True))
    assert stats["reward_margin"] == pytest.approx(sum(rewards_c) - sum(rewards_r), abs=1e-9)
    assert stats["logp_chosen"] == pytest.approx(-21.5) and stats["logp_rejected"] == pytest.approx(-22.5)


def _tokenized_pairs(tokenizer_dir: Path) -> list:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    pairs = [parse_pair(OPENAI_ROW, 1), parse_pair(TRL_ROW, 2), parse_pair({**TRL_ROW, "chosen": " Never"}, 3)]
    return [(tokenize(p.chosen, tokenizer), tokenize(p.rejected, tokenizer)) for p in pairs]


def _alone_logp(model: torch.nn.Module, seq: object) -> float:
    """A sequence's summed answer log-probability, computed on its own: no packing, no helper of tunelab's."""
    ids = torch.tensor([seq.input_ids])  # type: ignore[attr-defined]
    labels = torch.tensor(seq.labels)  # type: ignore[attr-defined]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    keep = labels[1:] != IGNORE
    return float(logp[keep].gather(-1, labels[1:][keep].unsqueeze(-1)).sum())


@pytest.mark.parametrize("packed", [True, False])
def test_sequence_logps_equal_each_sequence_scored_alone(tiny_llama_dir: Path, packed: bool) -> None:
    """Packed pairs (and a pair's two answers in one row) never attend to each other."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    pairs = _tokenized_pairs(tiny_llama_dir)
    rows = pair_rows(pairs, max_len=4096, packed=packed)
    assert len(rows) == (1 if packed else 3)
    table = reference_logps(model, rows, pad_id=0, batch_size=2)
    expected = [_alone_logp(model, seq) for pair in pairs for seq in pair]
    assert table.tolist() == pytest.approx(expected, abs=1e-4)


def test_reference_is_the_base_and_a_step_raises_the_margin(tiny_llama_dir: Path) -> None:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    pairs = _tokenized_pairs(tiny_llama_dir)
    rows = pair_rows(pairs, max_len=4096, packed=True)
    objective = Dpo(beta=0.1)
    objective.setup(base, rows, 0, 4)
    expected = [_alone_logp(base, seq) for pair in pairs for seq in pair]
    assert objective.reference.tolist() == pytest.approx(expected, abs=1e-4)

    from tunelab.config import MethodSpec

    model = apply_method(base, MethodSpec(name="lora", r=4, alpha=8, dropout=0.0))
    batch = collate(rows, 0, packed=False)  # a preference row carries positions whatever `packed` says
    assert "position_ids" in batch and "attention_mask" not in batch

    def forward(inputs: dict, n: float) -> object:
        return model(**inputs, use_cache=False)

    model.train()
    loss, stats = objective.loss(forward, batch, num_items=3)
    # LoRA starts as the identity: policy == reference, every reward 0, the loss log(2) per pair.
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
    assert stats["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert stats["reward_accuracy"] == 0

    # Adapter off gives the reference again, after the adapter changed.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    _, after = objective.loss(forward, batch, num_items=3)
    assert after["reward_margin"] > 0.0 and after["reward_accuracy"] >= 1
    with torch.no_grad(), model.disable_adapter():  # type: ignore[operator]
        logits = model(**{k: batch[k] for k in ("input_ids", "position_ids")}, use_cache=False).logits
        _, off = sequence_logps(logits, batch["labels"], batch["segments"])
    assert off.tolist() == pytest.approx(expected, abs=1e-4)


# -- end to end ---------------------------------------------------------------------------------------------------


def _history(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "eval" not in row]  # the steps, not the evaluation rows


def test_dpo_run_learns_to_prefer_the_chosen_answers(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(_spec(tmp_path, tiny_llama_dir))])
    assert result.exit_code == 0, result.output
    assert re.search(r"reference scoring: (\d+)/\1 rows", result.output)  # the reference pass shows progress
    run = tmp_path / "run"
    steps = _history(run)
    first, last = steps[0], steps[-1]
    for key in ("dpo_loss", "reward_accuracy", "reward_margin", "logp_chosen", "logp_rejected"):
        assert key in first
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # LoRA starts as the identity
    assert last["loss"] < first["loss"] and last["reward_margin"] > 0 and last["reward_accuracy"] > 0.5
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["pair_margin"] > summary["before"]["pair_margin"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert "pair_accuracy" in (run / "report.html").read_text(encoding="utf-8")


def test_packing_on_and_off_train_the_same_first_step(tiny_llama_dir: Path, tmp_path: Path) -> None:
    losses = {}
    for packed in (True, False):
        out = tmp_path / f"p{packed}"
        spec = load_spec(
            _spec(tmp_path, tiny_llama_dir),
            [f"train.packing={str(packed).lower()}", "train.max_steps=1", "train.batch_size=24", f"output_dir={out}"],
        )
        from tunelab.recipe import run_job

        run_job(spec.model_copy(update={"eval": spec.eval.model_copy(update={"enabled": False})}))
        losses[packed] = _history(out)[0]
    # One step over all 24 pairs: the same pairs, whatever the rows look like.
    assert losses[True]["logp_chosen"] == pytest.approx(losses[False]["logp_chosen"], abs=1e-3)
    assert losses[True]["loss"] == pytest.approx(losses[False]["loss"], abs=1e-5)


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_dpo_with_full_fine_tuning_and_qlora(method: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    lr = "1.0e-4" if method == "full" else "5.0e-3"
    spec = _spec(tmp_path, tiny_llama_dir, method=method)
    result = runner.invoke(app, ["train", str(spec), "--set", f"train.lr={lr}"])
    assert result.exit_code == 0, result.output
    steps = _history(tmp_path / "run")
    assert steps[-1]["reward_margin"] > steps[0]["reward_margin"]


def test_dpo_under_two_processes_matches_one(tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec = _spec(tmp_path, tiny_llama_dir, "eval: {enabled: false}\n")
    text = spec.read_text().replace("eval: {samples: 2, max_new_tokens: 8}\n", "")
    spec.write_text(text)
    one = runner.invoke(
        app, ["train", str(spec), "--set", "train.batch_size=4", "--set", f"output_dir={tmp_path / 'one'}"]
    )
    assert one.exit_code == 0, one.output
    two = runner.invoke(
        app,
        [
            "train", str(spec), "--nproc", "2", "--set", "distributed.strategy=ddp",
            "--set", "train.batch_size=2", "--set", f"output_dir={tmp_path / 'two'}",
        ],
    )  # fmt: skip
    assert two.exit_code == 0, two.output
    a, b = _history(tmp_path / "one"), _history(tmp_path / "two")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-4)
    assert [r["reward_margin"] for r in a] == pytest.approx([r["reward_margin"] for r in b], abs=1e-4)


def test_get_task_knows_the_preference_scenario() -> None:
    assert get_task("preference").name == "preference"


def test_loss_and_statistics_equal_trls_dpo_trainer(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The same batch through TRL's DPOTrainer (sigmoid loss, separate reference model) and through tunelab."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():  # a policy that differs from its reference, so rewards are not all zero
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    pairs = [TRL_ROW, {"prompt": "Q: Is the sky green?\nA:", "chosen": " No", "rejected": " Yes, always green"}]
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), beta=0.1, per_device_train_batch_size=2, report_to=[], use_cpu=True,
        max_length=None, precompute_ref_log_probs=False, bf16=False,
    )  # fmt: skip
    trainer = trl.DPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer
    )
    batch = next(iter(trainer.get_train_dataloader()))  # [chosen..., rejected...], right-padded
    trl_loss = float(trainer.compute_loss(policy, batch))
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    # The trainer set accelerate's process-wide state; later runs in this process build their own Accelerator.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)

    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]

    def sequence(i: int) -> Tokenized:
        keep = mask[i].bool()
        return Tokenized(ids[i][keep].tolist(), torch.where(completion[i].bool(), ids[i], IGNORE)[keep].tolist())

    rows = pair_rows([(sequence(0), sequence(2)), (sequence(1), sequence(3))], 4096, packed=True)
    objective = Dpo(beta=0.1)
    objective.setup(reference, rows, 0, 4)
    loss, stats = objective.loss(lambda inputs, n: policy(**inputs, use_cache=False), collate(rows, 0, True), 2)
    assert float(loss) == pytest.approx(trl_loss, abs=1e-5)
    assert stats["reward_accuracy"] / 2 == pytest.approx(logged["rewards/accuracies"], abs=1e-6)
    assert stats["reward_margin"] / 2 == pytest.approx(logged["rewards/margins"], abs=1e-5)
    assert stats["logp_chosen"] / 2 == pytest.approx(logged["logps/chosen"], abs=1e-4)
    assert stats["logp_rejected"] / 2 == pytest.approx(logged["logps/rejected"], abs=1e-4)
