"""Online-serving benchmark of the OpenAI-compatible HTTP server: streamed chat completions with synthetic images.

    python3 benchmarks/bench_serving.py --spawn --num-requests 16           # CPU, tiny generated checkpoint
    python3 benchmarks/bench_serving.py --base-url http://127.0.0.1:8000 --image-resolutions 4k,1080p,720p \
        --request-rate 2 --num-requests 200 --max-tiles 40
    python3 benchmarks/bench_serving.py --max-concurrency 8 --max-tokens 256 --ignore-eos \
        --slo-ttft-ms 2000 --slo-tpot-ms 50 --result-json run.json --plot run.png
    python3 benchmarks/bench_serving.py --spawn --image-resolutions none --request-rate 8   # text-only requests

Sends --num-requests streamed POST /v1/chat/completions requests (Poisson arrivals at --request-rate, at most
--max-concurrency in flight), each with its own deterministic JPEG images (encoded before the timed run), and
measures per request the time to first token (TTFT), time per output token (TPOT), inter-token latencies (ITL) and
end-to-end latency. Prints mean/median/p99 (ms), throughputs and goodput under the given SLOs; writes per-request
records to --result-json and a 2x2 plot to --plot (both in benchmarks/results/ by default). Progress bars (image
encoding, the timed requests) go to stderr; --no-progress hides them. Exit status 0 when every request
succeeded, 1 otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import math
import os
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_dir import default_output, prepare_output  # noqa: E402

NAMED_RESOLUTIONS = MappingProxyType({"4k": (3840, 2160), "1080p": (1920, 1080), "720p": (1280, 720)})


def parse_resolutions(spec: str) -> list[tuple[int, int]]:
    """'4k,1080p,640x480' -> [(3840, 2160), (1920, 1080), (640, 480)] as (width, height); '' or 'none' -> []."""
    if spec.strip().lower() in ("", "none"):
        return []
    sizes = []
    for item in (part.strip().lower() for part in spec.split(",")):
        width, sep, height = item.partition("x")
        if item in NAMED_RESOLUTIONS:
            sizes.append(NAMED_RESOLUTIONS[item])
        elif sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0:
            sizes.append((int(width), int(height)))
        else:
            raise ValueError(f"bad image resolution {item!r}: use {', '.join(NAMED_RESOLUTIONS)} or WxH (e.g. 640x480)")
    return sizes


def poisson_arrival_offsets_s(num_requests: int, rate_per_s: float, seed: int) -> list[float]:
    """Send times (s after the start) of a Poisson process: the first at 0, then exponential gaps of mean 1/rate.

    rate_per_s = inf sends everything at once (all offsets 0).
    """
    if not rate_per_s > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {rate_per_s}")
    if math.isinf(rate_per_s):
        return [0.0] * num_requests
    rng = random.Random(seed)
    offsets_s = [0.0] * min(num_requests, 1)
    for _ in range(num_requests - 1):
        offsets_s.append(offsets_s[-1] + rng.expovariate(rate_per_s))
    return offsets_s


def synthetic_jpeg(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    """A deterministic gradient + checkerboard picture, distinct for each seed below 65536, as JPEG bytes."""
    from PIL import Image

    x = np.arange(width, dtype=np.int64)
    y = np.arange(height, dtype=np.int64)
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = ((x * 255 // max(width - 1, 1) + seed) % 256)[None, :]
    pixels[..., 1] = ((y * 255 // max(height - 1, 1) + (seed // 256) * 37) % 256)[:, None]
    pixels[..., 2] = np.where((((x + seed % 32) // 32)[None, :] + (y // 32)[:, None]) % 2 == 0, 220, 40)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def build_request_body(model: str, prompt: str, images_jpeg_b64: Sequence[str], max_tokens: int, temperature: float,
                       max_tiles: int | None = None, ignore_eos: bool = False) -> bytes:
    """The JSON body of one streamed chat completion (images first, then the prompt)."""
    content: list[dict] = [{"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{b64}"}}
                           for b64 in images_jpeg_b64]
    content.append({"type": "text", "text": prompt})
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": temperature, "stream": True, "stream_options": {"include_usage": True}}
    if max_tiles is not None:
        body["max_dynamic_patch"] = max_tiles
    if ignore_eos:
        body["ignore_eos"] = True
    return json.dumps(body).encode()


@dataclass
class RequestRecord:
    """One request's outcome. Durations in s; arrival_s (scheduled) and start_s (sent) from the benchmark start."""

    index: int
    ok: bool = False
    status: int | None = None
    error: str | None = None
    arrival_s: float = 0.0
    start_s: float = 0.0
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    image_tiles: int | None = None
    finish_reason: str | None = None
    text: str = ""


class StreamAccumulator:
    """Turns the SSE lines of one streamed chat completion, with their arrival times, into a RequestRecord."""

    def __init__(self, index: int, sent_s: float):
        self.index, self.sent_s = index, sent_s
        self.content_times_s: list[float] = []
        self.pieces: list[str] = []
        self.usage: dict = {}
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.done_s: float | None = None

    def feed(self, line: str | bytes, now_s: float) -> bool:
        """Consumes one line; True once the stream is over ('data: [DONE]', an error chunk or undecodable data)."""
        line = (line.decode() if isinstance(line, bytes) else line).strip()
        if not line.startswith("data:"):
            return False  # blank separators, ': comments' and other SSE fields
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            self.done_s = now_s
            return True
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            self.error = f"undecodable SSE data: {data[:200]!r}"
            return True
        if "error" in chunk:
            error = chunk["error"]
            self.error = str(error.get("message", error) if isinstance(error, dict) else error)
            return True
        self.usage = chunk.get("usage") or self.usage
        for choice in chunk.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                self.content_times_s.append(now_s)
                self.pieces.append(content)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        return False

    def fail(self, error: str, status: int | None = None) -> RequestRecord:
        return RequestRecord(index=self.index, status=status, error=error, text="".join(self.pieces))

    def finish(self, status: int | None = 200) -> RequestRecord:
        if self.error is not None:
            return self.fail(self.error, status)
        if self.done_s is None:
            return self.fail("stream ended before 'data: [DONE]'", status)
        times_s = self.content_times_s
        output_tokens = int(self.usage.get("completion_tokens", len(times_s)))
        ttft_s = times_s[0] - self.sent_s if times_s else None
        e2e_s = self.done_s - self.sent_s
        tpot_s = (e2e_s - ttft_s) / (output_tokens - 1) if ttft_s is not None and output_tokens > 1 else None
        return RequestRecord(
            index=self.index, ok=True, status=status, ttft_s=ttft_s, tpot_s=tpot_s, e2e_s=e2e_s,
            itl_s=[later - earlier for earlier, later in zip(times_s, times_s[1:])],
            prompt_tokens=int(self.usage.get("prompt_tokens", 0)), output_tokens=output_tokens,
            image_tiles=self.usage.get("image_tiles"), finish_reason=self.finish_reason, text="".join(self.pieces))


def parse_sse_stream(timed_lines: Iterable[tuple[float, str | bytes]], sent_s: float, index: int = 0) -> RequestRecord:
    """A whole stream of (arrival time in s, line) pairs -> its RequestRecord; sent_s is when the request left."""
    accumulator = StreamAccumulator(index, sent_s)
    for now_s, line in timed_lines:
        if accumulator.feed(line, now_s):
            break
    return accumulator.finish()


def error_message(body: bytes) -> str:
    """The message of an error response body ({"error": {"message": ...}}), else its text (truncated)."""
    try:
        payload = json.loads(body)
        error = payload.get("error", payload.get("detail"))
        return str(error.get("message", error) if isinstance(error, dict) else error)
    except (ValueError, AttributeError):
        return body.decode(errors="replace")[:300]


@dataclass(frozen=True)
class SLOs:
    """Service-level objectives in ms; None = not checked."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def met_by(self, record: RequestRecord) -> bool:
        """A successful request within every given SLO (no TPOT, i.e. a single output token, meets the TPOT SLO)."""
        if not record.ok:
            return False
        for limit_ms, value_s, required in ((self.ttft_ms, record.ttft_s, True), (self.e2e_ms, record.e2e_s, True),
                                            (self.tpot_ms, record.tpot_s, False)):
            if limit_ms is not None and (value_s * 1e3 > limit_ms if value_s is not None else required):
                return False
        return True


def latency_stats_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """Mean, median and p99 (linear interpolation) in ms; None for no values."""
    if len(values_s) == 0:
        return {"mean": None, "median": None, "p99": None}
    values_ms = np.asarray(values_s, dtype=np.float64) * 1e3
    return {"mean": float(values_ms.mean()), "median": float(np.median(values_ms)),
            "p99": float(np.percentile(values_ms, 99))}


def summarize(records: Sequence[RequestRecord], duration_s: float, slos: SLOs = SLOs()) -> dict:
    """Counts, throughputs (per s of duration_s), goodput and latency statistics of successful requests."""
    ok = [r for r in records if r.ok]
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    good = sum(slos.met_by(r) for r in ok)

    def per_s(count: float) -> float | None:
        return count / duration_s if duration_s > 0 else None

    return {
        "completed": len(ok), "failed": len(records) - len(ok), "duration_s": duration_s,
        "total_prompt_tokens": prompt_tokens, "total_output_tokens": output_tokens,
        "total_image_tiles": sum(r.image_tiles or 0 for r in ok),
        "request_throughput_per_s": per_s(len(ok)), "output_token_throughput_per_s": per_s(output_tokens),
        "total_token_throughput_per_s": per_s(prompt_tokens + output_tokens),
        "good_requests": good, "goodput_per_s": per_s(good), "slos_ms": asdict(slos),
        "ttft_ms": latency_stats_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": latency_stats_ms([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_ms": latency_stats_ms([gap for r in ok for gap in r.itl_s]),
        "e2e_ms": latency_stats_ms([r.e2e_s for r in ok if r.e2e_s is not None]),
        "errors": [f"request {r.index} (HTTP {r.status}): {r.error}" for r in records if not r.ok][:5],
    }


def format_table(summary: dict, width: int = 64) -> str:
    """A fixed-width text table of a summarize() result."""
    def row(label: str, value: object) -> str:
        text = "n/a" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)
        return f"{label:<{width - 16}}{text:>16}"

    slos = ", ".join(f"{name.removesuffix('_ms')} <= {limit:g} ms" for name, limit in summary["slos_ms"].items()
                     if limit is not None)
    lines = [" Serving benchmark result ".center(width, "="),
             row("Successful requests:", summary["completed"]), row("Failed requests:", summary["failed"]),
             row("Benchmark duration (s):", summary["duration_s"]),
             row("Total prompt tokens:", summary["total_prompt_tokens"]),
             row("Total output tokens:", summary["total_output_tokens"]),
             row("Total image tiles:", summary["total_image_tiles"]),
             row("Request throughput (req/s):", summary["request_throughput_per_s"]),
             row("Output token throughput (tok/s):", summary["output_token_throughput_per_s"]),
             row("Total token throughput (tok/s):", summary["total_token_throughput_per_s"]),
             row(f"Goodput (req/s, {slos or 'no SLOs'}):", summary["goodput_per_s"])]
    for key, name, title in (("ttft_ms", "TTFT", "Time to first token"), ("tpot_ms", "TPOT", "Time per output token"),
                             ("itl_ms", "ITL", "Inter-token latency"), ("e2e_ms", "E2E", "End-to-end latency")):
        lines.append(f" {title} ".center(width, "-"))
        lines += [row(f"{stat.capitalize()} {name} (ms):", summary[key][stat]) for stat in ("mean", "median", "p99")]
    if summary["errors"]:
        lines.append(" First errors ".center(width, "-"))
        lines += [f"  {error[:300]}" for error in summary["errors"]]
    lines.append("=" * width)
    return "\n".join(lines)


def write_plot(records: Sequence[RequestRecord], path: str, title: str) -> bool:
    """TTFT histogram, TPOT and ITL CDFs, and e2e latency against arrival time, as a PNG; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"NOTE: matplotlib is not installed: no plot written to {path}")
        return False
    ok = [r for r in records if r.ok]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ttft_ms = [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]
    axes[0, 0].hist(ttft_ms, bins=max(1, min(50, len(ttft_ms))))
    axes[0, 0].set(title="TTFT", xlabel="TTFT (ms)", ylabel="requests")
    for ax, name, values_s in ((axes[0, 1], "TPOT", [r.tpot_s for r in ok if r.tpot_s is not None]),
                               (axes[1, 0], "ITL", [gap for r in ok for gap in r.itl_s])):
        values_ms = np.sort(np.asarray(values_s, dtype=np.float64)) * 1e3
        ax.plot(values_ms, np.arange(1, values_ms.size + 1) / max(values_ms.size, 1), drawstyle="steps-post")
        ax.set(title=f"{name} CDF", xlabel=f"{name} (ms)", ylabel="fraction")
    axes[1, 1].scatter([r.arrival_s for r in ok], [r.e2e_s * 1e3 for r in ok], s=12, label="ok")
    failed = [r for r in records if not r.ok]
    if failed:
        axes[1, 1].scatter([r.arrival_s for r in failed], [0.0] * len(failed), marker="x", color="red", label="failed")
    axes[1, 1].set(title="E2E latency vs arrival", xlabel="arrival time (s)", ylabel="e2e latency (ms)")
    axes[1, 1].legend()
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


@contextlib.contextmanager
def spawned_server(server_args: str, timeout_s: float) -> Iterator[str]:
    """Runs `python -m internvl_engine.cli serve` on a free port until /health answers 200; yields its base URL."""
    from internvl_engine.server.spawn import spawned_server as spawn

    repo_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])))
    print(f"spawning: internvl-engine serve {server_args}", flush=True)
    start_s = time.monotonic()
    with spawn(shlex.split(server_args), timeout_s, env=env) as server:
        print(f"server ready at {server.base_url} after {time.monotonic() - start_s:.1f} s", flush=True)
        yield server.base_url


async def send_request(client, url: str, body: bytes, headers: dict, index: int, arrival_s: float,
                       bench_start_s: float) -> RequestRecord:
    """POSTs one streamed request and times its SSE chunks; failures come back as records with ok=False."""
    sent_s = time.perf_counter()
    accumulator = StreamAccumulator(index, sent_s)
    try:
        async with client.stream("POST", url, content=body, headers=headers) as response:
            if response.status_code != 200:
                record = accumulator.fail(error_message(await response.aread()), response.status_code)
            else:
                async for line in response.aiter_lines():
                    if accumulator.feed(line, time.perf_counter()):
                        break
                record = accumulator.finish(response.status_code)
    except Exception as exc:  # noqa: BLE001 - connection errors, timeouts: one failed request, not a crash
        record = accumulator.fail(f"{type(exc).__name__}: {exc}")
    record.arrival_s, record.start_s = arrival_s, sent_s - bench_start_s
    return record


async def run_requests(client, url: str, bodies: Sequence[bytes], offsets_s: Sequence[float], headers: dict,
                       max_concurrency: int | None, progress: bool = False) -> tuple[list[RequestRecord], float]:
    """Sends bodies[i] at offsets_s[i] (at most max_concurrency in flight); returns the records and the duration (s).
    progress: a tqdm bar on stderr over the finished requests."""
    limiter = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    bar = tqdm(total=len(bodies), desc="requests", unit="req", disable=not progress)
    start_s = time.perf_counter()

    async def one(index: int) -> RequestRecord:
        await asyncio.sleep(max(0.0, start_s + offsets_s[index] - time.perf_counter()))
        async with limiter:
            record = await send_request(client, url, bodies[index], headers, index, offsets_s[index], start_s)
        bar.update(1)
        return record

    with bar:
        records = await asyncio.gather(*(one(index) for index in range(len(bodies))))
        duration_s = time.perf_counter() - start_s
    return list(records), duration_s


async def benchmark(args: argparse.Namespace, base_url: str, images_b64: list[list[str]],
                    warmup_images_b64: list[list[str]]) -> tuple[str, list[RequestRecord], float]:
    """Resolves the model, runs the warm-up requests, then the timed run: (model, records, duration in s)."""
    import httpx

    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout), limits=limits) as client:
        model = args.model_name
        if not model:
            response = await client.get(f"{base_url}/v1/models", headers=headers)
            response.raise_for_status()
            model = response.json()["data"][0]["id"]
        make_body = lambda images: build_request_body(  # noqa: E731
            model, args.prompt, images, args.max_tokens, args.temperature, args.max_tiles, args.ignore_eos)
        url = f"{base_url}/v1/chat/completions"
        for index, images in enumerate(warmup_images_b64):
            record = await send_request(client, url, make_body(images), headers, index, 0.0, time.perf_counter())
            outcome = f"{record.e2e_s * 1e3:.0f} ms" if record.ok else f"FAILED (HTTP {record.status}): {record.error}"
            print(f"warm-up request {index + 1}/{len(warmup_images_b64)}: {outcome}", flush=True)
        bodies = [make_body(images) for images in images_b64]
        offsets_s = poisson_arrival_offsets_s(len(bodies), args.request_rate, args.seed)
        print(f"model {model}: {len(bodies)} requests, rate {args.request_rate} req/s, "
              f"max concurrency {args.max_concurrency or 'unbounded'}", flush=True)
        records, duration_s = await run_requests(client, url, bodies, offsets_s, headers, args.max_concurrency,
                                                 progress=not args.no_progress)
    return model, records, duration_s


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--base-url", default="http://127.0.0.1:8000", help="a running server (ignored with --spawn)")
    add("--spawn", action="store_true", help="start `internvl_engine.cli serve` on a free port for the run")
    add("--server-args", default="--tiny", help="extra arguments of the spawned server (default: --tiny)")
    add("--spawn-timeout", type=float, default=300.0, help="s to wait for the spawned server's /health")
    add("--tensor-parallel-size", type=int, default=1,
        help="with --spawn: the spawned server's --tensor-parallel-size (default: 1)")
    add("--api-key", default=os.environ.get("INTERNVL_ENGINE_API_KEY"), help="default: $INTERNVL_ENGINE_API_KEY")
    add("--model-name", default=None, help="default: the first id of GET /v1/models")
    add("--num-requests", type=int, default=32)
    add("--request-rate", type=float, default=math.inf, help="Poisson arrivals in req/s; inf = all at once")
    add("--max-concurrency", type=int, default=None, help="most requests in flight (default: unbounded)")
    add("--seed", type=int, default=0, help="seeds the arrival times and the images")
    add("--image-resolutions", default="720p", help="comma list of 4k, 1080p, 720p or WxH, cycled over "
                                                      "requests; '' or none for text only")
    add("--images-per-request", type=int, default=1)
    add("--prompt", default="Describe the image in detail.")
    add("--max-tokens", type=int, default=64)
    add("--temperature", type=float, default=0.0)
    add("--max-tiles", type=int, default=None, help="sent as max_dynamic_patch (default: the server's)")
    add("--ignore-eos", action="store_true", help="generate exactly --max-tokens tokens per request")
    add("--warmup", type=int, default=1, help="untimed requests sent first, one at a time")
    add("--request-timeout", type=float, default=None, help="s per request (default: none)")
    add("--slo-ttft-ms", type=float, default=None)
    add("--slo-tpot-ms", type=float, default=None)
    add("--slo-e2e-ms", type=float, default=None)
    add("--result-json", default=default_output("bench_serving_result.json"), help="'' to skip (default: %(default)s)")
    add("--plot", default=default_output("bench_serving.png"), help="'' to skip (default: %(default)s)")
    add("--no-progress", action="store_true", help="no progress bars on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        resolutions = parse_resolutions(args.image_resolutions)
    except ValueError as exc:
        parser.error(str(exc))
    if args.num_requests < 1 or not args.request_rate > 0 or (args.max_concurrency is not None and
                                                                args.max_concurrency < 1):
        parser.error("--num-requests and --max-concurrency must be >= 1, --request-rate > 0")
    images_per_request = max(args.images_per_request, 0) if resolutions else 0

    def images_for(slot: int) -> list[str]:  # timed requests take slots 0..N-1, warm-up ones follow
        width, height = resolutions[slot % len(resolutions)] if resolutions else (0, 0)
        return [base64.b64encode(synthetic_jpeg(width, height, args.seed * 7919 + slot * images_per_request + j))
                .decode("ascii") for j in range(images_per_request)]

    encode_start_s = time.perf_counter()
    slots = tqdm(range(args.num_requests + max(args.warmup, 0)), desc="encoding images", unit="req",
                 disable=args.no_progress or images_per_request == 0)
    encoded = [images_for(slot) for slot in slots]
    images_b64, warmup_images_b64 = encoded[:args.num_requests], encoded[args.num_requests:]
    encode_s = time.perf_counter() - encode_start_s
    encoded_mb = sum(len(b64) for images in images_b64 + warmup_images_b64 for b64 in images) / 1e6
    print(f"encoded {(args.num_requests + max(args.warmup, 0)) * images_per_request} JPEG images "
          f"({encoded_mb:.1f} MB as base64) in {encode_s:.2f} s (outside the measurements)", flush=True)

    import httpx

    server_args = args.server_args
    if args.tensor_parallel_size != 1:
        server_args += f" --tensor-parallel-size {args.tensor_parallel_size}"
    server = spawned_server(server_args, args.spawn_timeout) if args.spawn else \
        contextlib.nullcontext(args.base_url.rstrip("/"))
    try:
        with server as base_url:
            model, records, duration_s = asyncio.run(benchmark(args, base_url, images_b64, warmup_images_b64))
    except (RuntimeError, OSError, ValueError, LookupError, httpx.HTTPError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1

    summary = summarize(records, duration_s, SLOs(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2e_ms))
    print(format_table(summary))
    if args.result_json:
        config = {key: (str(value) if isinstance(value, float) and not math.isfinite(value) else value)
                  for key, value in vars(args).items() if key != "api_key"}
        result = {"date": datetime.now().astimezone().isoformat(timespec="seconds"), "base_url": base_url,
                  "model": model, "config": config, "image_encode_s": encode_s, "summary": summary,
                  "requests": [asdict(record) for record in records]}
        result_path = prepare_output(args.result_json)
        result_path.write_text(json.dumps(result, indent=2))
        print(f"wrote {result_path}")
    if args.plot:
        plot_path = prepare_output(args.plot)
        if write_plot(records, str(plot_path), f"{model} @ {base_url}: {len(records)} requests, "
                                               f"rate {args.request_rate}, concurrency {args.max_concurrency}"):
            print(f"wrote {plot_path}")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
