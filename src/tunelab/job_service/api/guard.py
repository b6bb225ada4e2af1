"""What no route may receive, checked once for all of them before any route runs: NUL bytes and lone surrogates
in any string (PostgreSQL refuses the first, SQLite's and torch's UTF-8 encoders the second, both as a 500 deep
inside), integers past what a 64-bit column holds, NaN and infinities, JSON nested deeper than any request needs,
and JSON bodies past a size no request of this API needs. Each refusal is a 400 (413 for size) naming the field."""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import Request

from tunelab.job_service.errors import ApiError, bad_request

MAX_JSON_BYTES = 2**20  # the largest request (a chat with its history, a job with its spec) is far smaller
MAX_STRING = 2**16  # characters in any one string of a request
MAX_ITEMS = 1000  # items in any one list or object
MAX_DEPTH = 16  # the job request nests 6 deep (tunelab.spec.train...), chat content parts 5
MAX_INT = 2**53  # exact in every JSON client; per-field bounds (schemas, JobSpec) are far lower still


async def check_request(request: Request) -> None:
    """An app-wide dependency: FastAPI solves it before the route's own parameters and body."""
    for name, value in request.path_params.items():
        _check_text(value, name)
    for name, value in request.query_params.multi_items():
        _check_text(name, name)
        _check_text(value, name)
    if request.method in ("POST", "PUT", "PATCH") and _is_json(request):
        _check_json_body(await request.body())


def _is_json(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"


def _check_json_body(raw: bytes) -> None:
    if len(raw) > MAX_JSON_BYTES:
        raise ApiError(413, "request_too_large", f"The request body is larger than {MAX_JSON_BYTES:,} bytes.")
    try:
        value = json.loads(raw)
    except RecursionError:
        raise bad_request("invalid_value", f"The body is nested more than {MAX_DEPTH} levels deep.") from None
    except ValueError:
        return  # FastAPI's own parse reports it as invalid_json
    check_value(value, "")


def check_value(value: Any, param: str, depth: int = 0) -> None:
    """Raise a 400 naming `param` (dotted, with [i] for list items) for the first hostile value inside `value`."""
    if depth > MAX_DEPTH:
        raise bad_request("invalid_value", f"'{param or 'body'}' is nested more than {MAX_DEPTH} levels deep.", param)
    if isinstance(value, str):
        _check_text(value, param)
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        if abs(value) > MAX_INT:
            raise bad_request("invalid_value", f"'{param}' is out of range (at most {MAX_INT} in size).", param)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise bad_request("invalid_value", f"'{param}' must be a finite number, not {value}.", param)
    elif isinstance(value, list):
        _check_size(value, param)
        for i, item in enumerate(value):
            check_value(item, f"{param}[{i}]", depth + 1)
    elif isinstance(value, dict):
        _check_size(value, param)
        for key, item in value.items():
            name = f"{param}.{key}" if param else str(key)
            _check_text(str(key), name)
            check_value(item, name, depth + 1)


def _check_size(value: list[Any] | dict[str, Any], param: str) -> None:
    if len(value) > MAX_ITEMS:
        raise bad_request("invalid_value", f"'{param}' has {len(value):,} items; the limit is {MAX_ITEMS:,}.", param)


def _check_text(text: str, param: str) -> None:
    shown = _printable(param)
    if len(text) > MAX_STRING:
        raise bad_request("string_too_long", f"'{shown}' is {len(text):,} characters; the limit is {MAX_STRING:,}.",
                          shown)  # fmt: skip
    if "\x00" in text:
        raise bad_request("invalid_value", f"'{shown}' contains a NUL character (\\u0000).", shown)
    if has_lone_surrogate(text):
        raise bad_request("invalid_value", f"'{shown}' contains a lone UTF-16 surrogate: it is not valid Unicode.",
                          shown)  # fmt: skip


def has_lone_surrogate(text: str) -> bool:
    """JSON's \\ud800 escapes decode to code points no UTF-8 encoder accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _printable(param: str) -> str:
    # The param goes back in the error: it must not carry the very characters it refuses, nor be huge.
    return param.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace").replace("\x00", "\\x00")[:200]
