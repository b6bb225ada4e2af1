"""train.report_to: a real tiny run's curves read back with TensorBoard's and MLflow's own readers (TensorBoard by
default), a resumed run continuing the same curves, W&B offline, and the errors for a wrong name and a missing
package."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import JobSpec, load_spec
from tunelab.errors import ConfigError
from tunelab.extras import MissingExtraError
from tunelab.layout import RunLayout
from tunelab.recipe import run_job
from tunelab.train.trackers import open_trackers

ROOT = Path(__file__).parents[1]
runner = CliRunner()


def _spec(tmp_path: Path, model_dir: Path) -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"model: {{name: {model_dir}}}\n"
        "method: {name: lora, r: 4, alpha: 8}\n"
        f"data: {{train: {ROOT / 'data/chat/train.jsonl'}, validation: {ROOT / 'data/chat/validation.jsonl'}}}\n"
        "train: {max_steps: 4, batch_size: 4, lr: 5.0e-3, max_seq_len: 64, eval_every: 2}\n"
        "checkpoints: {every_steps: 2, keep_last: 3}\n"
        "eval: {max_examples: 4, samples: 1, max_new_tokens: 4, generations: 2}\n"
        f"output_dir: {tmp_path / 'run'}\n",
        encoding="utf-8",
    )
    return spec


def _jsonl(path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_run_writes_its_curves_for_tensorboard_by_default(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = _spec(tmp_path, tiny_llama_dir)
    result = runner.invoke(app, ["train", str(spec)])  # no report_to anywhere
    assert result.exit_code == 0, result.output
    run = RunLayout(tmp_path / "run")
    assert not run.mlflow_db.exists() and not (run.root / "wandb").exists()  # the default is TensorBoard alone
    rows = [r for r in _jsonl(run.metrics) if "eval" not in r]
    summary = json.loads(run.summary.read_text(encoding="utf-8"))
    events = EventAccumulator(str(run.tensorboard / "run"))
    events.Reload()

    def scalars(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)]

    for key in ("loss", "lr", "tokens_per_s", "grad_norm"):  # every step's value, as metrics.jsonl has it
        assert scalars(f"train/{key}") == [(int(r["step"]), pytest.approx(r[key], rel=1e-6)) for r in rows], key
    assert [s for s, _ in scalars("validation/loss")] == [2, 4]
    for metric in ("loss", "token_accuracy"):  # the scenario's scores before (step 0) and after (the last step)
        before, after = summary["before"][metric], summary["after"][metric]
        assert scalars(f"eval/{metric}") == [(0, pytest.approx(before, rel=1e-6)), (4, pytest.approx(after, rel=1e-6))]


def test_tensorboard_and_mlflow_hold_the_run_s_curves_across_a_resume(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    spec = _spec(tmp_path, tiny_llama_dir)
    run = RunLayout(tmp_path / "run")
    # A run that stops at step 3, then loses its step-3 checkpoint, as if it had crashed after logging step 3:
    # the resumed run starts from step 2 and logs step 3 again.
    first = run_job(load_spec(spec, ["train.report_to=tensorboard,mlflow"]), stop_after=3)
    assert first.interrupted
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the run's store is not left to the next run of the process
    for leftover in run.checkpoints.glob("step-000003*"):
        for f in leftover.iterdir():
            f.unlink()
        leftover.rmdir()
    result = runner.invoke(app, ["train", str(spec), "--resume", "--report-to", "tensorboard,mlflow"])
    assert result.exit_code == 0, result.output

    rows = _jsonl(run.metrics)
    steps = [(int(r["step"]), r["loss"]) for r in rows if "eval" not in r]
    validation = [(int(r["step"]), r["loss"]) for r in rows if r.get("eval") == "validation"]
    assert [s for s, _ in steps] == [1, 2, 3, 4] and [s for s, _ in validation] == [2, 4]
    summary = json.loads(run.summary.read_text(encoding="utf-8"))

    events = EventAccumulator(str(run.tensorboard / "run"))
    events.Reload()

    def scalars(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)]

    # Step 3 once (the crashed run's point is purged), each value the one metrics.jsonl holds (float32 in TB).
    assert scalars("train/loss") == [(s, pytest.approx(v, rel=1e-6)) for s, v in steps]
    assert scalars("validation/loss") == [(s, pytest.approx(v, rel=1e-6)) for s, v in validation]
    assert [s for s, _ in scalars("train/lr")] == [1, 2, 3, 4]
    assert {"train/grad_norm", "train/tokens_per_s"} <= set(events.Tags()["scalars"])
    before, after = summary["before"]["loss"], summary["after"]["loss"]
    assert scalars("eval/loss") == [(0, pytest.approx(before, rel=1e-6)), (4, pytest.approx(after, rel=1e-6))]

    client = MlflowClient(f"sqlite:///{run.mlflow_db}")
    experiment = client.get_experiment_by_name("tunelab")
    assert experiment is not None
    (mlflow_run,) = client.search_runs([experiment.experiment_id])  # the resumed run reopened the same MLflow run
    assert json.loads(run.tracker_runs.read_text(encoding="utf-8"))["mlflow"] == mlflow_run.info.run_id
    history = client.get_metric_history(mlflow_run.info.run_id, "train/loss")
    latest = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}  # MLflow's history appends
    assert latest == {s: pytest.approx(v) for s, v in steps}
    # MLflow cannot delete points: the crashed run's step 3 stays beside the resumed run's, with the same value
    # (resume is exact), as the README says.
    assert sorted(m.step for m in history) == [1, 2, 3, 3, 4]
    assert len({m.value for m in history if m.step == 3}) == 1
    val_history = client.get_metric_history(mlflow_run.info.run_id, "validation/loss")
    assert sorted((m.step, m.value) for m in val_history) == [(s, pytest.approx(v)) for s, v in validation]
    params = mlflow_run.data.params
    assert params["train.lr"] == "0.005" and params["method.name"] == "lora" and params["train.max_steps"] == "4"


def test_a_new_run_in_an_old_run_s_folder_hides_the_old_curve(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job = JobSpec.model_validate(
        {"data": {"train": "x.jsonl"}, "train": {"report_to": ["tensorboard"]}, "output_dir": str(tmp_path / "run")}
    )
    for losses in ([3.0, 2.0, 1.0], [5.0, 4.0]):  # the second run starts over (no resume), as its metrics.jsonl does
        with open_trackers(job, None, main=True) as trackers:
            assert trackers is not None
            for step, loss in enumerate(losses, 1):
                trackers.log_step({"step": step, "loss": loss})
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "run"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 5.0), (2, 4.0)]


def test_an_unknown_tracker_names_the_field_and_the_choices(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"data: {{train: {ROOT / 'data/chat/train.jsonl'}}}\n", encoding="utf-8")
    result = runner.invoke(app, ["train", str(spec), "--report-to", "tensorbord,mlflow"])
    assert result.exit_code == 2
    assert "train.report_to" in result.output and "did you mean 'tensorboard'?" in result.output
    assert "choices: tensorboard, mlflow, wandb" in result.output and "Traceback" not in result.output
    with pytest.raises(ConfigError, match=r"train\.report_to.*unknown tracker 'comet'"):
        load_spec(spec, ["train.report_to=[tensorboard, comet]"])
    assert load_spec(spec, ["train.report_to=mlflow, mlflow"]).train.report_to == ["mlflow"]
    assert load_spec(spec).train.report_to == ["tensorboard"]  # the default
    assert load_spec(spec, ["train.report_to=none"]).train.report_to == []  # `--report-to none`: no tracker
    assert load_spec(spec, ["train.report_to=[]"]).train.report_to == []


def test_a_missing_tracker_package_names_the_trackers_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tunelab.extras

    monkeypatch.setattr(tunelab.extras, "_findable", lambda module: module != "mlflow")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"data: {{train: {ROOT / 'data/chat/train.jsonl'}}}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"train\.report_to.*mlflow-skinny.*not installed.*tunelab\[trackers\]"):
        load_spec(spec, ["train.report_to=mlflow"])
    assert load_spec(spec, ["train.report_to=tensorboard"]).train.report_to == ["tensorboard"]  # needs no mlflow
    # A spec built in code (no load_spec) meets the same check when the trackers open.
    job = JobSpec.model_validate({"data": {"train": "x.jsonl"}, "train": {"report_to": ["mlflow"]}})
    with pytest.raises(MissingExtraError, match="mlflow-skinny") as caught, open_trackers(job, None, main=True):
        pass
    assert caught.value.extra == "trackers"


def test_wandb_logs_offline_into_the_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    job = JobSpec.model_validate(
        {"data": {"train": "x.jsonl"}, "train": {"report_to": ["wandb"]}, "output_dir": str(tmp_path / "run")}
    )
    with open_trackers(job, None, main=True) as trackers:
        assert trackers is not None
        (tracker,) = trackers.trackers
        assert tracker.tracker.offline  # no network unless the user set WANDB_MODE
        trackers.log_step({"step": 1, "loss": 2.5, "lr": 1e-3})
        trackers.log_validation({"step": 1, "loss": 2.7})
    run_id = json.loads(RunLayout(tmp_path / "run").tracker_runs.read_text(encoding="utf-8"))["wandb"]
    (record,) = (tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    assert record.stat().st_size > 0
    with open_trackers(job, None, main=False) as nothing:  # other processes of a launch log nothing
        assert nothing is None
