"""The base install: without the extras' packages, the main job trains through the CLI, and each feature that needs
an extra fails up front with a message naming the extra. Also: the base requirements leave every extra out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.extras import EXTRAS, MissingExtraError, optional_import

ROOT = Path(__file__).parents[1]

# The extras' top-level modules, made unimportable in the child interpreter before tunelab is imported: `None` in
# sys.modules is what a missing package looks like to `import` (ModuleNotFoundError) and to importlib.util.find_spec
# (None), which is how transformers and accelerate probe for DeepSpeed and bitsandbytes.
BLOCKED = sorted({module for extra in EXTRAS.values() for module in extra.modules} | {"multipart"})

# Each command runs in the one child interpreter (CliRunner), so the heavy imports are paid once.
DRIVER = """
import json, sys
for name in {blocked!r}:
    sys.modules[name] = None
from typer.testing import CliRunner
from tunelab.cli import app

runner = CliRunner()
results = {{}}
for key, args in {commands!r}.items():
    result = runner.invoke(app, args)
    results[key] = {{"code": result.exit_code, "output": result.output, "error": repr(result.exception)}}
print("RESULTS " + json.dumps(results))
"""


def _spec(tmp_path: Path, model_dir: Path) -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"model: {{name: {model_dir}}}\n"
        "method: {name: lora, r: 4, alpha: 8}\n"
        f"data: {{train: {ROOT / 'data/chat/train.jsonl'}, validation: {ROOT / 'data/chat/validation.jsonl'}}}\n"
        "train: {max_steps: 2, batch_size: 4, lr: 5.0e-3, max_seq_len: 64}\n"
        "eval: {max_examples: 4, samples: 1, max_new_tokens: 4, generations: 2}\n"
        f"output_dir: {tmp_path / 'run'}\n",
        encoding="utf-8",
    )
    return spec


def _run_without_extras(tmp_path: Path, commands: dict[str, list[str]]) -> dict[str, dict[str, object]]:
    code = textwrap.dedent(DRIVER).format(blocked=BLOCKED, commands=commands)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    results: dict[str, dict[str, object]] = json.loads(line.removeprefix("RESULTS "))
    return results


def test_the_base_install_trains_and_each_missing_extra_names_its_fix(tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec = str(_spec(tmp_path, tiny_llama_dir))
    service_dir = str(tmp_path / "service")
    commands = {
        "help": ["--help"],
        "train": ["train", spec],
        "qlora": ["train", spec, "--set", "method.name=qlora"],
        "deepspeed": ["train", spec, "--set", "distributed.strategy=zero2"],
        "ray": ["train", spec, "--ray", "--num-workers", "2", "--set", "distributed.strategy=ddp"],
        "benchmarks": ["train", spec, "--set", "eval.benchmarks=[truthfulqa_mc1]"],
        "eval_b": ["eval", "-b", "truthfulqa_mc1", "--model", str(tiny_llama_dir)],
        "service": ["service", "--data-dir", service_dir],
        "service_keys": ["service", "keys", "list", "--data-dir", service_dir],
        "bench_qlora": ["bench", "--methods", "lora,qlora", "--model", str(tiny_llama_dir)],
    }
    results = _run_without_extras(tmp_path, commands)

    assert results["help"]["code"] == 0 and "service" in str(results["help"]["output"])
    assert results["train"]["code"] == 0, results["train"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and (tmp_path / "run" / "merged").is_dir()

    expected = {
        "qlora": ("qlora", "method.name: method qlora needs bitsandbytes"),
        "deepspeed": ("deepspeed", "distributed.strategy: strategy zero2 (DeepSpeed ZeRO) needs deepspeed"),
        "benchmarks": ("benchmarks", "eval.benchmarks: benchmarks (lm-eval tasks) needs lm-eval"),
        "eval_b": ("benchmarks", "needs lm-eval"),
        "ray": ("ray", "tunelab train --ray (Ray Train) needs ray"),
        "service": ("service", "tunelab service needs sqlalchemy, alembic and python-multipart"),
        "service_keys": ("service", "tunelab service needs sqlalchemy"),
        "bench_qlora": ("qlora", "the bench's qlora row"),
    }
    for key, (extra, message) in expected.items():
        result = results[key]
        output = " ".join(str(result["output"]).split())  # the service's console wraps long lines
        assert result["code"] == 2, (key, result)
        assert message in output, (key, output)
        assert f"pip install 'tunelab[{extra}]'" in output, (key, output)
        assert "Traceback" not in output, (key, output)
    assert not (tmp_path / "service").exists()  # refused before the service made its data folder


def test_a_missing_postgres_driver_names_the_postgres_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # what an install without the postgres extra looks like
    args = ["service", "keys", "list", "--data-dir", str(tmp_path), "--database", "postgresql://u:p@127.0.0.1:1/db"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert "a PostgreSQL database (--database postgresql://...) needs psycopg" in result.output
    assert "pip install 'tunelab[postgres]'" in result.output


def test_the_service_on_ray_names_the_ray_extra_and_its_option(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # an install without the ray extra
    base = ["service", "--data-dir", str(tmp_path)]
    result = CliRunner().invoke(app, [*base, "--executor", "ray"], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert "tunelab service --executor ray needs ray" in result.output
    assert "pip install 'tunelab[ray]'" in result.output
    result = CliRunner().invoke(app, [*base, "--ray-address", "10.0.0.1:6379"], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert "--ray-address needs --executor ray" in " ".join(result.output.split())


def test_optional_import_returns_the_module_or_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    assert optional_import("json", "qlora", "x") is json
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(MissingExtraError, match=r"method qlora needs bitsandbytes.*pip install 'tunelab\[qlora\]'"):
        optional_import("bitsandbytes", "qlora", "method qlora")


def test_the_base_requirements_leave_every_extra_out() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    optional = project["optional-dependencies"]
    base = {_name(req) for req in project["dependencies"]}
    assert {"lm-eval", "deepspeed", "bitsandbytes", "sqlalchemy", "alembic", "psycopg"}.isdisjoint(base)
    for extra in EXTRAS.values():
        packages = _packages(optional, extra.name)
        assert set(extra.modules.values()) <= packages, extra.name  # the messages name what the extra installs
        assert not packages & base, (extra.name, packages & base)
        assert packages <= _packages(optional, "all"), extra.name
    assert _packages(optional, "service") < _packages(optional, "postgres")  # postgres implies the service


def _packages(optional: dict[str, list[str]], extra: str) -> set[str]:
    """The packages an extra installs, following its references to other extras (tunelab[service])."""
    found: set[str] = set()
    for requirement in optional[extra]:
        name = _name(requirement)
        if name == "tunelab":
            for other in requirement.partition("[")[2].partition("]")[0].split(","):
                found |= _packages(optional, other.strip())
        else:
            found.add(name)
    return found


def _name(requirement: str) -> str:
    """'psycopg[binary]>=3.3,<4' -> 'psycopg'; 'uvloop>=0.23; sys_platform != ...' -> 'uvloop'."""
    for i, char in enumerate(requirement):
        if char in "[<>=!~; ":
            return requirement[:i].lower().replace("_", "-")
    return requirement.lower().replace("_", "-")
