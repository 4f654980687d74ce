"""Videos through the OpenAI API: vLLM's `video_url` parts (data URLs, allowed local files) with num_frames and
max_tiles_per_frame; a bad or oversized video is a 400/413 naming the problem or the flag, and the server keeps
serving."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest

from internvl_engine.server.errors import APIError
from internvl_engine.server.media import MediaPolicy, resolve_messages, resolve_video
from internvl_engine.server.protocol import RequestLimits, parse_chat_request

from golden_utils import MODELS, checkpoint
from server_utils import post_json, running_server

av = pytest.importorskip("av")

MODEL = "tiny"
MAX_VIDEO_BYTES = 60_000
LIMITS = RequestLimits(vocab_size=1000, max_tiles=40, max_videos_per_request=2, max_video_frames=16)


def clip_bytes(frames: int = 30, fps: int = 15, noise: bool = False) -> bytes:
    """An mpeg4 clip of 128x96 frames that differ (a moving bar); `noise`: random pixels, hard to compress."""
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    with av.open(buffer, "w", format="mp4") as output:
        stream = output.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        for index in range(frames):
            pixels = (rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) if noise
                      else np.full((96, 128, 3), 30, np.uint8))
            pixels[:, (index * 4) % 120:(index * 4) % 120 + 8] = (250, 20, 20)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()


def video_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def video_body(*urls: str, text: str = "What happens in the video?", **fields) -> dict:
    content = [{"type": "video_url", "video_url": {"url": url}} for url in urls] + [{"type": "text", "text": text}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 3, **fields}


# ---- parsing and media policy (no server) ----
def test_video_parts_carry_the_frame_options_to_the_engine():
    url = video_url(b"\x00\x00\x00\x18ftypmp42")
    chat = parse_chat_request(video_body(url, num_frames=4, max_tiles_per_frame=2), (MODEL,), LIMITS)
    part = chat.messages[0]["content"][0]
    assert part == {"type": "video_url", "video_url": {"url": url}, "num_frames": 4, "max_tiles_per_frame": 2}
    resolved = resolve_messages(chat.messages, MediaPolicy())
    assert resolved[0]["content"][0] == {"type": "video", "video": b"\x00\x00\x00\x18ftypmp42", "num_frames": 4,
                                         "max_tiles_per_frame": 2}
    assert parse_chat_request(video_body(url), (MODEL,), LIMITS).messages[0]["content"][0] == \
        {"type": "video_url", "video_url": {"url": url}}  # no options: the engine's defaults (8 frames, 1 tile)


@pytest.mark.parametrize("body, status, param, words", [
    (video_body("x", num_frames=17), 413, "num_frames", "--max-video-frames"),
    (video_body("x", "y", "z"), 413, "messages", "--max-videos-per-request"),
    (video_body("x", num_frames=0), 400, "num_frames", "num_frames"),
    (video_body("x", num_frames=True), 400, "num_frames", "num_frames"),
    (video_body("x", max_tiles_per_frame=41), 400, "max_tiles_per_frame", "max_tiles_per_frame"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": "data:,"}]}]},
     400, "messages[0].content[0].video_url", "must be an object"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "video_url", "video_url": {"url": "x"}}]}]}, 400, "messages[1].content[0]", "only in user messages"),
])
def test_bad_video_fields_name_the_parameter_or_flag(body, status, param, words):
    with pytest.raises(APIError) as err:
        parse_chat_request(body, (MODEL,), LIMITS)
    assert err.value.status == status and err.value.param == param and words in err.value.message


def test_video_urls_follow_the_media_policy(tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"clip")
    policy = MediaPolicy(allowed_local_media_path=tmp_path, max_video_bytes=8)
    assert resolve_video((tmp_path / "clip.mp4").as_uri(), policy) == b"clip"
    assert resolve_video(video_url(b"12345678"), policy) == b"12345678"
    for url, status, words in [(video_url(b"123456789"), 413, "--max-video-bytes"),
                               ("data:video/mp4;base64,!!!", 400, "base64"),
                               ("https://example.com/a.mp4", 400, "not fetched"),
                               ("file:///etc/hostname", 400, "outside the allowed media folder"),
                               ("ftp://host/a.mp4", 400, "unsupported video URL scheme")]:
        with pytest.raises(APIError) as err:
            resolve_video(url, policy)
        assert err.value.status == status and words in err.value.message, err.value.message
    (tmp_path / "big.mp4").write_bytes(b"0123456789")
    with pytest.raises(APIError, match="--max-video-bytes") as err:
        resolve_video(str(tmp_path / "big.mp4"), policy)
    assert err.value.code == "video_too_large"


# ---- a live server ----
@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    (folder / "clip.mp4").write_bytes(clip_bytes())
    return folder


@pytest.fixture(scope="module")
def server(media_dir):
    with running_server("--model", str(checkpoint(MODELS[0])), "--served-model-name", MODEL,
                        "--max-video-bytes", str(MAX_VIDEO_BYTES), "--max-video-frames", "16",
                        "--max-videos-per-request", "2", "--max-video-duration-s", "5",
                        "--max-video-side", "1024", "--allowed-local-media-path", str(media_dir)) as running:
        yield running


def test_a_video_url_is_answered_and_a_repeated_clip_costs_no_vit_work(server):
    clip = video_url(clip_bytes())
    got, answer = post_json(server.api_url + "/chat/completions", video_body(clip, num_frames=4))
    assert got == 200, answer
    assert answer["usage"]["image_tiles"] == 4 and answer["choices"][0]["finish_reason"] in ("stop", "length")
    encoded = server.metric("internvl_vit_tiles_encoded_total")
    got, answer = post_json(server.api_url + "/chat/completions",
                            video_body(clip, text="Describe it.", num_frames=4))
    assert got == 200 and server.metric("internvl_vit_tiles_encoded_total") == encoded
    got, answer = post_json(server.api_url + "/chat/completions", video_body(clip, max_tiles_per_frame=6))
    assert got == 200 and answer["usage"]["image_tiles"] == 8 * 7  # 3x2 tiles + a thumbnail per frame


def test_a_local_video_inside_the_allowed_folder(server, media_dir):
    got, answer = post_json(server.api_url + "/chat/completions",
                            video_body((media_dir / "clip.mp4").as_uri(), num_frames=2))
    assert got == 200 and answer["usage"]["image_tiles"] == 2


BAD_VIDEOS = {
    "not a video": (lambda: video_body(video_url(b"hello, world" * 100)), 400, "invalid_video", "not a video"),
    "truncated": (lambda: video_body(video_url(clip_bytes()[:2000])), 400, "invalid_video", "video 1"),
    "bad base64": (lambda: video_body("data:video/mp4;base64,!!!"), 400, "invalid_video", "base64"),
    "over --max-video-bytes": (lambda: video_body(video_url(clip_bytes(frames=40, noise=True))), 413,
                               "video_too_large", "--max-video-bytes"),
    "over --max-video-duration-s": (lambda: video_body(video_url(clip_bytes(frames=12, fps=2))), 413,
                                    "video_too_large", "--max-video-duration-s"),
    "over --max-video-frames": (lambda: video_body(video_url(clip_bytes()), num_frames=17), 413, "limit_exceeded",
                                "--max-video-frames"),
    "http url": (lambda: video_body("https://example.com/a.mp4"), 400, "invalid_video", "not fetched"),
}


@pytest.mark.parametrize("name", list(BAD_VIDEOS))
def test_a_bad_video_gets_its_status_and_the_server_keeps_serving(server, name):
    make_body, status, code, words = BAD_VIDEOS[name]
    body = make_body()
    got, answer = post_json(server.api_url + "/chat/completions", body)
    assert got == status, answer
    assert answer["error"]["code"] == code and words in answer["error"]["message"], answer
    got, answer = post_json(server.api_url + "/chat/completions", video_body(video_url(clip_bytes()), num_frames=2))
    assert got == 200 and answer["usage"]["image_tiles"] == 2
    assert server.process.poll() is None
