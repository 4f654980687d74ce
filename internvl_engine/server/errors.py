"""Errors in the OpenAI format: `{"error": {"message", "type", "param", "code"}}` with the HTTP status."""
from __future__ import annotations

from dataclasses import dataclass

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "request_too_large", 429: "rate_limit_error",
          500: "internal_server_error", 503: "service_unavailable"}


@dataclass
class APIError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def engine_error(err: BaseException) -> APIError:
    """An exception from preparing or queueing a request -> its HTTP error."""
    from ..engine.errors import PromptTooLongError, QueueFullError
    from ..preprocessing.image_io import ImageLoadError, ImageTooLargeError

    if isinstance(err, QueueFullError):
        return APIError(503, f"the server is overloaded, retry later: {err}", code="queue_full")
    if isinstance(err, ImageTooLargeError):
        return APIError(413, str(err), param="messages", code="image_too_large")
    if isinstance(err, ImageLoadError):
        return APIError(400, str(err), param="messages", code="invalid_image")
    if isinstance(err, PromptTooLongError):
        return APIError(400, str(err), param="messages", code="context_length_exceeded")
    if isinstance(err, (ValueError, TypeError)):
        return APIError(400, str(err))
    return APIError(500, f"{type(err).__name__}: {err}")
