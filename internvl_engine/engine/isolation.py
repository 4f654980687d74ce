"""Failure isolation for batched work: when a batch raises, find the items that fail on their own.

A step batches many requests into one ViT pass and one forward. If that raises (a bad input, an allocation
that fails only at this batch size), retrying each half, down to single items, finds the requests that cause
it; they fail alone and every other request gets its result. Retrying is safe for the engine's work: a forward
rewrites the same K/V into the same slots, and the ViT writes nothing until it returns.
"""
from __future__ import annotations

from typing import Callable, Sequence, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def run_isolating(items: Sequence[Item], run: Callable[[Sequence[Item]], dict[str, Result]]
                  ) -> tuple[dict[str, Result], list[tuple[Item, Exception]]]:
    """`run(items)`, or on an exception, `run` over each half recursively: returns the merged results of the
    batches that succeeded and each item that fails alone with its exception (2 * len(items) - 1 calls at most;
    one when nothing fails)."""
    try:
        return run(items), []
    except Exception as err:  # noqa: BLE001 - the point: any failure is narrowed down to its items
        if len(items) <= 1:
            return {}, [(item, err) for item in items]
    middle = len(items) // 2
    left, left_failed = run_isolating(items[:middle], run)
    right, right_failed = run_isolating(items[middle:], run)
    return {**left, **right}, left_failed + right_failed


def describe(err: BaseException) -> str:
    """One line for a request's error: the exception type and the first line of its message."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:500]}" if text else type(err).__name__
