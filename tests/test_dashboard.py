"""The service dashboard: plain HTTP checks of the page (in-process, fast), then a real browser (Playwright driving
Debian's Chromium) against a live `tunelab service` on loopback with the tiny model: sign-in and out, a bad file's
line errors, a job run to completion with its loss curves drawn, checkpoints, the jobs filter, tenancy, escaping,
a streamed playground answer, and a DPO job's reward curves. One service and one browser for the module."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient

from service_support import FAST, LiveService, api_key, chat_file, live_service
from tunelab.job_service.api import create_app
from tunelab.job_service.settings import ServiceSettings
from tunelab.job_service.store import Store

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags, Chromium's own connections are refused by a closed network and slow it.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
HOSTILE = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
# Screenshots for the docs: set TUNELAB_DASHBOARD_SHOTS to a folder (docs/ keeps a few); a test artefact otherwise.
SHOTS = os.environ.get("TUNELAB_DASHBOARD_SHOTS")

# -- (a) plain HTTP ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("dash_http")
    store = Store(f"sqlite:///{tmp / 'service.db'}", pool_size=2)
    with TestClient(create_app(ServiceSettings(data_dir=tmp / "svc", models={}), store)) as found:
        yield found
    store.close()


def test_root_serves_the_page_and_its_assets_with_a_script_policy(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy.split("script-src")[1].split(";")[0]
    scripts = re.findall(r'<script src="([^"]+)"', page.text)
    styles = re.findall(r'<link rel="stylesheet" href="([^"]+)"', page.text)
    assert scripts == ["/dashboard/vendor/uPlot.iife.min.js", "/dashboard/app.js"]
    for asset in scripts + styles:
        response = client.get(asset)
        assert response.status_code == 200 and len(response.content) > 1000, asset
    assert "uPlot" in client.get("/dashboard/vendor/uPlot.iife.min.js").text
    assert client.get("/dashboard/vendor/uPlot.LICENSE").text.startswith("The MIT License")
    assert client.get("/dashboard/missing.js").status_code == 404
    assert client.get("/v1/models").status_code == 401  # the API beside it is unchanged: still needs a key


def test_the_page_sends_the_key_as_a_header_never_in_a_url(client: TestClient) -> None:
    script = client.get("/dashboard/app.js").text
    assert "sessionStorage" in script and "localStorage" not in script
    assert "Authorization: `Bearer ${sessionStorage.getItem(KEY)" in script
    # The key is read in exactly two places (the header, and the signed-in check); no URL is built from it.
    uses = [line for line in script.splitlines() if "getItem(KEY)" in line]
    assert len(uses) == 2 and not any("?" in u.split("getItem")[0][-20:] or "href" in u for u in uses), uses
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script  # text from the API stays text


def test_a_retrieved_file_lists_its_problems_by_line_and_the_list_leaves_them_out(
    client: TestClient, tmp_path: Path
) -> None:
    store: Store = client.app.state.ctx.store  # type: ignore[attr-defined]
    headers = {"Authorization": f"Bearer {store.keys.create('http')[1]}"}
    lines = chat_file(tmp_path / "t.jsonl", n=3).read_text().splitlines()
    content = "\n".join([lines[0], "{not json", lines[1], '{"messages": []}']) + "\n"
    files = {"file": ("bad.jsonl", content.encode(), "application/jsonl")}
    created = client.post("/v1/files", headers=headers, files=files, data={"purpose": "fine-tune"}).json()
    got = client.get(f"/v1/files/{created['id']}", headers=headers).json()
    assert got["status"] == "error"
    problems = got["tunelab"]["problems"]
    assert [(p["line"], p["code"]) for p in problems][:1] == [(2, "invalid_json")] and len(problems) == 2
    assert all(p["message"] for p in problems) and problems[1]["line"] == 4
    assert client.get("/v1/files", headers=headers).json()["data"][0]["tunelab"] is None


# -- (b) a real browser -----------------------------------------------------------------------------------------


@dataclass
class Site:
    service: LiveService
    root: str
    keys: dict[str, str]
    browser: Any
    train: Path
    bad: Path
    shots: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Iterator[Site]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (/usr/bin/chromium): apt-get install chromium")
    from playwright.sync_api import sync_playwright

    tmp = tmp_path_factory.mktemp("dash")
    train = chat_file(tmp / f"train {HOSTILE}.jsonl"[:200].replace("/", "_"), n=24)
    bad = tmp / "bad.jsonl"
    lines = train.read_text(encoding="utf-8").splitlines()
    bad.write_text(lines[0] + "\n{not json\n" + lines[1] + "\n", encoding="utf-8")
    shots = Path(SHOTS) if SHOTS else tmp / "shots"
    shots.mkdir(parents=True, exist_ok=True)
    with live_service(tmp / "svc", {"tiny": tiny_llama_dir}, workers=1) as service:
        keys = {name: api_key(service.data_dir, name) for name in ("dash", "other")}
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            yield Site(service, service.url.removesuffix("/v1"), keys, browser, train, bad, shots)
            browser.close()


@pytest.fixture
def page(site: Site) -> Iterator[Any]:
    context = site.browser.new_context(viewport={"width": 1280, "height": 900})
    found = context.new_page()
    found.set_default_timeout(30_000)
    dialogs: list[str] = []
    found.on("dialog", lambda d: (dialogs.append(d.message), d.accept()))
    found.dialogs = dialogs
    yield found
    context.close()


def _sign_in(page: Any, site: Site, who: str = "dash") -> None:
    page.goto(site.root + "/")
    page.fill("#key", site.keys[who])
    page.click("#signin-form button")
    page.wait_for_selector("#nav:not([hidden])")


def _no_injection(page: Any) -> None:
    """Nothing from HOSTILE ran or became markup."""
    assert page.dialogs == [] and page.locator("img[src=x]").count() == 0
    assert page.evaluate("document.querySelectorAll('script').length") == 2


def test_sign_in_and_out(page: Any, site: Site) -> None:
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    page.goto(site.root + "/")
    page.fill("#key", "sk-wrong")
    page.click("#signin-form button")
    page.wait_for_selector("#signin-error:text('Incorrect API key provided.')")
    assert page.evaluate("sessionStorage.getItem('tunelab.key')") is None
    _sign_in(page, site)
    page.wait_for_selector("#jobs")
    assert page.evaluate("sessionStorage.getItem('tunelab.key')") == site.keys["dash"]
    assert not any(site.keys["dash"] in url for url in [*urls, page.url])
    page.click("#signout")
    page.wait_for_selector("#signin:not([hidden])")
    assert page.evaluate("sessionStorage.getItem('tunelab.key')") is None
    assert page.locator("#view").inner_text() == ""


def test_a_bad_file_shows_its_line_and_code_and_blocks_create(page: Any, site: Site) -> None:
    _sign_in(page, site)
    page.goto(site.root + "/#/new")
    page.set_input_files("#training-file", str(site.bad))
    row = page.wait_for_selector("#training-status tr.problem")
    cells = [c.inner_text() for c in row.query_selector_all("td")]
    assert cells[:2] == ["2", "invalid_json"], cells
    assert page.is_disabled("#create")
    assert "bad.jsonl: error" in page.inner_text("#training-status")
    page.screenshot(path=str(site.shots / "dashboard-file-error.png"))


def test_a_job_runs_to_completion_with_its_curves_events_and_checkpoints(page: Any, site: Site) -> None:
    started = time.monotonic()
    _sign_in(page, site)
    page.goto(site.root + "/#/new")
    page.set_input_files("#training-file", str(site.train))
    page.wait_for_selector("#training-status .ok")
    assert page.is_enabled("#create")
    spec = {**FAST, "train": {**FAST["train"], "max_steps": 8, "eval_every": 4}, "eval": {"enabled": False}}
    page.fill("#spec", json.dumps(spec))
    page.select_option("#model", "tiny")  # the list starts with the embedded model: too slow for a test
    page.fill("#suffix", "dash")
    page.click("#create")
    page.wait_for_url(re.compile(r"#/job/ftjob-"))
    job_id = page.url.split("#/job/")[1]
    page.wait_for_selector("#job-head .badge.succeeded", timeout=120_000)
    # Training points every step, validation points every 4 (eval_every), as the API's events carry them.
    page.wait_for_function("() => document.querySelector('#loss-chart').dataset.points === '8/2'")
    assert _blue_pixels(page) > 200, "the training-loss curve is not drawn"
    assert page.is_hidden("#dpo")  # no DPO statistics in a supervised job's events: no empty chart
    log = page.inner_text("#events")
    assert "The job has successfully completed" in log and "validation loss=" in log
    steps = [r.inner_text() for r in page.query_selector_all("#checkpoints tr[data-checkpoint] td:first-child")]
    assert sorted(int(s) for s in steps) == [4, 6, 8]  # every 2 steps; the service keeps the last 3 by default
    assert "step_metrics.csv" in page.inner_text("#results")
    assert '"max_steps": 8' in page.inner_text("#spec")
    assert "n_epochs" in page.inner_text("#spec dl.kv")
    report = page.frame_locator("iframe.report").locator("body")  # the report file, embedded (sandboxed)
    assert "lora" in report.inner_text()
    assert page.locator("#job-controls button").count() == 0  # a finished job has nothing to cancel or pause
    _no_injection(page)
    page.screenshot(path=str(site.shots / "dashboard-job.png"))  # the first screen: curves, checkpoints, events
    page.click("#checkpoints tr[data-checkpoint] a >> nth=0")
    page.wait_for_selector("#model-1")
    chosen = page.eval_on_selector("#model-1", "s => s.value")
    assert chosen.startswith(f"ft:tiny:dash:{job_id.removeprefix('ftjob-')}") and ":ckpt-step-" in chosen, chosen
    assert time.monotonic() - started < 120


def _blue_pixels(page: Any) -> int:
    """Pixels of the training curve's colour (#2563eb) on uPlot's canvas."""
    return _pixels(page, "#loss-chart", (37, 99, 235))


def _pixels(page: Any, chart: str, rgb: tuple[int, int, int]) -> int:
    """Pixels of colour `rgb` on the uPlot canvas in `chart`."""
    return int(
        page.evaluate(
            """([chart, [r, g, b]]) => { const c = document.querySelector(chart + ' canvas');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
            for (let i = 0; i < d.length; i += 4) if (d[i] === r && d[i+1] === g && d[i+2] === b) n++;
            return n; }""",
            [chart, list(rgb)],
        )
    )


def test_pause_resume_and_cancel_buttons_control_a_running_job(page: Any, site: Site) -> None:
    headers = {"Authorization": f"Bearer {site.keys['dash']}"}
    with site.train.open("rb") as f:
        uploaded = httpx.post(
            f"{site.service.url}/files", headers=headers, files={"file": f}, data={"purpose": "fine-tune"}
        )
    spec = {"train": {"max_steps": 5000, "max_seq_len": 64, "batch_size": 2}, "eval": {"enabled": False}}
    body = {"model": "tiny", "training_file": uploaded.json()["id"], "tunelab": {"spec": spec}}
    job = httpx.post(f"{site.service.url}/fine_tuning/jobs", headers=headers, json=body).json()
    _sign_in(page, site)
    page.goto(f"{site.root}/#/job/{job['id']}")
    page.wait_for_selector("#job-head .badge.running", timeout=60_000)
    page.click("#job-pause")
    page.wait_for_selector("#job-head .badge.paused", timeout=60_000)
    assert page.locator("#job-controls button").all_inner_texts() == ["Resume", "Cancel"]
    page.click("#job-resume")
    page.wait_for_selector("#job-head .badge:is(.queued, .running)")
    page.click("#job-cancel")
    page.wait_for_selector("#job-head .badge.cancelled", timeout=60_000)
    # The events list refreshes on its own poll, so it may show the cancellation a moment after the badge does.
    page.wait_for_selector("#events >> text=Job cancelled", timeout=30_000)
    assert page.locator("#job-controls button").count() == 0


def test_jobs_filter_and_another_project_sees_nothing(page: Any, site: Site) -> None:
    _sign_in(page, site)
    page.goto(site.root + "/#/jobs")
    page.wait_for_selector("#jobs tr[data-job]")
    assert sorted(page.locator("#jobs .badge").all_inner_texts()) == ["cancelled", "succeeded"]
    page.select_option("#status-filter", "failed")
    page.wait_for_selector("#jobs >> text=No failed jobs.")
    page.select_option("#status-filter", "succeeded")
    page.wait_for_selector("#jobs tr[data-job]")
    assert "status=succeeded" in page.url
    _no_injection(page)
    page.screenshot(path=str(site.shots / "dashboard-jobs.png"))
    page.click("#signout")
    _sign_in(page, site, "other")
    page.goto(site.root + "/#/jobs")
    page.wait_for_selector("#jobs >> text=No jobs yet.")
    page.goto(site.root + "/#/files")
    page.wait_for_selector("#files >> text=No files.")


def test_files_list_escapes_names_and_deletes_after_confirmation(page: Any, site: Site) -> None:
    _sign_in(page, site)
    page.goto(site.root + "/#/files")
    page.wait_for_selector("#files tr[data-file]")
    names = page.inner_text("#files")
    assert "<script>" in names or "_script_" in names  # shown as text, however the service sanitised it
    _no_injection(page)
    before = page.locator("#files tr[data-file]").count()
    page.click("#files tr[data-file] button.danger >> nth=-1")
    # Functions, not expressions: the page's policy forbids eval, which Playwright uses for a string expression.
    page.wait_for_function("n => document.querySelectorAll('#files tr[data-file]').length === n", arg=before - 1)
    assert page.dialogs and page.dialogs[0].startswith("Delete ")


def test_playground_streams_an_answer_from_two_models(page: Any, site: Site) -> None:
    _sign_in(page, site)
    bodies: list[dict[str, Any]] = []
    page.on(
        "request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None
    )
    page.goto(site.root + "/#/playground")
    page.wait_for_selector("#model-1")
    models = page.eval_on_selector_all("#model-1 option", "os => os.map(o => o.value)")
    fine_tuned = next(m for m in models if m.startswith("ft:") and ":ckpt-" not in m)
    page.select_option("#model-1", fine_tuned)
    page.check("#compare")
    page.select_option("#model-2", "tiny")
    page.fill("#max_tokens", "12")
    page.fill("#prompt", f"Hello {HOSTILE}")
    page.click("#send")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant.done').length === 2", timeout=60_000)
    replies = page.eval_on_selector_all(".msg.assistant", "ms => ms.map(m => [m.textContent, m.className])")
    assert all(text and "error" not in cls for text, cls in replies), replies
    assert sorted(b["model"] for b in bodies) == sorted([fine_tuned, "tiny"])
    assert all(b["stream"] is True and b["messages"][-1]["content"].endswith(HOSTILE) for b in bodies)
    assert page.inner_text(".msg.user >> nth=0").endswith(HOSTILE)
    _no_injection(page)
    page.screenshot(path=str(site.shots / "dashboard-playground.png"))


def test_pages_fit_a_phone(site: Site) -> None:
    context = site.browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    phone = context.new_page()
    phone.on("dialog", lambda d: d.dismiss())
    phone.goto(site.root + "/")
    phone.fill("#key", site.keys["dash"])
    phone.click("#signin-form button")
    for route in ("#/jobs", "#/new", "#/files", "#/models", "#/playground"):
        phone.goto(site.root + "/" + route)
        phone.wait_for_selector("#view h1")
        # Wide tables scroll inside their box; the page itself never scrolls sideways.
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390, route
    phone.screenshot(path=str(site.shots / "dashboard-phone.png"))
    context.close()


def test_hostile_text_stays_text_on_every_page_that_shows_it(page: Any, site: Site) -> None:
    """HOSTILE as a file's role (its problem, and the failed job's event and error), a suffix (the create error), a
    job's instruction (its spec), a model name and a streamed reply: text on each page, and nothing ran.

    File names never carry it back: the service sanitises them (`<`, `>`, `"`, `=` become `_`; the files page shows
    them, checked above). The tiny model cannot be made to say HOSTILE, so the streamed reply is the service's chat
    stream answered by the test (page.route), in the service's chunk shape; the other pane's error is the service's
    own answer quoting the model name."""
    hostile = site.bad.with_name("role.jsonl")
    good = site.train.read_text(encoding="utf-8").splitlines()[0]
    bad_line = json.dumps({"messages": [{"role": HOSTILE, "content": "hi"}, {"role": "assistant", "content": "x"}]})
    hostile.write_text(f"{good}\n{bad_line}\n", encoding="utf-8")
    _sign_in(page, site)

    # New job: the suffix comes back in the create error; the file's bad role in its problem table.
    page.goto(site.root + "/#/new")
    page.set_input_files("#training-file", str(site.train))
    page.wait_for_selector("#training-status .ok")
    page.select_option("#model", "tiny")
    page.fill("#suffix", HOSTILE)
    page.click("#create")
    assert f"Invalid suffix {HOSTILE!r}" in page.wait_for_selector("#create-status .error").text_content()
    page.set_input_files("#validation-file", str(hostile))
    row = page.wait_for_selector("#validation-status tr.problem")
    assert f"unknown role {HOSTILE!r}" in row.text_content()
    _no_injection(page)

    # Job page: a job on that file fails with an event and an error quoting the role; its instruction is in the spec.
    headers = {"Authorization": f"Bearer {site.keys['dash']}"}
    with hostile.open("rb") as f:
        files = {"file": (hostile.name, f)}
        uploaded = httpx.post(f"{site.service.url}/files", headers=headers, files=files, data={"purpose": "fine-tune"})
    spec = {"task": {"instruction": HOSTILE}, "eval": {"enabled": False}}
    body = {"model": "tiny", "training_file": uploaded.json()["id"], "tunelab": {"spec": spec}}
    job = httpx.post(f"{site.service.url}/fine_tuning/jobs", headers=headers, json=body).json()
    page.goto(f"{site.root}/#/job/{job['id']}")
    page.wait_for_selector("#job-head .badge.failed")
    assert HOSTILE in page.text_content("#job-head .error")
    assert any(HOSTILE in text for text in page.locator("#events li span").all_text_contents())
    shown_spec = page.text_content("#spec pre")  # JSON: the quote comes escaped
    assert "<script>alert(1)</script>" in shown_spec and "<img src=x onerror=alert(2)>" in shown_spec
    _no_injection(page)

    # Playground: pane 1 asks for a model named HOSTILE (the service's 404 quotes it); pane 2's reply streams HOSTILE.
    def reply(route: Any) -> None:
        if json.loads(route.request.post_data)["model"] != "tiny":
            route.continue_()
            return
        pieces = ["<scr", "ipt>alert(1)</script>", '">', "<img src=x onerror=alert(2)>"]  # split mid-tag, as tokens
        choices = [[{"index": 0, "delta": {"content": p}}] for p in pieces]
        chunks = [{"object": "chat.completion.chunk", "choices": c} for c in choices]
        stream = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=stream)

    page.route("**/v1/chat/completions", reply)
    page.goto(f"{site.root}/#/playground?model={quote(HOSTILE)}")
    page.wait_for_selector("#model-1")
    assert page.eval_on_selector("#model-1", "s => s.value") == HOSTILE
    page.check("#compare")
    page.select_option("#model-2", "tiny")
    page.fill("#prompt", "hi")
    page.click("#send")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant.done').length === 2")
    assert HOSTILE in page.text_content("#chat-1 .msg.assistant.error")  # "The model `...` does not exist ..."
    assert page.text_content("#chat-2 .msg.assistant") == HOSTILE
    _no_injection(page)


def test_a_dpo_job_page_draws_the_reward_curves(page: Any, site: Site) -> None:
    headers = {"Authorization": f"Bearer {site.keys['dash']}"}
    row = {
        "input": {"messages": [{"role": "user", "content": "Can pigs fly?"}]},
        "preferred_output": [{"role": "assistant", "content": "No, pigs cannot fly."}],
        "non_preferred_output": [{"role": "assistant", "content": "Yes, at night."}],
    }
    content = "".join(json.dumps(row) + "\n" for _ in range(12)).encode()
    files = {"file": ("pairs.jsonl", content)}
    uploaded = httpx.post(f"{site.service.url}/files", headers=headers, files=files, data={"purpose": "fine-tune"})
    spec = {"train": {"max_steps": 3, "max_seq_len": 64}, "eval": {"enabled": False}}
    method = {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 4}}}
    body = {"model": "tiny", "training_file": uploaded.json()["id"], "method": method, "tunelab": {"spec": spec}}
    job = httpx.post(f"{site.service.url}/fine_tuning/jobs", headers=headers, json=body).json()
    _sign_in(page, site)
    page.goto(f"{site.root}/#/job/{job['id']}")
    page.wait_for_selector("#job-head .badge.succeeded", timeout=120_000)
    page.wait_for_function("() => document.querySelector('#dpo-chart').dataset.points === '3'")
    assert page.is_visible("#dpo") and _pixels(page, "#dpo-chart", (22, 163, 74)) > 50  # reward accuracy's green
