"""The README's walkthroughs (service; fine-tune -> ONNX -> serve), run as written on the embedded model."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunelab.train.distributed import free_port

ROOT = Path(__file__).parents[1]


def _walkthrough(heading: str) -> tuple[list[str], str]:
    """The shell lines and the Python block of a README section, from its heading on."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(heading, 1)[1]
    shell = re.search(r"```bash\n(.*?)```", section, re.S)
    python = re.search(r"```python\n(.*?)```", section, re.S)
    if shell is None or python is None:
        raise AssertionError(f"README: {heading!r} lost its bash or python block")
    joined = shell.group(1).replace("\\\n", " ")  # continuation lines
    lines = [line.split("#", 1)[0].strip() for line in joined.splitlines()]
    return [line for line in lines if line], python.group(1)


def _environment(tmp_path: Path) -> dict[str, str]:
    """The walkthroughs' relative paths (data/, examples/) resolve as in a checkout; tunelab is on PATH."""
    for name in ("data", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def _run(line: str, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(line, shell=True, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
    return done.stdout


def _run_client(python: str, port: int, cwd: Path, env: dict[str, str]) -> str:
    script = python.replace("http://127.0.0.1:8000/v1", f"http://127.0.0.1:{port}/v1")
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _start(command: str, port: int, cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A server in the background, as the README's `&` does, on a free port (tests may run next to a real one)."""
    line = command.removesuffix("&").strip() + f" --port {port}"
    server = subprocess.Popen(line, shell=True, cwd=cwd, env=env, start_new_session=True)
    _wait_for_port(port, server)
    return server


def _stop(server: subprocess.Popen[bytes]) -> None:
    os.killpg(server.pid, signal.SIGTERM)  # the service stops its workers, each saving a checkpoint first
    server.wait(timeout=120)


def _wait_for_port(port: int, service: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.poll() is not None:
            raise AssertionError(f"the service exited with {service.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("the service did not start listening")


@pytest.mark.slow
def test_service_walkthrough_runs_as_written(tmp_path: Path) -> None:
    shell, python = _walkthrough("### Walkthrough")
    start, make_key, make_data = (line.replace("~/tunelab-service", str(tmp_path / "service")) for line in shell)
    env, port = _environment(tmp_path), free_port()
    service = _start(start, port, tmp_path, env)
    try:
        key = _run(make_key.removeprefix("export KEY=$(").removesuffix(")"), tmp_path, env).strip()
        _run(make_data, tmp_path, env)
        out = _run_client(python, port, tmp_path, {**env, "KEY": key})
    finally:
        _stop(service)
    assert "The job has successfully completed" in out
    assert re.search(r"^1 ft:embedded:chat:\S+:ckpt-step-1$", out, re.M)  # the checkpoint, usable as a model
    assert "step,train_loss,valid_loss" in out  # the results CSV
    answers = out.split("step,train_loss", 1)[1].split("\n", 2)[2]  # what the two chats printed
    _assert_two_replies(answers)


@pytest.mark.slow
def test_deploy_walkthrough_runs_as_written(tmp_path: Path) -> None:
    shell, python = _walkthrough("## Deploy: ONNX export")
    train, export, generate, serve = shell[1:]  # shell[0] activates the .venv: PATH does that here
    env, port = _environment(tmp_path), free_port()
    # The one change: 3 steps of 2 rows instead of the main job's full epoch (that job is the quick start's).
    _run(f"{train} --set train.max_steps=3 --set train.batch_size=2 --set eval.enabled=false", tmp_path, env)
    _run(export, tmp_path, env)
    assert (tmp_path / "runs/chat-lora/onnx-int4/genai_config.json").is_file()
    assert len(_run(generate, tmp_path, env).strip()) > 0
    server = _start(serve, port, tmp_path, env)
    try:
        out = _run_client(python, port, tmp_path, env)
    finally:
        _stop(server)
    _assert_two_replies(out)


def _assert_two_replies(printed: str) -> None:
    """The client printed a reply, a newline, then the streamed reply: each must hold text.

    A length threshold would be flaky: a short but real answer ("Your name is...", "Hi") is a working server.
    """
    reply, _, streamed = printed.strip("\n").partition("\n")
    assert reply.strip(), f"the first (non-streamed) reply is empty: {printed!r}"
    assert streamed.strip(), f"the streamed reply is empty: {printed!r}"
