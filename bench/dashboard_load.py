"""How long the dashboard's pages take to load with many jobs (issue 16):

    PYTHONPATH=src:tests .venv/bin/python bench/dashboard_load.py --jobs 200

Starts `tunelab service` with no workers (jobs stay queued: nothing trains), creates N jobs on the tiny test model
through the API, then times in Debian's Chromium (Playwright) each page from navigation until its content is shown:
the jobs list with all N rows, a job page, Files, Models and the Playground. Prints one line per page (median of 5).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import Page, sync_playwright
from typer.testing import CliRunner

from service_support import chat_file, live_service
from tiny import build_tiny_llama, build_tiny_tokenizer
from tunelab.job_service.cli import app as service_cli

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
SPEC = {"train": {"max_steps": 6, "max_seq_len": 64, "batch_size": 2}, "eval": {"enabled": False}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        model = build_tiny_llama(tmp / "tiny", build_tiny_tokenizer(tmp / "tokenizer"))
        with live_service(tmp / "svc", {"tiny": model}, workers=0) as service:
            key = _key(service.data_dir)
            job_id = _create_jobs(service.url, key, chat_file(tmp / "train.jsonl"), args.jobs)
            root = service.url.removesuffix("/v1")
            pages = {
                "jobs list": (
                    "#/jobs",
                    "n => document.querySelectorAll('#jobs tr[data-job]').length === n",
                    args.jobs,
                ),
                "job page": (f"#/job/{job_id}", "() => document.querySelector('#events li') !== null", None),
                "files": ("#/files", "() => document.querySelector('#files tr[data-file]') !== null", None),
                "models": ("#/models", "() => document.querySelector('#models tr[data-model]') !== null", None),
                "playground": ("#/playground", "() => document.querySelector('#model-1 option') !== null", None),
            }
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(root + "/")
                page.fill("#key", key)
                page.click("#signin-form button")
                page.wait_for_selector("#nav:not([hidden])")
                for name, (route, ready, arg) in pages.items():
                    times = [_load(page, f"{root}/{route}", ready, arg) for _ in range(args.repeats)]
                    print(f"{name:12s} {statistics.median(times) * 1000:7.0f} ms (median of {args.repeats})")
                browser.close()


def _key(data_dir: Path) -> str:
    result = CliRunner().invoke(service_cli, ["keys", "create", "--project", "bench", "--data-dir", str(data_dir)])
    return result.stdout.strip().splitlines()[-1]


def _create_jobs(url: str, key: str, train: Path, n: int) -> str:
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        with train.open("rb") as f:
            file_id = client.post("/files", files={"file": f}, data={"purpose": "fine-tune"}).json()["id"]
        while client.get(f"/files/{file_id}").json()["status"] == "uploaded":
            time.sleep(0.2)
        body = {"model": "tiny", "training_file": file_id, "tunelab": {"spec": SPEC}}
        ids = [client.post("/fine_tuning/jobs", json=body).raise_for_status().json()["id"] for _ in range(n)]
    return ids[-1]


def _load(page: Page, url: str, ready: str, arg: int | None) -> float:
    page.goto("about:blank")
    started = time.perf_counter()
    page.goto(url)
    page.wait_for_function(ready, arg=arg, timeout=60_000)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
