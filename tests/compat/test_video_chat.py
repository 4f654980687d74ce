"""A video through the model card's `chat`: load_video's frames as several images, `Frame1: <image>\\n...` in the
question and one num_patches_list entry per frame, then a follow-up turn; the engine's "videos" request builds
the same prompt and gets the same answer."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from internvl_engine import LLM, AutoModel, AutoTokenizer, SamplingParams, load_video

from golden_utils import MODELS, checkpoint

av = pytest.importorskip("av")

V15 = MODELS[0]
GREEDY = dict(max_new_tokens=6, do_sample=False)


def clip_bytes(frames: int = 40, fps: int = 20) -> bytes:
    """An mpeg4 clip whose frames differ (a moving bar over a gradient), so every sampled frame is its own image."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as output:
        stream = output.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        ramp = np.linspace(0, 255, 160, dtype=np.uint8)
        for index in range(frames):
            pixels = np.stack([np.tile(ramp, (120, 1))] * 3, axis=-1)
            pixels[:, (index * 4) % 160:(index * 4) % 160 + 8] = (255, 0, 0)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def loaded():
    model = AutoModel.from_pretrained(checkpoint(V15), torch_dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(checkpoint(V15))


@pytest.fixture(scope="module")
def clip() -> bytes:
    return clip_bytes()


@pytest.mark.parametrize("num_frames", [8, pytest.param(32, marks=pytest.mark.slow)])  # 32: 8K-token prompts
def test_chat_takes_a_video_as_its_frames(loaded, clip, num_frames):
    model, tok = loaded
    # The official chat has no image-count limit, and neither has the engine behind it (32 frames > the default 16)
    pixel_values, num_patches_list = load_video(clip, num_segments=num_frames, max_num=1)
    assert num_patches_list == [1] * num_frames and pixel_values.shape[0] == num_frames
    video_prefix = "".join(f"Frame{i + 1}: <image>\n" for i in range(len(num_patches_list)))
    question = video_prefix + "What is the red bar doing?"
    response, history = model.chat(tok, pixel_values, question, GREEDY, num_patches_list=num_patches_list,
                                   history=None, return_history=True)
    assert isinstance(response, str) and history == [(question, response)]
    follow_up, history = model.chat(tok, pixel_values, "Describe this video in detail.", GREEDY,
                                    num_patches_list=num_patches_list, history=history, return_history=True)
    assert isinstance(follow_up, str) and len(history) == 2

    # The engine's video request: the same frames, the same prompt, the same greedy answer.
    llm = LLM(checkpoint(V15), dtype=torch.float32, device="cpu", backend="torch")
    output = llm.generate([{"prompt": "What is the red bar doing?", "videos": [clip], "num_frames": num_frames}],
                          SamplingParams(max_tokens=GREEDY["max_new_tokens"], temperature=0.0))[0]
    assert output.error is None and output.text == response
    assert output.num_image_tiles == num_frames


def test_frames_and_tiles_must_agree(loaded, clip):
    model, tok = loaded
    pixel_values, num_patches_list = load_video(clip, num_segments=4)
    with pytest.raises(ValueError, match="<image>"):  # one tag for four frames
        model.chat(tok, pixel_values, "Frame1: <image>\nWhat happens?", GREEDY, num_patches_list=num_patches_list)
    with pytest.raises(ValueError, match="num_patches_list"):
        model.chat(tok, pixel_values, "<image>\n" * 3 + "What happens?", GREEDY, num_patches_list=[1, 1, 1])
