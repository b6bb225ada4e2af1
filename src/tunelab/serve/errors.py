"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with OpenAI's status codes.

The official clients turn these into their typed exceptions (404 -> NotFoundError, 400 -> BadRequestError), so
every failure, including FastAPI's own validation and routing errors, goes through here.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tunelab.serve.schemas import ErrorDetail, ErrorResponse

log = logging.getLogger("tunelab.serve")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)


def model_not_found(model: str) -> APIError:
    message = f"The model `{model}` does not exist or you do not have access to it."
    return APIError(404, message, param="model", code="model_not_found")


def context_too_long(limit: int, prompt_tokens: int, max_tokens: int, param: str) -> APIError:
    message = (
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {param}, {max_tokens} in the completion). "
        f"Please reduce the length of the {param} or completion."
    )
    return APIError(400, message, param=param, code="context_length_exceeded")


def error_json(detail: ErrorDetail) -> str:
    return ErrorResponse(error=detail).model_dump_json()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _server_error)


def _response(status: int, detail: ErrorDetail) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=detail).model_dump(), status_code=status)


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return _response(exc.status, exc.detail)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    # OpenAI answers a bad parameter with 400 (FastAPI's default is 422) and names the first one.
    return _response(400, validation_detail(exc.errors()[0]))


def validation_detail(error: Any) -> ErrorDetail:
    loc = [part for part in error.get("loc", ()) if part != "body"]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    kind = error.get("type", "")
    if kind == "json_invalid":
        message = "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload."
        return ErrorDetail(message=message, type="invalid_request_error")
    if kind == "missing":
        message = f"Missing required parameter: '{param}'."
        return ErrorDetail(
            message=message, type="invalid_request_error", param=param, code="missing_required_parameter"
        )
    if kind == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
        return ErrorDetail(message=message, type="invalid_request_error", param=param, code="unknown_parameter")
    message = f"Invalid value for '{param}': {error.get('msg', 'invalid')} (got {error.get('input')!r})."
    return ErrorDetail(message=message, type="invalid_request_error", param=param, code="invalid_value")


async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return _response(exc.status_code, ErrorDetail(message=str(exc.detail), type=kind))


async def _server_error(_: Request, exc: Exception) -> JSONResponse:
    log.exception("request failed", exc_info=exc)
    return _response(500, server_error_detail())


def server_error_detail() -> ErrorDetail:
    return ErrorDetail(message="The server had an error while processing your request.", type="server_error")
