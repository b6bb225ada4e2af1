"""deploy/kubernetes: every object renders and validates against the Kubernetes API schema offline; the service's
arguments parse with tunelab's own CLI; the fine-tune Job's command trains for real (tiny model) and resumes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer
import yaml

from tunelab.cli import app

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
KUBERNETES = "1.32"  # the oldest minor still supported upstream when these manifests were written
pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl renders the kustomizations")


def _render(folder: Path) -> list[dict[str, Any]]:
    done = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def objects() -> dict[str, dict[str, Any]]:
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in _render(DEPLOY)}


def _find(objects: dict[str, dict[str, Any]], kind: str, prefix: str) -> dict[str, Any]:
    found = [o for key, o in objects.items() if key.startswith(f"{kind}/{prefix}")]
    assert len(found) == 1, f"{kind}/{prefix}*: {sorted(objects)}"
    return found[0]


@pytest.mark.parametrize("folder", ["service", "service-s3", "ray", "finetune"])
def test_each_part_renders_on_its_own(folder: str) -> None:
    assert _render(DEPLOY / folder)


def test_every_object_is_valid_and_in_the_namespace(objects: dict[str, dict[str, Any]]) -> None:
    kinds = {o["kind"] for o in objects.values()}
    assert {"Deployment", "Service", "StatefulSet", "Secret", "Job", "ConfigMap", "RayCluster"} <= kinds
    for key, obj in objects.items():
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "tunelab", key
        if obj["apiVersion"] != "ray.io/v1":  # a custom resource: its pod templates are checked below
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_a_wrong_field_is_caught() -> None:
    """The check above can fail: a misspelt field is refused by the same validator."""
    bad = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"}, "spec": {"backofLimit": 1}}
    with pytest.raises(kubernetes_validate.ValidationError, match="backofLimit"):
        kubernetes_validate.validate(bad, KUBERNETES, strict=True)


def test_the_ray_cluster_runs_tunelab_pods_on_the_pinned_ray(objects: dict[str, dict[str, Any]]) -> None:
    cluster = _find(objects, "RayCluster", "tunelab-ray")["spec"]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = [p for p in extras["ray"] if p.startswith("ray")]
    assert pins and pins[0].endswith(f"=={cluster['rayVersion']}"), (pins, cluster["rayVersion"])
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": group["template"]}
        kubernetes_validate.validate(template, KUBERNETES, strict=True)
        assert all(c["image"].startswith("tunelab") for c in group["template"]["spec"]["containers"])
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def _parse(args: list[str]) -> None:
    """tunelab's CLI parses these arguments (an unknown option or a bad value raises), without running anything."""
    command = typer.main.get_command(app)
    context = command.make_context("tunelab", [args[1]], resilient_parsing=False)
    group = command.get_command(context, args[1])  # type: ignore[attr-defined]
    assert group is not None, args[1]
    group.make_context(args[1], args[2:], parent=context)


def test_the_service_arguments_parse(objects: dict[str, dict[str, Any]]) -> None:
    pod = _find(objects, "Deployment", "tunelab-service")["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[:2] == ["tunelab", "service"]
    _parse([arg.replace("$(DATABASE_URL)", "postgresql://u:p@h/db") for arg in args])
    secret = pod["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]
    assert _find(objects, "Secret", secret["name"])["data"][secret["key"]]  # the generated name is the one used
    with pytest.raises(Exception, match="no-such-option"):
        _parse([*args, "--no-such-option"])


def test_the_service_with_object_storage_is_valid_and_its_arguments_parse() -> None:
    """The overlay (not in the whole: it replaces the service) adds --storage and the bucket's credentials."""
    objects = {f"{o['kind']}/{o['metadata']['name']}": o for o in _render(DEPLOY / "service-s3")}
    for obj in objects.values():
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    container = _find(objects, "Deployment", "tunelab-service")["spec"]["template"]["spec"]["containers"][0]
    assert "--storage=$(STORAGE_URL)" in container["args"]
    urls = {"$(DATABASE_URL)": "postgresql://u:p@h/db", "$(STORAGE_URL)": "s3://bucket/prefix"}
    args = container["args"]
    for variable, value in urls.items():
        args = [arg.replace(variable, value) for arg in args]
    _parse(args)
    config = next(e["valueFrom"]["configMapKeyRef"] for e in container["env"] if e["name"] == "STORAGE_URL")
    assert _find(objects, "ConfigMap", config["name"])["data"]["url"].startswith("s3://")
    secret = _find(objects, "Secret", container["envFrom"][0]["secretRef"]["name"])
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["data"])


def test_the_finetune_job_trains_and_a_retried_pod_resumes(
    objects: dict[str, dict[str, Any]], tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """The Job's own shell command, with its paths moved under tmp_path and the tiny model in the spec."""
    pod = _find(objects, "Job", "tunelab-finetune")["spec"]["template"]["spec"]
    config = _find(objects, "ConfigMap", pod["volumes"][0]["configMap"]["name"])
    spec = yaml.safe_load(config["data"]["spec.yaml"])
    spec["model"] = {"name": str(tiny_llama_dir)}
    spec["train"] |= {"max_steps": 4, "batch_size": 4}
    spec["checkpoints"]["every_steps"] = 2
    spec["eval"] = {"enabled": False}  # the Job's part is the command and the resume; evaluation is tested elsewhere
    script, spec_text = pod["containers"][0]["args"][0], yaml.safe_dump(spec)
    moved = {"/etc/tunelab": tmp_path / "etc", "/workspace": tmp_path / "workspace", "/opt/tunelab": ROOT}
    for old, new in moved.items():
        script, spec_text = script.replace(old, str(new)), spec_text.replace(old, str(new))
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "spec.yaml").write_text(spec_text)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    first = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "workspace" / "runs" / "chat-lora"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir())
    second = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, check=False)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr and "step-000004" in second.stderr
