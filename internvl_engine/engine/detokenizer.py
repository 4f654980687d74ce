"""Output text while tokens arrive: incremental decoding, stop strings, and the deltas a stream may send.

Decoding a request's whole output after every token costs O(length) per token. `IncrementalDetokenizer`
decodes a short window instead: the tokens since the last emitted boundary, plus a few before them for
context (sentencepiece drops the leading space of a window's first piece, and multi-byte characters can span
tokens). New text is the window's decode minus the decode of its already-read part; a window ending in an
incomplete UTF-8 character (U+FFFD) waits for the next token.

`StreamText` turns the growing text into the chunks a client sees, so that their concatenation equals the
final response (which, like the official `chat`, is stripped): leading and trailing whitespace, a partial stop
string and an incomplete character are held back until the next token shows what they become.
"""
from __future__ import annotations

from typing import Sequence

from ..text.llama_tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """`update(token_ids)` with a request's whole output ids (growing) -> the text added by the new ones."""

    def __init__(self, tokenizer: Tokenizer, context_tokens: int = 4) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.context_tokens = context_tokens
        self.text = ""
        self._prefix_offset = 0  # window start: context before read_offset
        self._read_offset = 0  # tokens before this are in self.text

    def _decode(self, ids: Sequence[int]) -> str:
        # ids past the tokenizer (random-weight presets sample them) have no text
        return self.tokenizer.decode([t for t in ids if t < self.vocab_size], skip_special_tokens=True)

    def update(self, token_ids: Sequence[int]) -> str:
        if len(token_ids) <= self._read_offset:
            return ""
        read_text = self._decode(token_ids[self._prefix_offset: self._read_offset])
        window_text = self._decode(token_ids[self._prefix_offset:])
        if len(window_text) <= len(read_text) or window_text.endswith(_REPLACEMENT):
            return ""  # nothing visible yet, or a character still incomplete
        new_text = window_text[len(read_text):]
        self.text += new_text
        self._read_offset = len(token_ids)
        self._prefix_offset = max(self._read_offset - self.context_tokens, 0)
        return new_text


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index in `text` of the earliest stop string occurrence beginning at or after `start`, or -1."""
    hits = [index for index in (text.find(stop, start) for stop in stops if stop) if index >= 0]
    return min(hits) if hits else -1


def truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` cut before its first stop string (the stop string is not part of the output), and whether it was."""
    index = find_stop(text, stops)
    return (text, False) if index < 0 else (text[:index], True)


def _partial_stop_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


class StreamText:
    """Chunks to stream for a growing text: `delta(text, finished)`; finished text is the final response."""

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self.sent = ""

    def delta(self, text: str, finished: bool) -> str:
        visible = text.lstrip()
        if not finished:
            visible, _ = truncate_at_stop(visible, self.stops)
            visible = visible[: len(visible) - _partial_stop_length(visible, self.stops)]
            visible = visible.rstrip(_REPLACEMENT).rstrip()
        if not visible.startswith(self.sent):
            return ""  # the final decode differs from what the window saw: never resend or retract
        delta, self.sent = visible[len(self.sent):], visible
        return delta
