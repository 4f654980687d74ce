"""Request and step traces in the Chrome trace event format (open the files in ui.perfetto.dev or chrome://tracing).

One process, one lane (tid) per request and lane 0 for the engine's steps:
- a request's lane: "preprocess queue" and "resolve" (AsyncLLM), "preprocess" (tokenise and tile), "queued" (from
  submit, or a preemption, to being scheduled), "vit" (one per tile slice, args tiles a-b of how many), "prefill"
  (one per chunk, args token range), "decode" (one short slice per output token, the step's forward and sampling),
  instants "first token", "preempted" and "finish" (args reason, output tokens, error);
- the engine lane: "step" (args chunks, tokens, tiles, running, waiting) enclosing "schedule", "vit", "forward",
  "sample" and "update"; counters "requests" (running, waiting) and "kv blocks" (free).

Bounded: events go to a ring of `max_events` (the oldest are dropped, and the count of dropped events is written
as an instant); a background thread flushes it every `flush_interval_s`, and on `close()` and at exit. The current
file holds at most `max_file_bytes`; then it is rotated as logging's RotatingFileHandler does (trace.json ->
trace.1.json -> ... -> trace.{max_files - 1}.json, older ones deleted). Each file is written whole to a temporary
name and renamed, so every file on disk is valid JSON ({"traceEvents": [...]}) whenever the process is killed.

Off by default: `Tracer(None)` records nothing, and the engine checks `tracer.enabled` before building any event.
Plain Python (no torch): times are `time.perf_counter()` seconds, as the engine's metrics are.
"""
from __future__ import annotations

import atexit
import json
import os
import threading
import time
import weakref
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, Mapping

ENGINE_LANE = 0
_MAX_LANES = 1 << 16  # live request lanes remembered (refused requests never release theirs)


class _Lane:
    __slots__ = ("tid", "name", "waiting_since")

    def __init__(self, tid: int, name: str) -> None:
        self.tid = tid
        self.name = name
        self.waiting_since: float | None = None  # submitted or preempted, not yet scheduled


class Tracer:
    """Records trace events into a bounded ring and writes them to rotating JSON files; `Tracer(None)` is off."""

    def __init__(self, path: str | os.PathLike[str] | None, max_events: int = 100_000,
                 max_file_bytes: int = 16 << 20, max_files: int = 4, flush_interval_s: float = 5.0,
                 process_name: str = "internvl-engine") -> None:
        self.enabled = path is not None
        if not self.enabled:
            return
        if max_events < 1 or max_file_bytes < 1024 or max_files < 1 or not flush_interval_s > 0:
            raise ValueError(f"trace limits must be positive (max_events {max_events}, max_file_bytes "
                             f"{max_file_bytes} >= 1024, max_files {max_files}, flush_interval_s {flush_interval_s})")
        self.path = Path(path).expanduser().resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_file_bytes = max_file_bytes
        self.max_files = max_files
        self.flush_interval_s = flush_interval_s
        self.process_name = process_name
        self.pid = os.getpid()
        self.num_dropped = 0
        self._origin = time.perf_counter()
        self._ring: deque[tuple] = deque(maxlen=max_events)
        self._lanes: OrderedDict[str, _Lane] = OrderedDict()
        self._next_tid = ENGINE_LANE + 1
        self._lock = threading.Lock()  # the ring and lanes: requests are prepared in other threads
        self._write_lock = threading.Lock()  # one flush at a time
        self._file_lines: list[str] = []
        self._file_bytes = 0
        self._file_tids: set[int] = set()
        self._retired: OrderedDict[int, str] = OrderedDict()  # names of finished lanes whose events may be unwritten
        self._closed = False
        if self.path.exists():  # a previous run's trace is kept as the first rotated file, not overwritten
            self._rotate()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=_flush_loop, args=(weakref.ref(self), self._wake, flush_interval_s),
                                        name="internvl-trace", daemon=True)
        self._thread.start()
        atexit.register(_close_at_exit, weakref.ref(self))

    # ---- recording (any thread; cheap: a tuple into the ring) ----
    def lane(self, request_id: str) -> int:
        """The tid of a request's lane, created on first use."""
        with self._lock:
            return self._lane(request_id).tid

    def _lane(self, request_id: str) -> _Lane:
        lane = self._lanes.get(request_id)
        if lane is None:
            lane = self._lanes[request_id] = _Lane(self._next_tid, f"request {request_id}")
            self._next_tid += 1
            if len(self._lanes) > _MAX_LANES:
                self._lanes.popitem(last=False)
        return lane

    def _append(self, event: tuple) -> None:
        ring = self._ring
        if len(ring) == ring.maxlen:
            self.num_dropped += 1
        ring.append(event)

    def span(self, request_id: str | None, name: str, start: float, end: float,
             args: Mapping[str, Any] | None = None) -> None:
        """A slice [start, end] (perf_counter seconds) in a request's lane, or the engine's (request_id None)."""
        if not self.enabled:
            return
        with self._lock:
            tid = ENGINE_LANE if request_id is None else self._lane(request_id).tid
            self._append(("X", tid, name, start, end - start, args))

    def instant(self, request_id: str | None, name: str, at: float, args: Mapping[str, Any] | None = None) -> None:
        if not self.enabled:
            return
        with self._lock:
            tid = ENGINE_LANE if request_id is None else self._lane(request_id).tid
            self._append(("i", tid, name, at, 0.0, args))

    def counter(self, name: str, at: float, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._append(("C", ENGINE_LANE, name, at, 0.0, dict(values)))

    def waiting(self, request_id: str, since: float) -> None:
        """The request waits for the scheduler from `since` (submitted, or preempted): "queued" when scheduled."""
        if not self.enabled:
            return
        with self._lock:
            self._lane(request_id).waiting_since = since

    def scheduled(self, request_id: str, at: float) -> None:
        """The request got work this step: closes its "queued" slice if it was waiting."""
        if not self.enabled:
            return
        with self._lock:
            lane = self._lanes.get(request_id)
            if lane is not None and lane.waiting_since is not None:
                self._append(("X", lane.tid, "queued", lane.waiting_since, at - lane.waiting_since, None))
                lane.waiting_since = None

    def finished(self, request_id: str, at: float, args: Mapping[str, Any]) -> None:
        """A "finish" instant, and the request's lane is released (its tid is never reused)."""
        if not self.enabled:
            return
        with self._lock:
            lane = self._lanes.get(request_id)
            if lane is None:
                return
            self._append(("i", lane.tid, "finish", at, 0.0, args))
            self._lanes.pop(request_id)
            self._retired[lane.tid] = lane.name
            if len(self._retired) > _MAX_LANES:
                self._retired.popitem(last=False)

    # ---- writing (the flush thread, close, exit) ----
    def flush(self) -> None:
        """Write the events recorded so far (the current file is rewritten whole, then renamed into place)."""
        if not self.enabled:
            return
        with self._write_lock:
            with self._lock:
                events = list(self._ring)
                self._ring.clear()
                dropped, self.num_dropped = self.num_dropped, 0
                names = {lane.tid: lane.name for lane in self._lanes.values()}
                names.update(self._retired)
            if not events and not dropped and self._file_lines:
                return
            if dropped:
                at = events[0][3] if events else time.perf_counter()
                events.insert(0, ("i", ENGINE_LANE, "trace events dropped", at, 0.0, {"count": dropped}))
            for event in events:
                line = self._encode(event)
                if self._file_lines and self._file_bytes + len(line) > self.max_file_bytes:
                    self._write(names)
                    self._rotate()
                    self._file_lines, self._file_bytes, self._file_tids = [], 0, set()
                self._file_lines.append(line)
                self._file_bytes += len(line) + 2
                self._file_tids.add(event[1])
            self._write(names)

    def close(self) -> None:
        """Flush and stop the flush thread (idempotent); later events are dropped."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        self._wake.set()
        self.flush()
        self.enabled = False

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing to report to
            pass

    def _encode(self, event: tuple) -> str:
        phase, tid, name, start, duration, args = event
        record: dict[str, Any] = {"name": name, "ph": phase, "pid": self.pid, "tid": tid,
                                  "ts": round((start - self._origin) * 1e6, 3)}
        if phase == "X":
            record["dur"] = round(max(duration, 0.0) * 1e6, 3)
        elif phase == "i":
            record["s"] = "t"
        if args:
            record["args"] = args
        return json.dumps(record, separators=(",", ":"), default=str)

    def _metadata(self, names: Mapping[int, str]) -> list[str]:
        """Process and lane names for the lanes in the current file (every rotated file names its own)."""
        records = [{"name": "process_name", "ph": "M", "pid": self.pid, "tid": ENGINE_LANE,
                    "args": {"name": self.process_name}},
                   {"name": "thread_name", "ph": "M", "pid": self.pid, "tid": ENGINE_LANE,
                    "args": {"name": "engine steps"}},
                   {"name": "thread_sort_index", "ph": "M", "pid": self.pid, "tid": ENGINE_LANE,
                    "args": {"sort_index": -1}}]
        for tid in sorted(self._file_tids - {ENGINE_LANE}):
            records.append({"name": "thread_name", "ph": "M", "pid": self.pid, "tid": tid,
                            "args": {"name": names.get(tid, f"lane {tid}")}})
        return [json.dumps(record, separators=(",", ":")) for record in records]

    def _write(self, names: Mapping[int, str]) -> None:
        lines = self._metadata(names) + self._file_lines
        text = '{"traceEvents":[\n' + ",\n".join(lines) + '\n],"displayTimeUnit":"ms"}\n'
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, self.path)

    def rotated_path(self, index: int) -> Path:
        """trace.json -> trace.{index}.json (index 0: the current file)."""
        if index == 0:
            return self.path
        return self.path.with_name(f"{self.path.stem}.{index}{self.path.suffix}")

    def files(self) -> list[Path]:
        """The trace files on disk, newest first."""
        return [self.rotated_path(i) for i in range(self.max_files) if self.rotated_path(i).exists()]

    def _rotate(self) -> None:
        self.rotated_path(self.max_files - 1).unlink(missing_ok=True)  # max_files 1: the current file itself
        for index in range(self.max_files - 2, -1, -1):
            source = self.rotated_path(index)
            if source.exists():
                os.replace(source, self.rotated_path(index + 1))


DISABLED = Tracer(None)


def _flush_loop(tracer_ref: "weakref.ref[Tracer]", wake: threading.Event, interval: float) -> None:
    while not wake.wait(interval):
        tracer = tracer_ref()
        if tracer is None:
            return
        try:
            tracer.flush()
        except OSError:  # a full disk must not end the engine; the next flush tries again
            pass
        del tracer


def _close_at_exit(tracer_ref: "weakref.ref[Tracer]") -> None:
    tracer = tracer_ref()
    if tracer is not None:
        try:
            tracer.close()
        except OSError:
            pass


def trace_step(tracer: Tracer, output: Any, chunks: list[Any], starts: list[int], sampled: Mapping[str, int],
               failed: Mapping[str, tuple[str, str]], times: tuple[float, ...], running: int, waiting: int,
               free_blocks: int) -> None:
    """The events of one engine step (llm.LLM.step), from the scheduler's output and the step's times:
    times = (step start, schedule end, forward start, forward end, sample end, step end). `starts` are the chunks'
    num_computed_tokens before the step."""
    step_start, schedule_end, forward_start, forward_end, sample_end, step_end = times
    forward_end = min(max(forward_end, forward_start), sample_end)
    for request in output.preempted:
        tracer.instant(request.request_id, "preempted", schedule_end, {"outputs_kept": len(request.output_token_ids)})
        tracer.waiting(request.request_id, schedule_end)
    for chunk in chunks:
        tracer.scheduled(chunk.request.request_id, step_start)
    tiles = 0
    for tile_slice in output.tiles_to_encode:
        tiles += tile_slice.num_tiles
        tracer.span(tile_slice.request.request_id, "vit", schedule_end, forward_start,
                    {"tiles": f"{tile_slice.start_tile}-{tile_slice.end_tile}", "num_tiles": tile_slice.num_tiles,
                     "image_tiles": tile_slice.image.num_tiles})
    num_prefill = num_tokens = 0
    for chunk, start in zip(chunks, starts):
        request = chunk.request
        request_id = request.request_id
        num_tokens += chunk.num_new_tokens
        if request_id in failed:
            tracer.instant(request_id, "error", sample_end, {"cause": failed[request_id][0]})
            continue
        if start < request.num_prompt_tokens:
            num_prefill += 1
            tracer.span(request_id, "prefill", forward_start, sample_end,
                        {"tokens": chunk.num_new_tokens, "from": start, "to": start + chunk.num_new_tokens,
                         "prompt_tokens": request.num_prompt_tokens})
            if request_id in sampled:
                tracer.instant(request_id, "first token", sample_end, {"token": sampled[request_id]})
        elif request_id in sampled:
            tracer.span(request_id, "decode", forward_start, sample_end,
                        {"index": len(request.output_token_ids) - 1, "token": sampled[request_id]})
    num_chunks = len(chunks)
    tracer.span(None, "step", step_start, step_end,
                {"chunks": num_chunks, "prefill_chunks": num_prefill, "decodes": num_chunks - num_prefill,
                 "tokens": num_tokens, "tiles": tiles, "preempted": len(output.preempted)})
    tracer.span(None, "schedule", step_start, schedule_end, {"chunks": len(output.chunks)})
    if output.tiles_to_encode:
        tracer.span(None, "vit", schedule_end, forward_start,
                    {"tiles": tiles, "slices": len(output.tiles_to_encode)})
    tracer.span(None, "forward", forward_start, forward_end, {"tokens": num_tokens})
    tracer.span(None, "sample", forward_end, sample_end, {"rows": len(sampled)})
    tracer.span(None, "update", sample_end, step_end)
    tracer.counter("requests", step_end, {"running": running, "waiting": waiting})
    tracer.counter("kv blocks", step_end, {"free": free_blocks})
