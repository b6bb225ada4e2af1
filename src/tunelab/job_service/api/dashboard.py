"""The dashboard: one static page at `/` and its assets at `/dashboard/...`, served by the API's own process. The
page holds no data: its script calls the `/v1` routes with the project's key (kept in the browser's
sessionStorage, sent as a Bearer header), so it sees exactly what the API gives that key."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(str(files("tunelab.job_service") / "dashboard"))
# Scripts only from the service itself: a model reply or file name that slipped into the page as markup could not
# run. Inline styles are allowed (uPlot sizes its canvas with them); the report is embedded as a sandboxed srcdoc.
POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; frame-src 'self' blob: data:; object-src 'none'; base-uri 'none'; form-action 'none'"
)
HEADERS = {"Content-Security-Policy": POLICY, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def mount(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(ASSETS / "index.html", media_type="text/html", headers=HEADERS)

    app.mount("/dashboard", StaticFiles(directory=ASSETS), name="dashboard")
