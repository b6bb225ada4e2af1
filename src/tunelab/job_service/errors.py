"""The service's errors: the serving engine's one OpenAI-shaped `ApiError`, and the answers its routes share."""

from __future__ import annotations

from tunelab.serving.errors import ApiError

__all__ = ["ApiError", "bad_request", "not_found"]


def not_found(kind: str, object_id: str, param: str | None = None) -> ApiError:
    # The same answer for "does not exist" and "belongs to another project": ids must not leak across tenants.
    return ApiError(404, f"{kind}_not_found", f"No {kind} found with id {object_id!r}.", param)


def bad_request(code: str, message: str, param: str | None = None) -> ApiError:
    return ApiError(400, code, message, param)
