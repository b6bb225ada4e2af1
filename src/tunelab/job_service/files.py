"""Uploaded files: saved under their id (the user's name is only metadata), size-limited, validated off the
request path with tunelab's OpenAI-style data checks; deleted only when no unfinished job uses them."""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tunelab.data.preference import check_pairs_file, looks_like_pairs
from tunelab.data.readers import iter_jsonl
from tunelab.data.validate import validate_chat_file
from tunelab.errors import Problem
from tunelab.job_service.artefacts import Artefacts
from tunelab.job_service.db import FileRow
from tunelab.job_service.errors import ApiError, bad_request, not_found
from tunelab.job_service.ids import new_id, now
from tunelab.job_service.jobs import advance_validating
from tunelab.job_service.settings import ServiceSettings
from tunelab.job_service.store import Page, Store

log = logging.getLogger("tunelab.job_service.files")
_UNSAFE = re.compile(r"[^\w. -]+")  # letters of any script stay; controls, slashes and quotes go
_LINE = re.compile(r":(\d+)")
CHUNK = 2**20
PURPOSE = "fine-tune"  # the only purpose this service has a use for


@dataclass(frozen=True)
class FileCheck:
    ok: bool
    n_examples: int
    problems: list[dict[str, Any]]
    details: str


def sanitise_filename(name: str | None) -> str:
    """A display name without paths, control characters or shell-hostile characters (it is never a path here)."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = unicodedata.normalize("NFKC", base)
    base = _UNSAFE.sub("_", base).strip(" .")
    return base[:200] or "upload.jsonl"


def get_file(store: Store, project_id: str, file_id: str) -> FileRow:
    row = store.files.get(project_id, file_id)
    if row is None:
        raise not_found("file", file_id)
    return row


def list_files(
    store: Store, project_id: str, purpose: str | None, ascending: bool, after: str | None, limit: int
) -> Page[FileRow]:
    return store.files.page(project_id, purpose, ascending, after, limit)


def delete_file(settings: ServiceSettings, store: Store, project_id: str, file_id: str) -> None:
    """Mark the file deleted and remove its content, unless a job that has not ended trains on it."""
    get_file(store, project_id, file_id)  # another project's file is a 404, not a "file in use"
    if store.files.in_use(file_id):
        raise bad_request("file_in_use", f"File {file_id} is used by an active fine-tuning job.", "file_id")
    row = store.files.delete(project_id, file_id)
    if row is None:  # deleted by a concurrent request since the lookup
        raise not_found("file", file_id)
    Artefacts.of(settings).remove(Path(row.path))


def validate_uploaded(settings: ServiceSettings, store: Store, rows: Iterable[FileRow]) -> None:
    """Validate the files, then move on the jobs that were waiting for them."""
    for row in rows:
        try:
            validate_stored_file(Artefacts.of(settings), store, row, settings.max_line_bytes)
        except Exception:  # the store itself failed: log it, and let the next file (and restart) try again
            log.exception("validating %s", row.id)
    advance_validating(settings, store)


def save_upload(
    settings: ServiceSettings, store: Store, project_id: str, stream: BinaryIO, filename: str | None, purpose: str
) -> FileRow:
    """Copy the upload to the artefact folder, refusing it past the size limit, and record it as `uploaded`."""
    if purpose != PURPOSE:
        raise bad_request("invalid_purpose", f"purpose {purpose!r} is not supported here: use {PURPOSE!r}.", "purpose")
    file_id = new_id("file")
    settings.files_dir.mkdir(parents=True, exist_ok=True)
    # Stored by id, never by the user's name; the extension tells tunelab's readers the format.
    target = settings.files_dir / f"{file_id}.jsonl"
    size = _copy_limited(stream, target, settings.max_file_bytes)
    Artefacts.of(settings).push(target)  # before the row exists: a job can only name a file every node can read
    row = FileRow(
        id=file_id,
        project_id=project_id,
        filename=sanitise_filename(filename),
        purpose=purpose,
        bytes=size,
        created_at=now(),
        status="uploaded",
        path=str(target),
        deleted=False,
    )
    return store.files.add(row)


def _copy_limited(stream: BinaryIO, target: Path, limit: int) -> int:
    size = 0
    with target.open("wb") as out:
        while chunk := stream.read(CHUNK):
            size += len(chunk)
            if size > limit:
                out.close()
                target.unlink()
                raise ApiError(413, "file_too_large", f"The file is larger than the limit of {limit:,} bytes.", "file")
            out.write(chunk)
    return size


def check_file(path: Path, max_line_bytes: int) -> FileCheck:
    """Every problem in a chat JSONL file, each with its line; the example count decides usability in a job."""
    huge = _huge_lines(path, max_line_bytes)
    if huge:
        # Reported alone: parsing lines of hundreds of megabytes would cost the API process more than it tells.
        return _result(0, huge)
    if _first_row_is_pair(path):
        return _result(*check_pairs_file(path))
    report = validate_chat_file(path, min_examples=1)
    errors = [p for p in report.errors if p.code != "too_few_examples"]  # the job checks the count it needs
    return _result(len(report.examples), errors)


def _first_row_is_pair(path: Path) -> bool:
    """A file is a DPO file when its first readable row is a preference pair (OpenAI's DPO format or TRL's)."""
    first = next((r for r in iter_jsonl(path) if not isinstance(r, Problem)), None)
    return first is not None and isinstance(first.data, dict) and looks_like_pairs(first.data)


def validate_stored_file(artefacts: Artefacts, store: Store, row: FileRow, max_line_bytes: int) -> FileCheck:
    try:
        check = check_file(artefacts.local(Path(row.path)), max_line_bytes)
    except Exception as exc:  # any crash of a check is this file's error, never an endless `uploaded`
        log.exception("validating %s", row.id)
        check = _result(0, [_crash_problem(Path(row.path), exc)])
    status = "processed" if check.ok else "error"
    store.files.finish_validation(row.id, status, check.details, check.problems, check.n_examples)
    return check


def _crash_problem(path: Path, exc: Exception) -> Problem:
    # The line is the one being read when it failed, when the traceback says so; the file otherwise.
    line = _failing_line(exc)
    where = f"{path.name}:{line}" if line else path.name
    return Problem(where, f"the file could not be validated ({type(exc).__name__})", "check the file's rows",
                   "validation_failed")  # fmt: skip


def _failing_line(exc: BaseException) -> int | None:
    tb = exc.__traceback__
    while tb is not None:
        number = tb.tb_frame.f_locals.get("number")
        if isinstance(number, int):
            return number
        tb = tb.tb_next
    return None


def _huge_lines(path: Path, limit: int) -> list[Problem]:
    found = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if len(raw) > limit:
                found.append(
                    Problem(
                        f"{path.name}:{number}",
                        f"line is {len(raw):,} bytes; the limit is {limit:,}",
                        "split or shorten the example",
                        "line_too_long",
                    )
                )
    return found


def _result(n_examples: int, problems: list[Problem]) -> FileCheck:
    rows = [_problem_dict(p) for p in problems]
    if not rows:
        return FileCheck(True, n_examples, [], f"{n_examples} valid examples")
    return FileCheck(False, n_examples, rows, describe(rows))


def _problem_dict(problem: Problem) -> dict[str, Any]:
    match = _LINE.search(problem.where)
    return {
        "code": problem.code or "invalid_file_format",
        "line": int(match.group(1)) if match else None,
        "where": problem.where,
        "message": storable(problem.message),
        "hint": storable(problem.hint) if problem.hint else problem.hint,
    }


def storable(text: str) -> str:
    """A message may quote the file: PostgreSQL's text refuses NUL, and no database's UTF-8 a lone surrogate."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def describe(problems: list[dict[str, Any]], shown: int = 5) -> str:
    """'line 3: [invalid_json] invalid JSON: ...; line 7: [unknown_role] ...' and how many more."""
    parts = []
    for p in problems[:shown]:
        where = f"line {p['line']}: " if p.get("line") else ""
        hint = f" (hint: {p['hint']})" if p.get("hint") else ""
        parts.append(f"{where}[{p['code']}] {p['message']}{hint}")
    more = f"; and {len(problems) - shown} more problem(s)" if len(problems) > shown else ""
    return "; ".join(parts) + more
