"""Errors in the OpenAI format: `{"error": {"message", "type", "param", "code"}}` with the HTTP status."""
from __future__ import annotations

from dataclasses import dataclass

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "request_too_large", 415: "invalid_request_error", 429: "rate_limit_error",
          500: "internal_server_error", 503: "service_unavailable"}


@dataclass
class APIError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    limit: str | None = None  # the work limit that refused the request (a server flag's name), for metrics

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def flag(limit: str) -> str:
    """The server flag of a limit: max_images_per_request -> --max-images-per-request."""
    return "--" + limit.replace("_", "-")


def limit_error(message: str, limit: str, param: str | None = None, status: int = 413,
                code: str = "limit_exceeded") -> APIError:
    """A request refused by a work limit: 413 (400 for malformed input limits) naming the server flag."""
    return APIError(status, f"{message} ({flag(limit)})", param=param, code=code, limit=limit)


def engine_error(err: BaseException, param: str = "messages") -> APIError:
    """An exception from preparing or queueing a request -> its HTTP error; `param`: the field holding the input."""
    from ..engine.errors import InputLimitError, PromptTooLongError, QueueFullError
    from ..preprocessing.image_io import ImageLoadError, ImageTooLargeError
    from ..preprocessing.video import VideoLoadError, VideoTooLargeError

    if isinstance(err, QueueFullError):
        return APIError(503, f"the server is overloaded, retry later: {err}", code="queue_full")
    if isinstance(err, InputLimitError):
        return limit_error(str(err).replace(f" ({err.limit})", ""), err.limit, param=param)
    if isinstance(err, ImageTooLargeError):
        return APIError(413, f"{err} ({flag(err.limit)})", param=param, code="image_too_large",
                        limit=err.limit)
    if isinstance(err, ImageLoadError):
        return APIError(400, str(err), param=param, code="invalid_image")
    if isinstance(err, VideoTooLargeError):
        message = str(err).replace(f" ({err.limit})", "")  # the flag instead of the engine option
        return APIError(413, f"{message} ({flag(err.limit)})", param=param, code="video_too_large", limit=err.limit)
    if isinstance(err, VideoLoadError):
        return APIError(400, str(err), param=param, code="invalid_video")
    if isinstance(err, PromptTooLongError):
        return APIError(400, str(err), param=param, code="context_length_exceeded", limit="max_model_len")
    if isinstance(err, (ValueError, TypeError)):
        return APIError(400, str(err))
    return APIError(500, f"{type(err).__name__}: {err}")
