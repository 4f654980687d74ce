"""Videos in engine requests: a video is its sampled frames, named `Frame1: <image>\\n...` in the prompt and
given as images in order, each cached by content like an image; limits, bad clips and placeholders."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_engine import LLM, SamplingParams
from internvl_engine.engine.errors import PromptTooLongError
from internvl_engine.engine.input_processor import InputLimits, process_request
from internvl_engine.preprocessing.video import (OpenedVideo, VideoLoadError, VideoTooLargeError, frame_indices,
                                                 frame_prompt)

from golden_utils import MODELS, checkpoint

av = pytest.importorskip("av")

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)
FRAMES, FPS = 30, 15


def clip_bytes(frames: int = FRAMES, fps: int = FPS) -> bytes:
    """An mpeg4 clip of 128x96 frames that all differ (frame i shows i in 8 bars)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as output:
        stream = output.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        for index in range(frames):
            pixels = np.full((96, 128, 3), (40, 90, 160), np.uint8)
            for bit in range(8):
                if (index >> bit) & 1:
                    pixels[:, bit * 16:(bit + 1) * 16] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()


def sampled_frames(data: bytes, indices: list[int]) -> list[Image.Image]:
    """The frames at `indices`, decoded here on their own (PyAV, every frame in order)."""
    with av.open(io.BytesIO(data)) as container:
        frames = [Image.fromarray(frame.to_ndarray(format="rgb24")) for frame in container.decode(video=0)]
    return [frames[index] for index in indices]


@pytest.fixture(scope="module")
def clip() -> bytes:
    return clip_bytes()


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(checkpoint(MODELS[0]), dtype=torch.float32, device="cpu", backend="torch", max_model_len=8192,
               max_videos_per_request=2, max_images_per_request=3)


def process(llm: LLM, request: dict, limits: InputLimits | None = None):
    """`llm`'s processing of `request` (under `limits` instead of its own, for the frames-as-images references)."""
    return process_request(request, llm.tokenizer, llm.model.config, llm.template.name, llm.system_message,
                           limits or llm.input_limits)


def test_a_video_is_its_frames_named_in_the_prompt(llm, clip):
    """{"prompt", "videos"} == the frames as images under the model cards' Frame1: <image>\\n... prefix."""
    indices = frame_indices(FRAMES, FPS, 8)  # the model cards' rule (tests/preprocessing/test_video.py checks it)
    video = process(llm, {"prompt": "What changes?", "videos": [clip]})
    images = process(llm, {"prompt": frame_prompt(8) + "What changes?", "images": sampled_frames(clip, indices),
                           "max_tiles": 1}, InputLimits())
    assert frame_prompt(2) == "Frame1: <image>\nFrame2: <image>\n"
    assert video.prompt_token_ids == images.prompt_token_ids
    assert [span.content_hash for span in video.images] == [span.content_hash for span in images.images]
    assert [span.num_tiles for span in video.images] == [1] * 8
    # The same through messages: a video part (bytes, or vLLM's video_url with a data URL) where it stands.
    url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    for part in ({"type": "video", "video": clip}, {"type": "video_url", "video_url": {"url": url}}):
        messages = process(llm, {"messages": [{"role": "user", "content": [part, {"type": "text",
                                                                                  "text": "What changes?"}]}]})
        assert messages.prompt_token_ids == video.prompt_token_ids
        assert [span.content_hash for span in messages.images] == [span.content_hash for span in video.images]


def test_placeholders_images_and_options(llm, clip):
    picture = Image.new("RGB", (64, 64), (200, 10, 10))
    tagged = process(llm, {"prompt": "Look: <video>Is the <image> in it?", "images": [picture], "videos": [clip],
                           "num_frames": 3, "max_tiles": 1})
    explicit = process(llm, {"prompt": "Look: " + frame_prompt(3) + "Is the <image> in it?", "max_tiles": 1,
                             "images": sampled_frames(clip, frame_indices(FRAMES, FPS, 3)) + [picture]}, InputLimits())
    assert tagged.prompt_token_ids == explicit.prompt_token_ids
    assert [s.content_hash for s in tagged.images] == [s.content_hash for s in explicit.images]
    # an untagged image goes first as chat puts it, then the frames are prepended before it
    untagged = process(llm, {"prompt": "Same?", "images": [picture], "videos": [clip], "num_frames": 2})
    first = process(llm, {"prompt": frame_prompt(2) + "<image>\nSame?", "max_tiles": 1,
                          "images": sampled_frames(clip, frame_indices(FRAMES, FPS, 2)) + [picture]})
    assert untagged.prompt_token_ids == first.prompt_token_ids
    # a frame's own tile budget: 128x96 frames in 3x2 tiles + a thumbnail
    tiled = process(llm, {"prompt": "Hi", "videos": [clip], "num_frames": 2, "max_tiles_per_frame": 6})
    assert [span.num_tiles for span in tiled.images] == [7, 7]
    # a 3-frame clip sampled 8 times repeats frames: one pixel_values entry per distinct frame
    short = process(llm, {"prompt": "Hi", "videos": [clip_bytes(frames=3)]})
    assert len(short.images) == 8 and len(short.pixel_values) == 3


@pytest.mark.parametrize("request_, error, words", [
    ({"prompt": "Two", "videos": ["a.mp4", "b.mp4"]}, VideoLoadError, "<video>"),
    ({"prompt": "<video><video>", "videos": ["a.mp4"]}, VideoLoadError, "2 <video> tag"),
    ({"prompt": "<video><video><video>", "videos": ["a.mp4"] * 3}, VideoTooLargeError, "max_videos_per_request"),
    ({"prompt": "Hi", "videos": ["a.mp4"], "num_frames": 65}, VideoTooLargeError, "max_video_frames"),
    ({"prompt": "Hi", "videos": ["a.mp4"], "num_frames": 0}, VideoLoadError, "num_frames"),
    ({"prompt": "Hi", "videos": ["a.mp4"], "max_tiles_per_frame": 41}, VideoLoadError, "max_tiles_per_frame"),
    ({"prompt": "Hi", "videos": "a.mp4"}, VideoLoadError, "list"),
    ({"prompt": "Hi", "videos": ["missing.mp4"]}, VideoLoadError, "video 1: video file not found"),
    ({"prompt": "Hi", "videos": ["https://example.com/a.mp4"]}, VideoLoadError, "not fetched"),
    ({"prompt": "Hi", "videos": [b"not a video at all" * 20]}, VideoLoadError, "video 1: .*not a video"),
])
def test_bad_video_requests_are_clear_errors(llm, request_, error, words):
    with pytest.raises(error, match=words):
        process(llm, request_)


def test_frames_are_not_counted_as_images(llm, clip):
    picture = Image.new("RGB", (32, 32))
    processed = process(llm, {"prompt": "<image><image><image><video>", "images": [picture] * 3, "videos": [clip]})
    assert len(processed.images) == 3 + 8


def test_limits_are_refused_before_decoding(clip, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("a frame was decoded")

    monkeypatch.setattr(OpenedVideo, "frame", no_decoding)
    short = clip_bytes(frames=FRAMES // 2)  # 1 s
    engine = LLM(checkpoint(MODELS[0]), dtype=torch.float32, device="cpu", backend="torch", max_model_len=2048,
                 max_video_bytes=len(short), max_video_duration_s=1.5)
    for request, limit in (({"prompt": "Hi", "videos": [clip]}, "max_video_bytes"),
                           ({"prompt": "Hi", "videos": [clip_bytes(frames=10, fps=4)]}, "max_video_duration_s")):
        with pytest.raises(VideoTooLargeError) as err:
            engine.prepare(request, GREEDY)
        assert err.value.limit == limit and str(err.value).startswith("video 1: ")
    with pytest.raises(PromptTooLongError):  # 8 frames would fit, 16 do not: refused before a frame is decoded
        engine.prepare({"prompt": "Hi", "videos": [short], "num_frames": 16}, GREEDY)


def test_a_repeated_clip_costs_no_vit_work_and_bad_clips_fail_alone(llm, clip):
    first = llm.generate([{"prompt": "Describe the video.", "videos": [clip]}], GREEDY)[0]
    encoded = llm.stats["tiles_encoded"]
    hits = llm.feature_cache.hits
    assert first.error is None and encoded >= 8
    # Other text before the same clip: a new prefix, so its KV is recomputed, but every frame's features are cached.
    again = llm.generate([{"prompt": "Now: <video>What happens?", "videos": [clip]}], GREEDY)[0]
    assert again.error is None and llm.stats["tiles_encoded"] == encoded
    assert llm.feature_cache.hits - hits == 8
    truncated = clip[: len(clip) // 2]
    outputs = llm.generate([{"prompt": "Hi", "videos": [truncated]},
                            {"prompt": "Hi", "videos": [clip], "num_frames": 99},
                            {"prompt": "Describe the video.", "videos": [clip]}], [GREEDY] * 3)
    assert "video 1" in outputs[0].error and "max_video_frames" in outputs[1].error
    assert outputs[2].error is None and outputs[2].token_ids == first.token_ids
    assert llm.block_manager.num_free_blocks == llm.runner.num_blocks
