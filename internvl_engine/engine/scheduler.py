"""Continuous batching over `num_computed_tokens` (plain Python: no torch).

Each step hands out two budgets: tokens (`max_num_batched_tokens`, shared by decodes and prefill chunks) and
ViT tiles (`max_vit_tiles_per_step`). Tiles are independent, so an image is encoded in slices of tiles over as
many steps as the budget needs (a 41-tile image over 6 steps at 8 tiles), while every decode stream keeps
getting its token each step. Tile t of an image gives its visual tokens [t * 256, (t + 1) * 256): a prefill chunk
computes an image's tokens only up to the tiles encoded by the end of its step (the engine encodes a step's
slices before its forward), so features always exist before the first chunk that needs them. A step's chunks are, in order: running decodes, continuing prefills, then newly
admitted waiting requests, first come first served. When KV blocks run out, the most recently arrived
running request is preempted by recompute: it drops its blocks and goes back to the front of the waiting
queue (the prefix cache usually gives most of them back on readmission).

One step is `schedule()` → the engine encodes `tiles_to_encode` and runs the chunks → `update()`.
"""
from __future__ import annotations

from bisect import insort
from collections import deque
from dataclasses import dataclass
from typing import Callable, NamedTuple

from .block_manager import BlockManager
from .errors import QueueFullError
from .request import FinishReason, ImageSpan, Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # running requests at once
    max_num_batched_tokens: int = 8192  # tokens computed per step, decodes and prefill chunks together
    # ViT tiles encoded per step. InternViT-6B costs ~15 ms per tile on one H100 (the 615 ms floor of 41 tiles),
    # a V1.5 decode step ~15-25 ms: 8 tiles add ≤ 120 ms to the steps that encode, the longest gap a decode
    # stream sees, while a 4K image's 41 tiles take 6 steps (≈ 6 decode steps more than one 615 ms pass), which
    # keeps its TTFT within 1.4 s; 2-4 tiles would smooth the streams more but add 10-20 steps to that TTFT.
    max_vit_tiles_per_step: int = 8
    max_model_len: int = 16384  # prompt + max_tokens
    max_waiting: int = 1024  # admission limit: add_request raises QueueFullError beyond it
    block_size: int = 16
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_vit_tiles_per_step", "max_model_len",
                     "max_waiting", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            # Without chunking a prompt is computed in one step: a longer one could never be scheduled.
            raise ValueError(f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) must"
                             f" be at least max_model_len ({self.max_model_len})")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # Every running request takes >= 1 token of a step: past the budget, running requests would hold their KV
            # blocks and get no token (decode batches never reach max_num_seqs).
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_num_seqs "
                             f"({self.max_num_seqs}): each running request decodes one token per step")


class TileSlice(NamedTuple):
    """Encode tiles [start_tile, end_tile) of `image` (whose pixels `request` holds) this step."""

    request: Request
    image: ImageSpan
    start_tile: int
    end_tile: int

    @property
    def num_tiles(self) -> int:
        return self.end_tile - self.start_tile


class ScheduledChunk(NamedTuple):  # not a frozen dataclass: 256 are built per step, at about half the cost
    """Compute tokens [request.num_computed_tokens, + num_new_tokens) of the request this step."""

    request: Request
    num_new_tokens: int


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]  # decodes, continuing prefills, newly admitted
    # The tile slices this step's chunks need that are not encoded yet: one per image content (requests that share
    # a content share its slice), num_tiles in all.
    tiles_to_encode: list[TileSlice]
    preempted: list[Request]
    num_batched_tokens: int
    num_tiles: int

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class _StepPlan:
    """What one schedule() call has granted so far; grants can be revoked when their request is preempted."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.tokens_left = config.max_num_batched_tokens
        self.tiles_used = 0
        # request id -> (its chunk, the contents whose slices it relies on); insertion order = chunk order
        self.grants: dict[str, tuple[ScheduledChunk, tuple[str, ...]]] = {}
        self.encoding: dict[str, list] = {}  # content_hash -> [its TileSlice, how many grants rely on it]
        self.preempted: list[Request] = []

    def slice_end(self, content_hash: str) -> int | None:
        """The end tile of the slice of this content granted this step (None: none)."""
        entry = self.encoding.get(content_hash)
        return None if entry is None else entry[0].end_tile

    def grant(self, request: Request, num_new_tokens: int, slices: tuple[TileSlice, ...]) -> None:
        """slices: those this chunk relies on, new ones (their tiles count) or granted earlier this step."""
        self.grants[request.request_id] = (ScheduledChunk(request, num_new_tokens),
                                           tuple(tile_slice.image.content_hash for tile_slice in slices))
        self.tokens_left -= num_new_tokens
        for tile_slice in slices:
            entry = self.encoding.get(tile_slice.image.content_hash)
            if entry is None:
                self.encoding[tile_slice.image.content_hash] = [tile_slice, 1]
                self.tiles_used += tile_slice.num_tiles
            else:
                entry[1] += 1

    def revoke(self, request: Request) -> None:
        entry = self.grants.pop(request.request_id, None)
        if entry is None:
            return
        chunk, hashes = entry
        self.tokens_left += chunk.num_new_tokens
        for content_hash in hashes:
            slice_entry = self.encoding[content_hash]
            slice_entry[1] -= 1
            if not slice_entry[1]:  # no other grant needs this slice: its tiles come back
                del self.encoding[content_hash]
                self.tiles_used -= slice_entry[0].num_tiles

    def build(self) -> SchedulerOutput:
        chunks = [chunk for chunk, _ in self.grants.values()]
        return SchedulerOutput(chunks, [entry[0] for entry in self.encoding.values()], self.preempted,
                               sum(chunk.num_new_tokens for chunk in chunks), self.tiles_used)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 tiles_ready: Callable[[Request, ImageSpan, int], int]) -> None:
        if block_manager.block_size != config.block_size:
            raise ValueError(f"block manager block_size ({block_manager.block_size}) differs from the scheduler's"
                             f" ({config.block_size})")
        self.config = config
        self.block_manager = block_manager
        # The engine's answer: how many consecutive tiles of this image, from the given one, have features?
        self.tiles_ready = tiles_ready
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in arrival order: running[-1] is the first to be preempted
        self._requests: dict[str, Request] = {}  # unfinished requests by id
        self._arrival_ranks: dict[str, int] = {}
        self._next_rank = 0
        self.num_preemptions = 0  # since start, all requests (a metric)

    # ----- requests ----------------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, request: Request) -> None:
        num_prompt = request.num_prompt_tokens
        if num_prompt == 0:
            raise ValueError(f"request {request.request_id!r} has an empty prompt")
        if request.max_tokens < 1:
            raise ValueError(f"request {request.request_id!r}: max_tokens must be at least 1, got {request.max_tokens}")
        if num_prompt + request.max_tokens > self.config.max_model_len:
            raise ValueError(f"request {request.request_id!r}: prompt ({num_prompt} tokens) + max_tokens"
                             f" ({request.max_tokens}) exceeds max_model_len ({self.config.max_model_len})")
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        previous_end = 0
        for image in request.images:  # sorted and disjoint: chunks are cut at image starts in this order
            if image.num_tokens <= 0 or image.num_tiles <= 0 or image.offset < previous_end or image.end > num_prompt:
                raise ValueError(f"request {request.request_id!r}: bad image span {image} for a {num_prompt}-token"
                                 " prompt (spans must be non-empty, sorted, disjoint and inside the prompt)")
            previous_end = image.end
        self.block_manager.check_fits(request)
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"{len(self.waiting)} requests are waiting (max_waiting {self.config.max_waiting})")
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        self._arrival_ranks[request.request_id] = self._next_rank
        self._next_rank += 1
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        request = self._requests.get(request_id)
        if request is not None:
            self.finish(request, FinishReason.ABORT)
        return request

    def finish(self, request: Request, reason: FinishReason, error: str | None = None) -> None:
        """End a request (the engine's verb for failures such as a bad image): frees its blocks."""
        if request.is_finished:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.block_manager.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.error = error
        del self._requests[request.request_id]
        del self._arrival_ranks[request.request_id]

    # ----- one step ----------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        plan = _StepPlan(self.config)
        block_size = self.config.block_size
        prefills = []
        for request in list(self.running):  # decodes first, in arrival order; a copy: preemption edits the list
            if request.status is not RequestStatus.RUNNING:  # preempted earlier in this step
                continue
            start = request.num_computed_tokens
            if len(request.prompt_token_ids) + len(request.output_token_ids) - start > 1:
                prefills.append(request)
            elif plan.tokens_left == 0:
                break  # nothing left for prefills either
            elif start >= len(request.prompt_token_ids) and len(request.block_ids) * block_size > start:
                plan.grant(request, 1, ())  # the common case: an output token (no image) in a block it has
            else:
                self._schedule_running(request, plan)
        for request in prefills:
            if plan.tokens_left == 0:
                break
            if request.status is RequestStatus.RUNNING:
                self._schedule_running(request, plan)
        if not plan.preempted:  # blocks are short: admitting now would only preempt again next step
            self._admit_waiting(plan)
        return plan.build()

    def update(self, output: SchedulerOutput, sampled: dict[str, int], stop_token_ids: set[int]) -> list[Request]:
        """Account for a computed step; returns the requests it finished.

        A request's own `stop_token_ids` (when not None) replace the engine-wide `stop_token_ids`.
        """
        finished = []
        commit = self.block_manager.commit
        running = RequestStatus.RUNNING
        max_model_len = self.config.max_model_len
        for request, num_new_tokens in output.chunks:
            if request.status is not running:  # aborted or failed since schedule()
                continue
            request.num_computed_tokens += num_new_tokens
            commit(request)
            outputs = request.output_token_ids
            if request.num_computed_tokens < len(request.prompt_token_ids) + len(outputs):
                continue  # mid-prefill: its logits were not sampled
            token = sampled[request.request_id]
            outputs.append(token)
            stops = request.stop_token_ids if request.stop_token_ids is not None else stop_token_ids
            if token in stops:
                reason = FinishReason.STOP
            elif len(outputs) >= request.max_tokens or request.num_computed_tokens + 1 >= max_model_len:
                reason = FinishReason.LENGTH
            else:
                continue
            self.finish(request, reason)
            finished.append(request)
        return finished

    # ----- internals ---------------------------------------------------------------------------------------
    def _schedule_running(self, request: Request, plan: _StepPlan) -> None:
        start = request.num_computed_tokens
        num_new, slices = self._fit(request, start, plan)
        if num_new == 0:
            return
        # Token i lives in block i // block_size: most decode steps need no new block and skip the block manager.
        if len(request.block_ids) * self.config.block_size < start + num_new:
            while not self.block_manager.can_append(request, num_new):
                victim = self.running[-1]
                self._preempt(victim, plan)
                if victim is request:
                    return
            self.block_manager.append(request, num_new)
        plan.grant(request, num_new, slices)

    def _admit_waiting(self, plan: _StepPlan) -> None:
        # Strictly first come first served: a head that does not fit blocks the queue, so it cannot starve.
        while self.waiting and len(self.running) < self.config.max_num_seqs and plan.tokens_left > 0:
            request = self.waiting[0]
            start = self.block_manager.match_prefix(request)
            num_new, slices = self._fit(request, start, plan)
            if num_new == 0 or not self.block_manager.can_admit(request, num_new):
                return
            self.block_manager.admit(request)  # sets num_computed_tokens = start
            self.block_manager.append(request, num_new)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            insort(self.running, request, key=lambda running: self._arrival_ranks[running.request_id])
            plan.grant(request, num_new, slices)

    def _fit(self, request: Request, start: int, plan: _StepPlan) -> tuple[int, tuple[TileSlice, ...]]:
        """The chunk [start, start + n) the budgets allow and the tile slices it relies on; n = 0 to skip.

        With chunked prefill a chunk stops at the last token whose tile is encoded by the end of this step: the
        tiles it needs are granted from the ViT budget in order, and what does not fit waits for later steps.
        Without it the whole prompt is computed in one step, so every image's remaining tiles are granted at
        once (alone in the step's ViT work if they exceed the budget, rather than never).
        """
        num_prompt = len(request.prompt_token_ids)
        remaining = num_prompt + len(request.output_token_ids) - start
        num_new = min(remaining, plan.tokens_left)
        chunked = self.config.enable_chunked_prefill
        if num_new < remaining and not chunked:
            return 0, ()
        if start >= num_prompt:  # only outputs left (every decode step): no image tokens
            return num_new, ()
        end = start + num_new
        slices: list[TileSlice] = []
        own: dict[str, TileSlice] = {}  # slices this chunk adds (a content may appear twice in one prompt)
        new_tiles = 0
        for image in request.images_in(start, end):
            total = image.num_tiles
            per_tile = image.num_tokens // total
            # Tiles before `first` are in the KV cache already (a prefix hit mid-image). Without chunking every
            # image is encoded whole: a content twice in one prompt then needs one slice for both.
            first = max(start - image.offset, 0) // per_tile if chunked else 0
            done = first + self.tiles_ready(request, image, first)
            if done >= total:
                continue
            need = -(-(min(end, image.end) - image.offset) // per_tile) if chunked else total  # tiles this chunk reads
            granted = own.get(image.content_hash) or (plan.encoding.get(image.content_hash) or (None,))[0]
            if granted is not None:  # a slice of this content is encoded this step (for this request or another)
                if granted.start_tile <= done < granted.end_tile:
                    slices.append(granted)
                    ready = granted.end_tile
                else:  # one slice per content and step: these tiles wait
                    ready = done
            else:
                budget = self.config.max_vit_tiles_per_step - plan.tiles_used - new_tiles
                if not chunked and plan.tiles_used == 0:  # the step's only ViT work: the prompt's images, whole
                    budget = need - done
                count = max(0, min(need - done, budget))
                if count:
                    own[image.content_hash] = TileSlice(request, image, done, done + count)
                    slices.append(own[image.content_hash])
                    new_tiles += count
                ready = done + count
            if ready < need:
                if not chunked:
                    return 0, ()
                end = image.offset + ready * per_tile
                break
        if end <= start:
            return 0, ()
        return end - start, tuple(slices)

    def _preempt(self, request: Request, plan: _StepPlan) -> None:
        """Recompute later: drop blocks and computed tokens (outputs are kept), back to the front of the queue."""
        plan.revoke(request)
        self.running.remove(request)
        self.block_manager.free(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)  # victims go latest first, so the queue front stays in arrival order
        plan.preempted.append(request)
