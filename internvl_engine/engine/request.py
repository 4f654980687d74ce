"""Request state shared by the scheduler, the block manager and the engine (plain Python: no torch here).

A request's token sequence is its prompt followed by its outputs; `num_computed_tokens` counts how many of
them already have K/V in the cache. Prefill, chunked prefill, decode and recompute after preemption are all
"compute the next tokens from num_computed_tokens on", so the scheduler has no prefill/decode modes.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass(frozen=True)
class ImageSpan:
    """One image's visual tokens in the prompt: tokens [offset, offset + num_tokens) are its <IMG_CONTEXT>s."""

    offset: int
    num_tokens: int  # 256 per tile
    num_tiles: int
    content_hash: str  # hash of the image bytes + tile count: the feature-cache and prefix-cache key

    @property
    def end(self) -> int:
        return self.offset + self.num_tokens


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    images: list[ImageSpan] = field(default_factory=list)
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at the last admission
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_preemptions: int = 0
    stop_token_ids: frozenset[int] | None = None  # None: the engine's (EOS and the template separator)
    # Chained content hashes of the first len(block_hashes) full blocks of all_token_ids. A full block's tokens
    # never change, so the block manager computes each hash once and keeps it across preemptions.
    block_hashes: list[bytes] = field(default_factory=list)
    num_committed_blocks: int = 0  # leading blocks of block_ids already registered in (or found in) the prefix cache
    # Tokens of left padding this prompt would have in an official padded batch (`batch_chat`): the dynamic-NTK
    # rotary base is picked from the padded length, so a row's tokens equal the official batch's.
    rope_length_offset: int = 0
    # Mixed into the first block's hash: blocks are shared only between requests with the same salt. The engine
    # sets it when a request's keys depend on more than its tokens (a scaled rotary base, see LLM._cache_salt).
    cache_salt: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_image_tiles(self) -> int:
        return sum(image.num_tiles for image in self.images)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def token_ids_in(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without concatenating the whole sequence (decode steps read one token)."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt:end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - num_prompt]

    def rope_length(self, position: int) -> int:
        """The sequence length the rotary base is picked from for the token at `position`, as the official model
        does with a fresh rotary module at every forward: the (padded) prompt length for prompt tokens, which
        are prefilled in one forward there, and the (padded) length after the token for outputs."""
        return max(position + 1, len(self.prompt_token_ids)) + self.rope_length_offset

    def images_in(self, start: int, end: int) -> list[ImageSpan]:
        """Images with at least one token in [start, end)."""
        return [image for image in self.images if image.offset < end and image.end > start]
