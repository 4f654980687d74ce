"""Bounded work per request, checked before the expensive part; and a preprocessing pool that never holds up
the engine's steps."""
from __future__ import annotations

import asyncio
import io
import struct
import threading
import zlib

import pytest
import torch
from PIL import Image, ImageFile

from internvl_engine import LLM, SamplingParams
from internvl_engine.engine.async_llm import AsyncLLM, PreprocessConfig
from internvl_engine.engine.errors import InputLimitError, PromptTooLongError, QueueFullError
from internvl_engine.preprocessing.image_io import ImageLimits, ImageTooLargeError, open_image

from golden_utils import MODELS, checkpoint

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)


def make_llm(**options) -> LLM:
    return LLM(checkpoint(MODELS[0]), dtype=torch.float32, device="cpu", backend="torch", **options)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return make_llm(max_images_per_request=3, max_prompt_chars=2000, max_model_len=2048)


def gray_strip_png(width: int, height: int, rows: int | None = None) -> bytes:
    """An 8-bit grayscale PNG (all zero) of width x height, tiny on disk, huge decoded; with `rows`, its header
    claims the size but only that many rows of data follow (openable, not decodable)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    pixels = (b"\x00" + b"\x00" * width) * (height if rows is None else rows)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(pixels, 9))
            + chunk(b"IEND", b""))


@pytest.fixture
def no_decoding(monkeypatch):
    """Fails the test if any image is decoded."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("an image was decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.parametrize("size, limit", [((1, 3_000_000), "max_image_side"), ((3_000_000, 1), "max_image_side"),
                                         ((20000, 100), "max_image_aspect_ratio"),
                                         ((12000, 10000), "max_image_pixels")])
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own warning at 89 MP
def test_degenerate_images_are_refused_from_the_header(size, limit, no_decoding):
    data = gray_strip_png(*size, rows=1)
    with pytest.raises(ImageTooLargeError) as err:
        open_image(data, ImageLimits(max_pixels=100_000_000))
    assert err.value.limit == limit and f"{size[0]}x{size[1]}" in str(err.value)


def test_limits_accept_ordinary_and_panoramic_images():
    for size in ((448, 448), (3840, 2160), (8000, 100), (100, 8000)):
        assert open_image(Image.new("RGB", size)).size == size
    assert ImageLimits(max_side=None, max_aspect_ratio=None).check(100000, 1, "x") is None


def test_a_real_strip_png_is_refused_before_decoding(llm, no_decoding):
    data = gray_strip_png(1, 40_000)  # 1 x 40,000: 80 KB of zlib, a side past the 32K limit
    with pytest.raises(ImageTooLargeError, match="max_side"):
        llm.prepare({"prompt": "<image>\nWhat?", "images": [data]}, GREEDY)


def test_too_many_images_are_refused_before_any_is_opened(llm, monkeypatch):
    import internvl_engine.engine.input_processor as processor

    monkeypatch.setattr(processor, "open_image", lambda *a, **k: pytest.fail("an image was opened"))
    image = Image.new("RGB", (64, 64))
    with pytest.raises(InputLimitError) as err:
        llm.prepare({"prompt": "<image>\n" * 4, "images": [image] * 4}, GREEDY)
    assert err.value.limit == "max_images_per_request"


def test_too_much_text_is_refused_before_tokenising(llm, monkeypatch):
    monkeypatch.setattr(llm.tokenizer, "encode", lambda *a, **k: pytest.fail("the text was tokenised"))
    with pytest.raises(InputLimitError) as err:
        llm.prepare("x" * 2001, GREEDY)
    assert err.value.limit == "max_prompt_chars"
    messages = [{"role": "user", "content": [{"type": "text", "text": "y" * 1500}]},
                {"role": "assistant", "content": "z" * 600}, {"role": "user", "content": "ok"}]
    with pytest.raises(InputLimitError):
        llm.prepare({"messages": messages}, GREEDY)


def test_a_prompt_too_long_for_the_context_is_refused_before_images_are_decoded(llm, no_decoding):
    big = io.BytesIO()
    Image.new("RGB", (1600, 1200), (10, 20, 30)).save(big, "PNG")
    request = {"prompt": "Image-1: <image>\nImage-2: <image>\nCompare.", "images": [big.getvalue()] * 2,
               "max_tiles": 12}
    with pytest.raises(PromptTooLongError, match="max_model_len 2048"):  # 2 x 13 tiles x 256 tokens > 2048
        llm.prepare(request, GREEDY)


def test_non_finite_or_out_of_vocabulary_inputs_are_refused(llm):
    hidden = llm.model.config.llm.hidden_size
    context = llm.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    ids = [1, 2] + [context] * 256 + [3]
    bad = torch.zeros(256, hidden)
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        llm.prepare({"prompt_token_ids": ids, "image_features": [bad]}, GREEDY)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.prepare({"prompt_token_ids": [1, 2, 10**9]}, GREEDY)


def test_the_preprocessing_pool_never_holds_up_running_streams():
    engine = AsyncLLM(make_llm(), PreprocessConfig(workers=1, max_pending=3, timeout_s=0.5))
    release = threading.Event()

    def blocked(request):
        release.wait(10)
        return request

    async def run():
        first = await engine.add_request("Tell me a story.", SamplingParams(max_tokens=24, temperature=0.0))
        stuck = [asyncio.ensure_future(engine.add_request("Hi", GREEDY, resolve=blocked)) for _ in range(3)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFullError):  # the pool's queue is bounded
            await engine.add_request("Hi", GREEDY)
        outputs = [o async for o in engine.stream(first)]  # the engine steps while the pool is stuck
        timed_out = await asyncio.gather(*stuck, return_exceptions=True)
        release.set()
        return outputs, timed_out

    outputs, timed_out = asyncio.run(run())
    assert outputs[-1].finish_reason in ("stop", "length") and len(outputs[-1].token_ids) >= 1
    assert all(isinstance(err, InputLimitError) and err.limit == "preprocess_timeout_s" for err in timed_out)
    for _ in range(200):  # the abandoned jobs leave the pool once released
        if engine.num_preprocessing == 0:
            break
        threading.Event().wait(0.01)
    assert engine.num_preprocessing == 0
    engine.shutdown()
