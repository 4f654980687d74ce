"""Bad inputs get their 4xx in the OpenAI error format while the server keeps serving; clients that leave
(streaming or not) abort their requests and free their KV blocks; a full queue answers 503."""
from __future__ import annotations

import base64
import io
import json
import struct
import time
import zlib

import httpx
import pytest
from PIL import Image

from golden_utils import MODELS, checkpoint
from server_utils import data_url, post_json, running_server

MODEL = "tiny"
MAX_REQUEST_BYTES = 4_000_000
MAX_IMAGE_BYTES = 1_000_000


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    Image.new("RGB", (300, 200), (10, 200, 30)).save(folder / "ok.png")
    return folder


@pytest.fixture(scope="module")
def server(media_dir):
    with running_server("--model", str(checkpoint(MODELS[0])), "--served-model-name", MODEL,
                        "--max-request-bytes", str(MAX_REQUEST_BYTES), "--max-image-bytes", str(MAX_IMAGE_BYTES),
                        "--allowed-local-media-path", str(media_dir)) as running:
        yield running


def chat_body(content, **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **fields}


def image_body(url: str, **fields) -> dict:
    return chat_body([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}],
                     **fields)


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit PNG of width x height zeros: ~50 KB on disk, 400 M pixels (1.2 GB as RGB) once decoded."""
    def block(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + block(b"IHDR", header) + block(b"IDAT", idat) + block(b"IEND", b"")


def truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 60).convert("RGB").save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    return data[: len(data) // 2]


BAD_REQUESTS = {
    "bad json": (b'{"model": "tiny", "messages": [', 400, "invalid_json"),
    "not an object": ([1, 2, 3], 400, None),
    "unknown model": ({**chat_body("hi"), "model": "gpt-4o"}, 400, "model_not_found"),
    "empty messages": ({"model": MODEL, "messages": []}, 400, None),
    "negative max_tokens": (chat_body("hi", max_tokens=-5), 400, None),
    "zero max_tokens": (chat_body("hi", max_tokens=0), 400, None),
    "temperature below 0": (chat_body("hi", temperature=-1), 400, None),
    "top_p of 0": (chat_body("hi", top_p=0), 400, None),
    "n of 2": (chat_body("hi", n=2), 400, None),
    "string top_k": (chat_body("hi", top_k="many"), 400, None),
    "stream not a bool": (chat_body("hi", stream="yes"), 400, None),
    "empty stop string": (chat_body("hi", stop=[""]), 400, None),
    "max_dynamic_patch 0": (chat_body("hi", max_dynamic_patch=0), 400, None),
    "max_dynamic_patch 41": (chat_body("hi", max_dynamic_patch=41), 400, None),
    "unknown role": ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, None),
    "assistant before any user": ({"model": MODEL, "messages": [{"role": "assistant", "content": "yo"},
                                                                {"role": "user", "content": "hi"}]}, 400, None),
    "unknown part type": (chat_body([{"type": "audio", "audio": "..."}]), 400, None),
    "prompt too long": (chat_body("hi", max_tokens=10 ** 7), 400, "context_length_exceeded"),
    "bad base64": (image_body("data:image/png;base64,!!!not-base64!!!"), 400, "invalid_image"),
    "not an image": (image_body("data:image/png;base64," + base64.b64encode(b"hello, world").decode()), 400,
                     "invalid_image"),
    "truncated jpeg": (image_body(data_url(truncated_jpeg(), "JPEG")), 400, "invalid_image"),
    "http url": (image_body("https://example.com/cat.png"), 400, "remote_images_disabled"),
    "path outside the media folder": (image_body("file:///etc/hostname"), 400, None),
    "decompression bomb": (image_body(data_url(png_bomb())), 413, "image_too_large"),
    "image over --max-image-bytes": (image_body(data_url(b"\x89PNG" + b"\x00" * (MAX_IMAGE_BYTES + 10))), 413,
                                     "image_too_large"),
    "body over --max-request-bytes": (chat_body("x" * (MAX_REQUEST_BYTES + 1)), 413, "request_too_large"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_its_status_and_the_server_keeps_serving(server, name):
    body, status, code = BAD_REQUESTS[name]
    got, answer = post_json(server.api_url + "/chat/completions", body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    got, answer = post_json(server.api_url + "/chat/completions", chat_body("Hello", max_tokens=2))
    assert got == 200 and answer["choices"][0]["finish_reason"] in ("stop", "length")
    assert server.process.poll() is None


def test_local_image_inside_the_allowed_folder(server, media_dir):
    got, answer = post_json(server.api_url + "/chat/completions", image_body((media_dir / "ok.png").as_uri()))
    assert got == 200 and answer["usage"]["image_tiles"] >= 1


def test_unknown_route_answers_in_the_openai_format(server):
    response = httpx.get(server.api_url + "/completions/nothing")
    assert response.status_code == 404 and "message" in response.json()["error"]


def wait_until_idle(server, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (server.metric("internvl_kv_cache_blocks_in_use") == 0 and server.metric("internvl_num_requests_running")
                == 0 and server.metric("internvl_num_requests_unfinished") == 0):
            return
        time.sleep(0.1)
    raise AssertionError(f"still busy: {server.metrics()}")


def steps_stopped(server) -> bool:
    """No engine step runs any more (the aborted request is not computed to its end)."""
    before = server.metric("internvl_engine_steps_total")
    time.sleep(1.0)
    return server.metric("internvl_engine_steps_total") == before


LONG = dict(max_tokens=2000, temperature=0, ignore_eos=True)


def test_disconnect_in_the_middle_of_a_stream_aborts_and_frees_blocks(server):
    aborted = server.metric("internvl_requests_total", status="abort")
    body = image_body(data_url(Image.new("RGB", (640, 480), (200, 10, 10))), stream=True, **LONG)
    with httpx.stream("POST", server.api_url + "/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        contents = 0
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                contents += 1
            if contents == 3:
                break  # leave mid-stream: the connection closes
        assert server.metric("internvl_kv_cache_blocks_in_use") > 0
    wait_until_idle(server)
    assert steps_stopped(server)
    assert server.metric("internvl_requests_total", status="abort") == aborted + 1


def test_disconnect_while_waiting_for_a_non_streamed_answer_aborts(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.api_url + "/chat/completions", json=chat_body("Tell me everything.", **LONG), timeout=2.0)
    wait_until_idle(server)
    assert steps_stopped(server)


def test_full_queue_answers_503_and_recovers():
    with running_server("--model", str(checkpoint(MODELS[0])), "--served-model-name", MODEL, "--max-num-seqs", "1",
                        "--max-waiting", "1") as server, httpx.Client(timeout=60) as client:
        url = server.api_url + "/chat/completions"
        with client.stream("POST", url, json=chat_body("first", stream=True, **LONG)) as first:
            lines = first.iter_lines()
            while '"content": ""' in next(lines) or server.metric("internvl_num_requests_running") == 0:
                pass  # until the first one is running and has produced text
            with client.stream("POST", url, json=chat_body("second", stream=True, **LONG)) as second:
                assert second.status_code == 200  # queued behind the first (max_num_seqs 1)
                assert server.metric("internvl_num_requests_waiting") == 1
                rejected = client.post(url, json=chat_body("third"))
                assert rejected.status_code == 503, rejected.text
                assert rejected.headers["retry-after"] == "1"
                assert rejected.json()["error"]["code"] == "queue_full"
        wait_until_idle(server)
        answer = client.post(url, json=chat_body("fourth"))
        assert answer.status_code == 200
        assert server.metric("internvl_requests_total", status="rejected") == 1
