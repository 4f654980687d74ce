"""Pure parts of benchmarks/bench_serving.py: arrivals, SSE parsing, statistics, goodput, resolutions, table."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_serving.py"
spec = importlib.util.spec_from_file_location("bench_serving", path)
bench = importlib.util.module_from_spec(spec)
sys.modules["bench_serving"] = bench  # dataclasses look their module up there
spec.loader.exec_module(bench)


def chunk(delta: dict | None = None, finish_reason: str | None = None, **extra) -> str:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": choices}
    return "data: " + json.dumps({**body, **extra})


def test_poisson_offsets_seeded_increasing_with_mean_gap():
    offsets = bench.poisson_arrival_offsets_s(4000, rate_per_s=4.0, seed=7)
    assert offsets == bench.poisson_arrival_offsets_s(4000, rate_per_s=4.0, seed=7)
    assert offsets != bench.poisson_arrival_offsets_s(4000, rate_per_s=4.0, seed=8)
    assert len(offsets) == 4000 and offsets[0] == 0.0
    gaps = np.diff(offsets)
    assert (gaps > 0).all()
    assert gaps.mean() == pytest.approx(0.25, rel=0.1)
    assert gaps.std() == pytest.approx(0.25, rel=0.1)  # exponential: std == mean


def test_poisson_offsets_infinite_rate_and_edges():
    assert bench.poisson_arrival_offsets_s(5, math.inf, seed=0) == [0.0] * 5
    assert bench.poisson_arrival_offsets_s(0, 2.0, seed=0) == []
    assert bench.poisson_arrival_offsets_s(1, 2.0, seed=0) == [0.0]
    with pytest.raises(ValueError, match="rate"):
        bench.poisson_arrival_offsets_s(3, 0.0, seed=0)


def test_sse_stream_timings_and_usage():
    usage = {"prompt_tokens": 300, "completion_tokens": 3, "total_tokens": 303, "image_tiles": 7}
    lines = [
        (10.05, chunk({"role": "assistant", "content": ""})),
        (10.06, ""),
        (10.10, chunk({"content": "Hello"})),
        (10.11, ""),
        (10.13, b": keep-alive comment"),
        (10.15, chunk({"content": " wor"}).encode()),  # bytes are accepted too
        (10.16, ""),
        (10.22, chunk({"content": "ld"})),
        (10.25, chunk({}, finish_reason="length")),
        (10.27, chunk(None, usage=usage)),
        (10.30, "data: [DONE]"),
        (10.40, chunk({"content": "after done: ignored"})),
    ]
    record = bench.parse_sse_stream(lines, sent_s=10.0, index=3)
    assert record.ok and record.error is None and record.index == 3
    assert record.ttft_s == pytest.approx(0.10)
    assert record.itl_s == pytest.approx([0.05, 0.07])
    assert record.e2e_s == pytest.approx(0.30)
    assert record.tpot_s == pytest.approx((0.30 - 0.10) / 2)
    assert (record.prompt_tokens, record.output_tokens, record.image_tiles) == (300, 3, 7)
    assert record.finish_reason == "length" and record.text == "Hello world"


def test_sse_stream_without_usage_counts_content_chunks():
    lines = [(1.2, chunk({"content": "a"})), (1.5, chunk({"content": "b"}, finish_reason="stop")),
             (1.6, "data: [DONE]")]
    record = bench.parse_sse_stream(lines, sent_s=1.0)
    assert record.ok and record.output_tokens == 2 and record.prompt_tokens == 0 and record.image_tiles is None
    assert record.tpot_s == pytest.approx(0.6 - 0.2)
    single = bench.parse_sse_stream([(1.2, chunk({"content": "a"})), (1.3, "data: [DONE]")], sent_s=1.0)
    assert single.ok and single.output_tokens == 1 and single.tpot_s is None and single.itl_s == []


def test_sse_error_chunk_and_truncated_stream_fail():
    error = {"error": {"message": "image too large", "type": "invalid_request_error", "code": 400}}
    record = bench.parse_sse_stream([(0.1, chunk({"content": "x"})), (0.2, "data: " + json.dumps(error)),
                                     (0.3, "data: [DONE]")], sent_s=0.0)
    assert not record.ok and record.error == "image too large" and record.ttft_s is None
    truncated = bench.parse_sse_stream([(0.1, chunk({"content": "x"}))], sent_s=0.0)
    assert not truncated.ok and "[DONE]" in truncated.error
    assert not bench.parse_sse_stream([(0.1, "data: {not json")], sent_s=0.0).ok


def test_error_message_of_http_error_body():
    assert bench.error_message(b'{"error": {"message": "bad model", "type": "x"}}') == "bad model"
    assert bench.error_message(b"Internal Server Error") == "Internal Server Error"


def record(index, ttft_s, tpot_s, e2e_s, itl_s=(), ok=True, prompt_tokens=10, output_tokens=5):
    return bench.RequestRecord(index=index, ok=ok, ttft_s=ttft_s, tpot_s=tpot_s, e2e_s=e2e_s, itl_s=list(itl_s),
                               prompt_tokens=prompt_tokens, output_tokens=output_tokens, error=None if ok else "boom")


def test_latency_stats_match_numpy():
    values_s = [0.010, 0.020, 0.030, 0.045, 0.5, 0.012, 0.033]
    stats = bench.latency_stats_ms(values_s)
    ms = np.array(values_s) * 1e3
    assert stats["mean"] == pytest.approx(ms.mean())
    assert stats["median"] == pytest.approx(30.0)
    assert stats["p99"] == pytest.approx(np.percentile(ms, 99))
    assert stats["p99"] == pytest.approx(45 + 0.94 * (500 - 45))  # linear interpolation between the top two
    assert bench.latency_stats_ms([]) == {"mean": None, "median": None, "p99": None}


def test_summary_throughputs_and_goodput():
    records = [
        record(0, 0.100, 0.020, 0.200, itl_s=[0.01, 0.03]),
        record(1, 0.300, 0.020, 0.400, itl_s=[0.02]),           # TTFT over the 250 ms SLO
        record(2, 0.100, 0.080, 0.500),                          # TPOT over the 50 ms SLO
        record(3, 0.050, None, 0.060, output_tokens=1),          # one token: no TPOT, meets the TPOT SLO
        record(4, None, None, None, ok=False, prompt_tokens=0, output_tokens=0),
    ]
    slos = bench.SLOs(ttft_ms=250, tpot_ms=50)
    summary = bench.summarize(records, duration_s=2.0, slos=slos)
    assert (summary["completed"], summary["failed"], summary["good_requests"]) == (4, 1, 2)
    assert summary["goodput_per_s"] == pytest.approx(1.0)
    assert summary["request_throughput_per_s"] == pytest.approx(2.0)
    assert summary["total_output_tokens"] == 16 and summary["output_token_throughput_per_s"] == pytest.approx(8.0)
    assert summary["total_token_throughput_per_s"] == pytest.approx((40 + 16) / 2.0)
    assert summary["ttft_ms"]["median"] == pytest.approx(100.0)
    assert summary["tpot_ms"]["mean"] == pytest.approx(40.0)
    assert summary["itl_ms"]["mean"] == pytest.approx(20.0)
    assert summary["e2e_ms"]["p99"] == pytest.approx(np.percentile([200, 400, 500, 60], 99))
    assert summary["errors"] == ["request 4 (HTTP None): boom"]
    assert bench.summarize(records, 2.0)["goodput_per_s"] == pytest.approx(2.0)  # no SLOs: every success counts
    assert bench.summarize(records, 2.0, bench.SLOs(e2e_ms=300))["good_requests"] == 2
    assert not bench.SLOs().met_by(records[4])


def test_format_table_lists_every_metric():
    summary = bench.summarize([record(0, 0.1, 0.02, 0.2, itl_s=[0.02])], 1.0, bench.SLOs(ttft_ms=500))
    table = bench.format_table(summary)
    widths = {len(line) for line in table.splitlines()}
    assert widths == {64}
    for label in ("Successful requests:", "Goodput (req/s, ttft <= 500 ms):", "Mean TTFT (ms):", "P99 TPOT (ms):",
                  "Median ITL (ms):", "Mean E2E (ms):", "Request throughput (req/s):"):
        assert label in table
    assert "100.00" in table and "n/a" not in table


def test_parse_resolutions():
    assert bench.parse_resolutions("4k") == [(3840, 2160)]
    assert bench.parse_resolutions("4K, 1080p,720p,640x480") == [(3840, 2160), (1920, 1080), (1280, 720), (640, 480)]
    assert bench.parse_resolutions("") == [] and bench.parse_resolutions("none") == []
    for bad in ("8k", "640x", "0x480", "4k,,720p", "axb"):
        with pytest.raises(ValueError, match="bad image resolution .*WxH"):
            bench.parse_resolutions(bad)


def test_synthetic_jpeg_deterministic_and_distinct():
    from PIL import Image
    import io

    first = bench.synthetic_jpeg(96, 64, seed=3)
    assert first == bench.synthetic_jpeg(96, 64, seed=3)
    assert first != bench.synthetic_jpeg(96, 64, seed=4)
    assert Image.open(io.BytesIO(first)).size == (96, 64)


def test_request_body_fields():
    body = json.loads(bench.build_request_body("m", "hi", ["QUJD"], 16, 0.0, max_tiles=12, ignore_eos=True))
    content = body["messages"][0]["content"]
    assert content[0] == {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QUJD"}}
    assert content[1] == {"type": "text", "text": "hi"}
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["max_dynamic_patch"], body["ignore_eos"]) == (16, 12, True)
    plain = json.loads(bench.build_request_body("m", "hi", [], 16, 0.5))
    assert "max_dynamic_patch" not in plain and "ignore_eos" not in plain and plain["temperature"] == 0.5
