"""`AsyncLLM`: the engine behind an asyncio front, streaming each request's outputs as they are produced.

One background task runs engine steps in a worker thread (the forward releases the GIL) while requests
exist; every step's new tokens are pushed to the queue of the request that got them. `abort(request_id)`, or
an `async for` loop that stops early (a client that disconnects), removes the request and frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any, AsyncIterator, Mapping

from .engine import LLM, RequestOutput
from .request import FinishReason
from .sampling_params import SamplingParams


class AsyncLLM:
    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self._lock = threading.Lock()  # the scheduler is plain Python: one thread touches it at a time
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._runner: asyncio.Task | None = None

    @classmethod
    def from_pretrained(cls, model_path: Any, **kwargs: Any) -> "AsyncLLM":
        return cls(LLM(model_path, **kwargs))

    async def generate(self, request: Mapping[str, Any] | str, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields partial outputs (finished=False) after each new token, then the final one."""
        with self._lock:
            handle = self.llm.add_request(request, sampling_params, request_id)
        if isinstance(handle, RequestOutput):
            yield handle
            return
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[handle] = queue
        self._ensure_running()
        finished = False
        try:
            while not finished:
                output = await queue.get()
                finished = output.finished
                yield output
        finally:
            if not finished:  # the consumer went away: stop computing for it
                self.abort(handle)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.llm.abort(request_id)
        queue = self._queues.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(RequestOutput(request_id, "", [], FinishReason.ABORT.value))

    @property
    def num_unfinished(self) -> int:
        return len(self._queues)

    def _ensure_running(self) -> None:
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run())

    def _step(self) -> tuple[list[RequestOutput], list[RequestOutput]]:
        with self._lock:
            finished = self.llm.step()
            partial = [self.llm.snapshot(rid) for rid in self.llm.last_step_sampled
                       if rid in self._queues and all(rid != f.request_id for f in finished)]
        return finished, partial

    async def _run(self) -> None:
        while self._queues:
            finished, partial = await asyncio.to_thread(self._step)
            if not finished and not partial and not self.llm.scheduler.has_unfinished():
                break  # nothing left to compute (every queued request was aborted)
            for output in partial:
                queue = self._queues.get(output.request_id)
                if queue is not None:
                    queue.put_nowait(output)
            for output in finished:
                queue = self._queues.pop(output.request_id, None)
                if queue is not None:
                    queue.put_nowait(output)
