"""Request and step traces (engine/trace.py): Chrome trace event JSON with a lane per request and one for the
engine's steps, a bounded ring, rotating files that are valid JSON after every flush, and nothing when off."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from internvl_engine import LLM, AsyncLLM, SamplingParams
from internvl_engine.engine.trace import DISABLED, ENGINE_LANE, Tracer

from golden_utils import MODELS, checkpoint, image_path

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)


def load(path: Path) -> list[dict]:
    document = json.loads(path.read_text())
    assert set(document) >= {"traceEvents"}
    return document["traceEvents"]


def by_lane(events: list[dict]) -> dict[int, list[dict]]:
    lanes = defaultdict(list)
    for event in events:
        if event["ph"] != "M":
            lanes[event["tid"]].append(event)
    return lanes


def lane_names(events: list[dict]) -> dict[int, str]:
    return {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}


# --- the recorder alone ------------------------------------------------------------------------------------------


def test_disabled_tracer_records_nothing_and_writes_no_file(tmp_path):
    tracer = Tracer(None)
    assert not tracer.enabled and not DISABLED.enabled
    tracer.span("a", "x", 0.0, 1.0)
    tracer.instant(None, "y", 0.0)
    tracer.flush()
    tracer.close()
    assert not hasattr(tracer, "_ring")  # no buffer, no thread


def test_ring_keeps_the_newest_events_and_says_how_many_were_dropped(tmp_path):
    tracer = Tracer(tmp_path / "t.json", max_events=10, flush_interval_s=3600)
    start = time.perf_counter()
    for index in range(25):
        tracer.span("r1", f"event {index}", start + index, start + index + 0.5)
    tracer.close()
    events = [e for e in load(tmp_path / "t.json") if e["ph"] != "M"]
    dropped = [e for e in events if e["name"] == "trace events dropped"]
    assert dropped and dropped[0]["args"]["count"] == 15
    assert [e["name"] for e in events if e["ph"] == "X"] == [f"event {i}" for i in range(15, 25)]
    assert all(e["dur"] == pytest.approx(5e5) for e in events if e["ph"] == "X")  # microseconds


def test_files_rotate_at_the_size_limit_and_each_is_valid_json_with_its_lane_names(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text("an earlier run's trace")  # kept as the first rotated file, not overwritten
    tracer = Tracer(path, max_events=100_000, max_file_bytes=4096, max_files=3, flush_interval_s=3600)
    assert (tmp_path / "trace.1.json").read_text() == "an earlier run's trace"
    at = time.perf_counter()
    for index in range(200):
        tracer.span(f"req{index % 7}", "decode", at, at + 0.001, {"index": index})
        if index % 50 == 49:
            tracer.flush()
    tracer.close()
    files = tracer.files()
    assert files == [path, tmp_path / "trace.1.json", tmp_path / "trace.2.json"]
    assert not (tmp_path / "trace.3.json").exists()  # max_files in all
    assert not list(tmp_path.glob(".*tmp"))  # every write was renamed into place
    for file in files:
        events = load(file)
        assert len(file.read_bytes()) < 4096 + 2048  # the limit, plus the lane names each file repeats
        names = lane_names(events)
        assert names[ENGINE_LANE] == "engine steps"
        for event in events:
            if event["ph"] == "X":
                assert names[event["tid"]].startswith("request req")
    newest = [e["args"]["index"] for e in load(path) if e["ph"] == "X"]
    assert newest[-1] == 199


def test_lanes_are_per_request_and_queued_spans_close_when_scheduled(tmp_path):
    tracer = Tracer(tmp_path / "t.json", flush_interval_s=3600)
    assert tracer.lane("a") == tracer.lane("a") != tracer.lane("b")
    tracer.waiting("a", 1.0)
    tracer.scheduled("a", 3.0)
    tracer.scheduled("a", 4.0)  # already running: no second "queued"
    tracer.finished("a", 5.0, {"reason": "stop"})
    tracer.close()
    events = load(tmp_path / "t.json")
    lane = by_lane(events)[tracer_lane := 1]
    assert [(e["name"], e["ph"]) for e in lane] == [("queued", "X"), ("finish", "i")]
    assert lane[0]["dur"] == pytest.approx(2e6)
    assert lane_names(events)[tracer_lane] == "request a"


def test_the_flush_thread_writes_at_its_interval(tmp_path):
    tracer = Tracer(tmp_path / "t.json", flush_interval_s=0.05)
    tracer.instant(None, "hello", time.perf_counter())
    deadline = time.monotonic() + 5
    while not (tmp_path / "t.json").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [e["name"] for e in load(tmp_path / "t.json") if e["ph"] == "i"] == ["hello"]
    tracer.close()
    tracer.close()  # idempotent
    tracer.instant(None, "after close", time.perf_counter())  # dropped, no error


@pytest.mark.parametrize("ending", ["killed", "exits"])
def test_files_on_disk_are_valid_json_when_killed_and_complete_at_exit(tmp_path, ending):
    """Killed between flushes: the last flush's file, whole. A normal exit writes the rest (atexit)."""
    path = tmp_path / "t.json"
    script = f"""
import os, signal, time
from internvl_engine.engine.trace import Tracer
tracer = Tracer({str(path)!r}, flush_interval_s=3600)
now = time.perf_counter()
tracer.span("r", "flushed", now, now + 0.001)
tracer.flush()
tracer.span("r", "pending", now, now + 0.001)
if {ending == "killed"}:
    os.kill(os.getpid(), signal.SIGKILL)
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert completed.returncode == (-9 if ending == "killed" else 0), completed.stderr
    names = [e["name"] for e in load(path) if e["ph"] == "X"]
    assert names == (["flushed"] if ending == "killed" else ["flushed", "pending"])
    assert not list(tmp_path.glob(".*tmp"))


def test_bad_limits_are_refused(tmp_path):
    with pytest.raises(ValueError, match="trace limits"):
        Tracer(tmp_path / "t.json", max_events=0)


# --- the engine's events -----------------------------------------------------------------------------------------


def make_llm(**options) -> LLM:
    return LLM(checkpoint(MODELS[0]), dtype=torch.float32, device="cpu", backend="torch", **options)


def test_engine_trace_of_an_image_request_across_vit_slices_and_prefill_chunks(tmp_path):
    path = tmp_path / "engine.json"
    # 3 tiles (2 + thumbnail) at 2 tiles per step: two ViT slices; 256-token budget: several prefill chunks.
    llm = make_llm(trace_path=str(path), max_vit_tiles_per_step=2, max_num_batched_tokens=256)
    requests = [{"prompt": "<image>\nDescribe the image.", "images": [str(image_path("fhd1920x1080"))],
                 "max_tiles": 2}, "Hello, who are you?"]
    outputs = llm.generate(requests, GREEDY)
    llm.close()
    assert all(output.error is None for output in outputs)
    events = load(path)
    lanes, names = by_lane(events), lane_names(events)
    image_lane = next(tid for tid, name in names.items() if name == f"request {outputs[0].request_id}")
    text_lane = next(tid for tid, name in names.items() if name == f"request {outputs[1].request_id}")
    assert len({ENGINE_LANE, image_lane, text_lane}) == 3

    image = lanes[image_lane]
    kinds = [e["name"] for e in image]
    assert kinds[:2] == ["preprocess", "queued"] and kinds[-1] == "finish"
    assert image[0]["args"]["tiles"] == outputs[0].num_image_tiles == 3
    vit = [e for e in image if e["name"] == "vit"]
    ranges = [tuple(int(v) for v in e["args"]["tiles"].split("-")) for e in vit]
    assert len(ranges) >= 2 and ranges[0][0] == 0 and ranges[-1][1] == 3  # every tile, in slices, in order
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])) and all(0 < e - s <= 2 for s, e in ranges)
    assert all(e["args"]["image_tiles"] == 3 and e["args"]["num_tiles"] == e_ - s_
               for e, (s_, e_) in zip(vit, ranges))
    prefill = [e["args"] for e in image if e["name"] == "prefill"]
    assert len(prefill) >= 2 and prefill[0]["from"] == 0 and prefill[-1]["to"] == outputs[0].num_prompt_tokens
    assert all(a["to"] == b["from"] for a, b in zip(prefill, prefill[1:]))  # contiguous chunks
    assert kinds.count("first token") == 1
    decodes = [e for e in image if e["name"] == "decode"]
    assert [e["args"]["index"] for e in decodes] == list(range(1, len(outputs[0].token_ids)))
    assert [e["args"]["token"] for e in decodes] == outputs[0].token_ids[1:]
    finish = image[-1]["args"]
    assert finish["reason"] == outputs[0].finish_reason and finish["output_tokens"] == len(outputs[0].token_ids)
    times = [e["ts"] for e in image]
    assert times == sorted(times)

    steps = [e for e in lanes[ENGINE_LANE] if e["name"] == "step"]
    assert len(steps) >= len(prefill) + len(decodes)
    assert sum(e["args"]["tiles"] for e in steps) == 3
    engine_names = {e["name"] for e in lanes[ENGINE_LANE]}
    assert {"schedule", "vit", "forward", "sample", "update", "requests", "kv blocks"} <= engine_names
    for step in steps:  # the parts lie within their step
        inside = [e for e in lanes[ENGINE_LANE] if e["ph"] == "X" and e["name"] != "step"
                  and step["ts"] <= e["ts"] < step["ts"] + step["dur"]]
        assert all(e["ts"] + e["dur"] <= step["ts"] + step["dur"] + 1 for e in inside)
    assert {e["name"] for e in lanes[text_lane]} >= {"preprocess", "queued", "prefill", "first token", "finish"}


def test_engine_without_a_trace_path_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    llm = make_llm()
    assert llm.tracer is DISABLED
    llm.generate(["Hello"], GREEDY)
    llm.close()
    assert list(tmp_path.iterdir()) == []


def test_async_llm_adds_the_preprocessing_pool_to_the_request_lane(tmp_path):
    path = tmp_path / "async.json"
    engine = AsyncLLM(make_llm(trace_path=str(path)))

    async def run() -> list:
        return [output async for output in engine.generate("Hello, who are you?", GREEDY, request_id="chat-1")]

    outputs = asyncio.run(run())
    engine.shutdown()  # flushes
    assert outputs[-1].finished
    events = load(path)
    lane = next(tid for tid, name in lane_names(events).items() if name == "request chat-1")
    kinds = [e["name"] for e in by_lane(events)[lane]]
    assert kinds[:3] == ["preprocess", "preprocess queue", "queued"] and kinds[-1] == "finish"


def test_serve_trace_dir_flag(tmp_path):
    import argparse

    from internvl_engine.server.launch import add_serve_arguments, build_engine

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert parser.parse_args([]).trace_dir is None
    assert parser.parse_args(["--trace-dir", str(tmp_path)]).trace_dir == tmp_path
    assert "--trace-dir" in parser.format_help() and "default: off" in parser.format_help()
    engine, _ = build_engine(parser.parse_args(["--tiny", "--trace-dir", str(tmp_path / "traces")]))
    try:
        assert engine.llm.tracer.enabled
        assert engine.llm.tracer.path == (tmp_path / "traces" / f"engine-trace-{os.getpid()}.json").resolve()
    finally:
        engine.shutdown()
    assert load(engine.llm.tracer.path) is not None  # shutdown wrote it
