"""`AsyncLLM`: the engine behind an asyncio front, streaming each request's outputs as they are produced.

Only the engine's own thread touches the scheduler. A request is prepared (validated, tokenised, tiled) in a
bounded preprocessing pool of its own (`PreprocessConfig`: workers, a cap on pending requests, a time limit
per request), so a 4K image never blocks the event loop and a burst of heavy images never delays an engine
step; it is then handed to the engine thread through an inbox. `add_request` returns once the engine has
queued it, or raises what the scheduler said (queue full, too large). One background task runs engine steps
on the engine's own thread (the forward releases the GIL) while requests exist; each step first takes in new requests and aborts, then every step's new tokens are pushed to
the queue of the request that got them. `abort(request_id)`, or a stream that its consumer leaves early (a
client that disconnects), removes the request and frees its KV blocks at the next step.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Mapping

from .errors import InputLimitError, QueueFullError
from .llm import LLM, PreparedRequest
from .outputs import RequestOutput
from .request import FinishReason
from .sampling_params import SamplingParams


@dataclass
class _StepResult:
    admitted: list[tuple[asyncio.Future, BaseException | None]] = field(default_factory=list)
    partial: list[RequestOutput] = field(default_factory=list)
    finished: list[RequestOutput] = field(default_factory=list)
    computed: bool = False


@dataclass(frozen=True)
class PreprocessConfig:
    """The preprocessing pool (image decoding, tiling, tokenisation), separate from the engine's thread."""

    workers: int = 2
    max_pending: int = 64  # requests queued for or in preprocessing; beyond it add_request raises QueueFullError
    timeout_s: float | None = 60.0  # per request, queueing included: InputLimitError past it

    def __post_init__(self) -> None:
        if self.workers < 1 or self.max_pending < 1:
            raise ValueError(f"preprocess workers and max_pending must be positive, got {self}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"preprocess timeout_s must be positive or None, got {self.timeout_s!r}")


class AsyncLLM:
    def __init__(self, llm: LLM, preprocess: PreprocessConfig | None = None) -> None:
        self.llm = llm
        self.preprocess_config = preprocess or PreprocessConfig()
        self._preprocess_pool = concurrent.futures.ThreadPoolExecutor(
            self.preprocess_config.workers, thread_name_prefix="internvl-preprocess")
        self._engine_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="internvl-engine")
        self._pending_lock = threading.Lock()
        self._num_preprocessing = 0  # submitted to the pool and not done (queued or running)
        self._inbox_lock = threading.Lock()
        self._new: list[tuple[PreparedRequest, asyncio.Future]] = []
        self._aborts: list[str] = []
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}  # until its consumer is done with it
        self._unfinished: set[str] = set()  # queued and not finished or aborted yet
        self._runner: asyncio.Task | None = None
        self.num_step_errors = 0

    @classmethod
    def from_pretrained(cls, model_path: Any, **kwargs: Any) -> "AsyncLLM":
        return cls(LLM(model_path, **kwargs))

    # ---- requests in ----
    async def prepare(self, request: Mapping[str, Any] | str, sampling_params: SamplingParams | None = None,
                      request_id: str | None = None,
                      resolve: Callable[[Any], Mapping[str, Any] | str] | None = None) -> PreparedRequest:
        """`LLM.prepare` in the preprocessing pool (after `resolve(request)`, e.g. fetching image URLs, there too),
        within the time limit. Raises QueueFullError when max_pending requests are already preprocessing."""
        config = self.preprocess_config
        with self._pending_lock:
            if self._num_preprocessing >= config.max_pending:
                raise QueueFullError(f"{self._num_preprocessing} requests are already being preprocessed "
                                     f"(limit {config.max_pending})")
            self._num_preprocessing += 1
        deadline = None if config.timeout_s is None else time.monotonic() + config.timeout_s
        queued_at = time.perf_counter()

        def work() -> PreparedRequest:
            started = time.perf_counter()
            inputs = resolve(request) if resolve is not None else request
            resolved = time.perf_counter()
            prepared = self.llm.prepare(inputs, sampling_params, request_id, deadline=deadline)
            tracer = self.llm.tracer
            if tracer.enabled:  # the pool's share of the request's lane: waiting for a worker, fetching media
                tracer.span(prepared.request_id, "preprocess queue", queued_at, started)
                if resolve is not None:
                    tracer.span(prepared.request_id, "resolve", started, resolved)
            return prepared

        try:
            future = self._preprocess_pool.submit(work)
        except BaseException:
            self._preprocess_done(None)
            raise
        future.add_done_callback(self._preprocess_done)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), config.timeout_s)
        except asyncio.TimeoutError:
            future.cancel()  # dropped if still queued; a running one stops at its next deadline check
            raise InputLimitError(f"preprocessing the request took longer than the limit of {config.timeout_s:g} s",
                                  "preprocess_timeout_s") from None

    def _preprocess_done(self, _: Any) -> None:
        with self._pending_lock:
            self._num_preprocessing -= 1

    async def add_request(self, request: Mapping[str, Any] | str, sampling_params: SamplingParams | None = None,
                          request_id: str | None = None,
                          resolve: Callable[[Any], Mapping[str, Any] | str] | None = None) -> str:
        """Prepare and queue one request; raises ValueError (bad input) or QueueFullError (retry later)."""
        prepared = await self.prepare(request, sampling_params, request_id, resolve)
        admitted = asyncio.get_running_loop().create_future()
        self._queues[prepared.request_id] = asyncio.Queue()
        self._unfinished.add(prepared.request_id)
        with self._inbox_lock:
            self._new.append((prepared, admitted))
        self._ensure_running()
        try:
            await admitted
        except BaseException:
            if admitted.cancelled() or not admitted.done():  # cancelled while waiting: it may still be queued
                self.abort(prepared.request_id)
            else:  # the engine refused it
                self._queues.pop(prepared.request_id, None)
                self._unfinished.discard(prepared.request_id)
            raise
        return prepared.request_id

    async def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """Partial outputs (finished=False) after each new token, then the final one. Leaving early aborts."""
        queue = self._queues.get(request_id)
        if queue is None:
            raise KeyError(f"no request {request_id!r} is streaming")
        finished = False
        try:
            while not finished:
                output = await queue.get()
                finished = output.finished
                yield output
        finally:
            self._queues.pop(request_id, None)
            if not finished:  # the consumer went away: stop computing for it
                self.abort(request_id)

    async def generate(self, request: Mapping[str, Any] | str, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """`add_request` + `stream`; an invalid request yields one finished output with its error."""
        try:
            request_id = await self.add_request(request, sampling_params, request_id)
        except (ValueError, OSError, RuntimeError) as err:
            yield RequestOutput(request_id or "", "", [], FinishReason.ERROR.value, error=str(err))
            return
        async for output in self.stream(request_id):
            yield output

    def abort(self, request_id: str) -> None:
        """Stop a request (idempotent); its stream ends with an "abort" output."""
        if request_id not in self._unfinished and request_id not in self._queues:
            return  # finished and delivered, or never known
        with self._inbox_lock:
            self._aborts.append(request_id)
        queue = self._queues.pop(request_id, None)
        if queue is not None and request_id in self._unfinished:
            queue.put_nowait(RequestOutput(request_id, "", [], FinishReason.ABORT.value))
        self._unfinished.discard(request_id)
        self._ensure_running()  # the engine thread applies it at its next step

    # ---- state, read by the server's metrics (plain reads of counters: no lock needed) ----
    @property
    def num_unfinished(self) -> int:
        return len(self._unfinished)

    @property
    def num_waiting(self) -> int:
        return self.llm.scheduler.num_waiting + len(self._new)

    @property
    def num_running(self) -> int:
        return self.llm.scheduler.num_running

    @property
    def num_preprocessing(self) -> int:
        """Requests queued for or in the preprocessing pool."""
        return self._num_preprocessing

    def shutdown(self) -> None:
        """Stop the pools (queued preprocessing is dropped); the engine must not be used afterwards."""
        self._preprocess_pool.shutdown(wait=False, cancel_futures=True)
        self._engine_thread.shutdown(wait=False, cancel_futures=True)
        self.llm.close()  # writes the trace, if any

    # ---- the engine loop ----
    def _ensure_running(self) -> None:
        if self._runner is None or self._runner.done():
            try:
                self._runner = asyncio.get_running_loop().create_task(self._run())
            except RuntimeError:  # no running loop (an abort from outside it): the next request's loop applies it
                pass

    def _step(self) -> _StepResult:
        """One engine iteration, in the engine's thread: inbox, then a step if anything is unfinished."""
        llm, result = self.llm, _StepResult()
        with self._inbox_lock:
            new, self._new = self._new, []
            aborts, self._aborts = self._aborts, []
        for prepared, admitted in new:
            try:
                llm.submit(prepared)
                result.admitted.append((admitted, None))
            except Exception as err:  # noqa: BLE001 - the caller gets it; the loop goes on
                result.admitted.append((admitted, err))
        for request_id in aborts:
            llm.abort(request_id)
        if not llm.scheduler.has_unfinished():
            return result
        try:
            result.finished = llm.step()
            result.computed = True
            done = {output.request_id for output in result.finished}
            result.partial = [llm.snapshot(rid) for rid in llm.last_step_sampled
                              if rid not in done and rid in self._queues]
        except Exception as err:  # noqa: BLE001 - the scheduler itself raised (a bug): fail what is in flight
            self.num_step_errors += 1
            traceback.print_exc(file=sys.stderr)
            result.finished += llm.fail_all(f"engine step failed: {type(err).__name__}: {err}")
            result.partial = []
        return result

    async def _run(self) -> None:
        while self._unfinished or self._new or self._aborts:
            result = await asyncio.get_running_loop().run_in_executor(self._engine_thread, self._step)
            for admitted, error in result.admitted:
                if admitted.done():  # its caller was cancelled, and has asked to abort it
                    continue
                if error is None:
                    admitted.set_result(None)
                else:
                    admitted.set_exception(error)
            for output in result.partial:
                queue = self._queues.get(output.request_id) if output.request_id in self._unfinished else None
                if queue is not None:
                    queue.put_nowait(output)
            for output in result.finished:
                self._unfinished.discard(output.request_id)
                queue = self._queues.get(output.request_id)  # the consumer may not be reading yet
                if queue is not None:
                    queue.put_nowait(output)
            if not result.computed:
                await asyncio.sleep(0.001)  # nothing schedulable this round: do not spin
