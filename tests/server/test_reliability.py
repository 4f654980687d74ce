"""One request never harms another, against a live `serve` under a 256-file limit.

Each attack that once failed the batch, cost seconds and GBs, starved the streams or answered 500 is sent to
the server and must get its 4xx (in the OpenAI format, naming the limit), and a good request must then
succeed. Then a soak: rounds of concurrent good streams, bad requests and clients that disconnect; every good
request completes with the same text each round, every gauge returns to 0 and the resident memory stays flat.
"""
from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import httpx
import pytest
from PIL import Image

from internvl_engine.server.spawn import spawned_server

from server_utils import data_url, post_json

pytestmark = pytest.mark.reliability
MODEL = "tiny"
OPEN_FILES = 256
MAX_CONNECTIONS = 128
HEADER_TIMEOUT_S = 2.0
RSS_GROWTH_BOUND = 48 << 20
# The interpreter, with the open-file limit lowered first (as on a default-configured host).
LIMITED_PYTHON = (sys.executable, "-c", "import os, resource, sys; "
                  f"resource.setrlimit(resource.RLIMIT_NOFILE, ({OPEN_FILES}, {OPEN_FILES})); "
                  "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")


def strip_png(width: int, height: int) -> bytes:
    """A real 8-bit grayscale PNG of zeros: 1 x 30,000,000 is 58 KB on the wire and 30 MP decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    compressor, row, idat = zlib.compressobj(9), b"\x00" * (width + 1), []
    for start in range(0, height, 1 << 20):
        idat.append(compressor.compress(row * min(1 << 20, height - start)))
    idat.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b"")


class Live:
    def __init__(self, spawned, media: Path) -> None:
        self.spawned, self.media = spawned, media
        self.base_url = spawned.base_url
        self.url = spawned.base_url + "/v1/chat/completions"

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=30) as response:
            text = response.read().decode()
        return {name: float(value) for name, value in
                (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))}

    def metric(self, name: str, **labels: str) -> float:
        total = 0.0
        for key, value in self.metrics().items():
            match = re.fullmatch(r"([^{]+)(?:\{(.*)\})?", key)
            have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            if match.group(1) == name and all(have.get(k) == v for k, v in labels.items()):
                total += value
        return total

    def rss(self) -> int:
        return int(self.metric("process_resident_memory_bytes"))

    def log(self) -> str:
        return self.spawned.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    Image.new("RGB", (300, 200), (10, 200, 30)).save(media / "ok.png")
    args = ["--tiny", "--served-model-name", MODEL, "--backend", "torch", "--log-level", "warning",
            "--max-connections", str(MAX_CONNECTIONS), "--header-timeout-s", str(HEADER_TIMEOUT_S),
            "--allowed-local-media-path", str(media), "--allow-remote-images", "--max-tiles-per-image", "6",
            "--feature-cache-bytes", str(4 << 20)]
    with spawned_server(args, timeout_s=300, python=LIMITED_PYTHON) as spawned:
        yield Live(spawned, media)


def chat(content, **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **fields}


def good_request(live: Live) -> None:
    status, body = post_json(live.url, chat("Hello, who are you?", temperature=0))
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length"), body


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def nested(depth: int) -> bytes:
    return b'{"model": "tiny", "messages": ' + b"[" * depth + b"]" * depth + b"}"


ATTACKS = {  # name -> (request body, expected status, expected error param/limit, or None)
    "top_k 2**63": (chat("hi", top_k=2**63), 400, "top_k"),
    "temperature 1e-40": (chat("hi", temperature=1e-40), 400, "temperature"),
    "repetition_penalty 1e-40": (chat("hi", repetition_penalty=1e-40), 400, "repetition_penalty"),
    "seed past int64": (chat("hi", seed=2**63), 400, "seed"),
    "1x30,000,000 strip PNG": (lambda: chat([image_part(data_url(strip_png(1, 30_000_000)))]), 413,
                               "max_image_side"),
    "1x100,000,000 strip PNG": (lambda: chat([image_part(data_url(strip_png(1, 100_000_000)))]), 413,
                                "max_image_side"),
    "30,000,000x1 strip PNG": (lambda: chat([image_part(data_url(strip_png(30_000_000, 1)))]), 413,
                               "max_image_side"),
    "100 images": (lambda: chat([image_part(data_url(Image.new("RGB", (32, 32))))] * 100), 413,
                   "max_images_per_request"),
    "8 MB prompt": (chat("word " * 1_600_000), 413, "max_prompt_chars"),
    "100 KB stop string": (chat("hi", stop="x" * 100_000), 413, "max_stop_string_chars"),
    "JSON 1,000 deep": (nested(1000), 400, "max_json_depth"),
    "JSON 100,000 deep": (nested(100_000), 400, "max_json_depth"),
    "an integer of 5000 digits": (b'{"model": "tiny", "seed": ' + b"9" * 5000 + b"}", 400, None),
    "NUL byte in a local path": (lambda live: chat([image_part(str(live.media / "ok\0.png"))]), 400, None),
    "4096-character local path": (lambda live: chat([image_part(str(live.media) + "/" + "a" * 4096)]), 400, None),
    "remote 127.1": (chat([image_part("http://127.1:9/x.png")]), 400, None),
    "remote decimal IP": (chat([image_part("http://2130706433/x.png")]), 400, None),
    "remote hex IP": (chat([image_part("http://0x7f000001/x.png")]), 400, None),
    "remote ftp": (chat([image_part("ftp://example.com/x.png")]), 400, None),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_an_attack_gets_its_4xx_and_the_next_request_is_served(live, name):
    body, status, expected = ATTACKS[name]
    if callable(body):
        body = body(live) if body.__code__.co_argcount else body()
    refusals = live.metric("internvl_request_refusals_total")
    started = time.monotonic()
    answer_status, answer = post_json(live.url, body)
    elapsed = time.monotonic() - started
    assert answer_status == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and len(error["message"]) < 1000
    if expected is not None:
        assert error["param"] == expected or error["message"].endswith(f"(--{expected.replace('_', '-')})"), error
    if expected is not None and expected.startswith("max_"):
        assert live.metric("internvl_request_refusals_total", limit=expected) >= 1
        assert live.metric("internvl_request_refusals_total") == refusals + 1
    assert elapsed < 30, f"{name} took {elapsed:.1f} s"
    good_request(live)


def test_remote_fetch_errors_do_not_tell_open_from_closed_ports(live):
    messages = []
    for port in (9, 1):  # both closed, one refused outright: the same text either way
        status, body = post_json(live.url, chat([image_part(f"http://127.0.0.1:{port}/x.png")]))
        messages.append((status, body["error"]["message"]))
    assert messages[0] == messages[1]


def test_idle_connections_are_closed_and_never_block_health(live):
    sockets = []
    try:
        for _ in range(300):  # more than the open-file limit allows
            sock = socket.socket()
            sock.settimeout(5)
            try:
                sock.connect(("127.0.0.1", int(live.base_url.rsplit(":", 1)[1])))
            except OSError:
                sock.close()
                continue
            sockets.append(sock)
        with urllib.request.urlopen(live.base_url + "/health", timeout=HEADER_TIMEOUT_S + 10) as response:
            assert response.status == 200
        deadline = time.monotonic() + HEADER_TIMEOUT_S + 10
        for sock in sockets:  # each is answered 503 (over the cap) or closed at the header timeout
            sock.settimeout(max(deadline - time.monotonic(), 0.1))
            data = sock.recv(4096)
            assert data == b"" or data.startswith(b"HTTP/1.1 503"), data[:100]
    finally:
        for sock in sockets:
            sock.close()
    good_request(live)
    log = live.log()
    assert "Traceback" not in log and len(log.splitlines()) < 100, log[-3000:]


# ---- the soak ----
async def good_stream(client: httpx.AsyncClient, live: Live, index: int) -> tuple[str, str]:
    content = f"Request {index}: tell me something."
    if index % 2:
        picture = Image.new("RGB", (480, 320), ((40 * index) % 256, 120, 200))
        content = [image_part(data_url(picture)), {"type": "text", "text": content}]
    body = chat(content, max_tokens=8, stream=True, **({"temperature": 0} if index % 3 else {"seed": index}))
    text, reason = [], None
    async with client.stream("POST", live.url, json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event, event
                for choice in event["choices"]:
                    text.append(choice["delta"].get("content") or "")
                    reason = choice["finish_reason"] or reason
    return "".join(text), reason


async def disconnect_early(client: httpx.AsyncClient, live: Live, index: int) -> None:
    body = chat(f"Request {index}: tell me a long story.", max_tokens=64, stream=True, temperature=0.9)
    async with client.stream("POST", live.url, json=body) as response:
        lines = 0
        async for _ in response.aiter_lines():
            lines += 1
            if lines >= 3:
                break  # leaving the block closes the connection mid-stream


async def bad(client: httpx.AsyncClient, live: Live, index: int) -> int:
    bodies = [chat("hi", top_k=2**63), chat([image_part(data_url(strip_png(1, 100_000)))]),
              chat([image_part(data_url(Image.new("RGB", (8, 8))))] * 20), nested(5000),
              chat("hi", temperature=1e-40), chat([image_part("data:image/png;base64,bm90IGFuIGltYWdl")])]
    body = bodies[index % len(bodies)]
    response = await client.post(live.url, content=body if isinstance(body, bytes) else json.dumps(body),
                                 headers={"Content-Type": "application/json"})
    return response.status_code


async def soak_round(live: Live) -> tuple[list, list]:
    async with httpx.AsyncClient(timeout=300) as client:
        goods = [good_stream(client, live, index) for index in range(8)]
        bads = [bad(client, live, index) for index in range(6)]
        leaving = [disconnect_early(client, live, index) for index in range(3)]
        results = await asyncio.gather(*goods, *bads, *leaving)
    return results[:8], results[8:14]


def test_soak_mixed_good_and_bad_requests_with_disconnects(live):
    reference, rss = None, []
    for _ in range(4):
        goods, statuses = asyncio.run(soak_round(live))
        assert all(reason in ("stop", "length") for _, reason in goods), goods
        assert all(400 <= status < 500 for status in statuses), statuses
        reference = reference or goods
        assert goods == reference  # the same text every round, whatever ran beside it
        for _ in range(100):  # aborted streams are freed at the engine's next step
            if live.metric("internvl_num_requests_unfinished") == 0:
                break
            time.sleep(0.05)
        rss.append(live.rss())
    for gauge in ("num_requests_running", "num_requests_waiting", "num_requests_unfinished",
                  "num_requests_preprocessing", "kv_cache_blocks_in_use"):
        assert live.metric(f"internvl_{gauge}") == 0, gauge
    assert live.metric("internvl_request_errors_total") == 0  # nothing failed inside a step
    assert max(rss[1:]) - rss[1] < RSS_GROWTH_BOUND, [f"{value / 2**20:.0f} MiB" for value in rss]
