"""Errors the engine raises for one request; callers (compat, server) map them to their own conventions."""
from __future__ import annotations


class PromptTooLongError(ValueError):
    """The prompt (with its image tokens) and the tokens asked for do not fit the model's context."""


class QueueFullError(RuntimeError):
    """The waiting queue holds max_waiting requests: the caller should retry later (HTTP 503)."""
