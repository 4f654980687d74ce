"""Errors the engine raises for one request; callers (compat, server) map them to their own conventions."""
from __future__ import annotations


class PromptTooLongError(ValueError):
    """The prompt (with its image tokens) and the tokens asked for do not fit the model's context."""


class QueueFullError(RuntimeError):
    """The waiting queue holds max_waiting requests: the caller should retry later (HTTP 503)."""


class InputLimitError(ValueError):
    """A request exceeds a work limit (images per request, prompt characters, preprocessing time): HTTP 413.

    `limit` names the limit (the engine option or server flag) for messages and metrics."""

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit
