"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with OpenAI's status codes.

Both servers install these handlers, so every failure, including FastAPI's own validation and routing errors,
reaches the client in the one shape the official clients turn into their typed exceptions (404 -> NotFoundError,
400 -> BadRequestError).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunelab.serving.schemas import UNSUPPORTED, ErrorDetail, ErrorResponse

log = logging.getLogger("tunelab.serving")
# The names pydantic gives the members of a union in an error's location (`n_epochs.literal['auto']`,
# `seed.int`): they are no parameter of the request, so the param names the field alone.
_UNION_TAG = re.compile(r"[a-z-]+\[.*\]|int|float|str|bool|none|constrained-\w+|json-or-python|\[key\]")


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, param: str | None = None, type_: str = "invalid_request_error"
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type_, param=param, code=code)

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=self.detail).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def model_not_found(model: str) -> ApiError:
    message = f"The model `{model}` does not exist or you do not have access to it."
    return ApiError(404, "model_not_found", message, "model")


def context_too_long(limit: int, prompt_tokens: int, max_tokens: int, param: str) -> ApiError:
    message = (
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {param}, {max_tokens} in the completion). "
        f"Please reduce the length of the {param} or completion."
    )
    return ApiError(400, "context_length_exceeded", message, param)


def server_error() -> ApiError:
    return ApiError(
        500, "internal_error", "The server had an error while processing your request.", None, "server_error"
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _server_error)


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    # OpenAI answers a bad parameter with 400 (FastAPI's default is 422) and names the first one.
    return validation_error(exc.errors()[0]).response()


def validation_error(error: Any) -> ApiError:
    loc = [part for part in error.get("loc", ()) if part not in ("body", "query", "path", "header")]
    loc = [part for part in loc if not (isinstance(part, str) and _UNION_TAG.fullmatch(part))]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    kind = error.get("type", "")
    if kind == "json_invalid":
        message = "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload."
        return ApiError(400, "invalid_json", message)
    if kind == "missing":
        return ApiError(400, "missing_required_parameter", f"Missing required parameter: '{param}'.", param)
    if kind == "extra_forbidden":
        return ApiError(400, "unknown_parameter", f"Unrecognized request argument supplied: {param}", param)
    if kind == UNSUPPORTED:
        return ApiError(400, UNSUPPORTED, f"Unsupported value for '{param}': {error.get('msg')}", param)
    message = f"Invalid value for '{param}': {error.get('msg', 'invalid')} (got {error.get('input')!r})."
    return ApiError(400, "invalid_value", message, param)


async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    # FastAPI's only 400 is a body it could not parse at all (too deep for json, say): the same answer as bad JSON.
    code = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return ApiError(exc.status_code, code, str(exc.detail), None, kind).response()


class CatchAll:
    """An unexpected exception answered as OpenAI's 500, inside the app. Starlette's own last-resort handler sends
    the same answer but then re-raises, and the server closes the keep-alive connection; here the exception ends
    with its response. Installed innermost (add_middleware before any other), so the other middlewares still see
    a response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            if started:  # part of a response is out already: only closing the connection can tell the client
                raise
            await server_error().response()(scope, receive, send)


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return server_error().response()
