"""EngineConfig.device_preprocessing: the workers keep the decoded uint8 image, the engine tiles it on the model's
device when the ViT needs it. Without a GPU the "device" is the CPU and `tile_norm` runs under Triton's interpreter
(conftest sets TRITON_INTERPRET=1): pixels, cache keys and greedy tokens must equal the CPU path's."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from internvl_engine import LLM, SamplingParams, load_image
from internvl_engine.engine.input_processor import _content_hash
from internvl_engine.preprocessing.cpu import open_rgb_image, plan_tiles
from internvl_engine.preprocessing.device import (DeviceTiler, HostImage, PINNED_BYTES_LIMIT, host_image,
                                                  preprocesses_on_device)

from golden_utils import MODELS, checkpoint, image_path

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)
REQUESTS = [
    {"prompt": "<image>\nDescribe the image.", "images": [str(image_path("tiesmall175x100"))], "max_tiles": 6},
    {"prompt": "Image-1: <image>\nImage-2: <image>\nCompare them.", "max_tiles": 6,
     "images": [str(image_path("sq448")), str(image_path("tiesmall175x100"))]},  # shares an image with the first
    "Hello, who are you?",
]


def make_llm(**options) -> LLM:
    return LLM(checkpoint(MODELS[0]), dtype=torch.float32, device="cpu", backend="torch", **options)


@lru_cache(maxsize=None)
def cpu_path_tokens() -> tuple[tuple[int, ...], ...]:
    outputs = make_llm(device_preprocessing=False, max_vit_tiles_per_step=2).generate(REQUESTS, GREEDY)
    assert all(output.error is None for output in outputs)
    return tuple(tuple(output.token_ids) for output in outputs)


def test_default_is_the_cpu_path_off_cuda():
    llm = make_llm()
    prepared = llm.prepare(REQUESTS[0], GREEDY)
    assert all(isinstance(tiles, torch.Tensor) for tiles in prepared.state.pixel_values.values())
    assert preprocesses_on_device(None, torch.device("cuda"), "triton")
    assert not preprocesses_on_device(None, torch.device("cuda"), "torch")
    assert not preprocesses_on_device(None, torch.device("cpu"), "torch")
    assert preprocesses_on_device(True, torch.device("cpu"), "torch")
    assert not preprocesses_on_device(False, torch.device("cuda"), "triton")


def test_workers_keep_the_uint8_image_under_the_same_keys():
    cpu, device = make_llm(device_preprocessing=False), make_llm(device_preprocessing=True)
    for request in REQUESTS[:2]:
        on_cpu, on_device = cpu.prepare(request, GREEDY), device.prepare(request, GREEDY)
        keys = [image.content_hash for image in on_cpu.request.images]
        assert keys == [image.content_hash for image in on_device.request.images]
        assert list(on_cpu.state.pixel_values) == list(on_device.state.pixel_values)
        for key, tiles in on_cpu.state.pixel_values.items():
            image = on_device.state.pixel_values[key]
            assert isinstance(image, HostImage) and image.pixels.dtype == torch.uint8
            assert image.shape == tuple(tiles.shape)
        assert on_cpu.request.prompt_token_ids == on_device.request.prompt_token_ids


@pytest.mark.parametrize("interpreted", [True, False], ids=["tile_norm-interpreted", "tile_norm_ref"])
def test_tiles_made_on_the_device_equal_the_cpu_tiles(monkeypatch, interpreted):
    if not interpreted:  # the kernel is not available: the engine falls back to the torch twin
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu, device = make_llm(device_preprocessing=False), make_llm(device_preprocessing=True)
    request = REQUESTS[1]
    expected = cpu.prepare(request, GREEDY)
    prepared = device.prepare(request, GREEDY)
    device.submit(prepared)
    output = device.scheduler.schedule()
    assert output.tiles_to_encode
    device.vision.encode(output.tiles_to_encode, device._states)
    assert device.vision._tiler.use_triton is interpreted
    encoded = {tile_slice.image.content_hash for tile_slice in output.tiles_to_encode}
    for key in encoded:
        tiles = prepared.state.pixel_values.get(key)
        if tiles is None:  # encoded whole in this step: its features are in, its tiles dropped
            assert key in prepared.state.features
            continue
        assert isinstance(tiles, torch.Tensor) and torch.equal(tiles, expected.state.pixel_values[key])


def test_greedy_tokens_equal_the_cpu_path():
    llm = make_llm(device_preprocessing=True, max_vit_tiles_per_step=2)  # images split over steps
    outputs = llm.generate(REQUESTS, GREEDY)
    assert [output.error for output in outputs] == [None] * len(REQUESTS)
    assert tuple(tuple(output.token_ids) for output in outputs) == cpu_path_tokens()
    assert llm.vision._tiler is not None and llm.vision._tiler.use_triton
    # the shared image was tiled and encoded once: 3 tiles (2 + thumbnail) and 1
    assert llm.stats["tiles_encoded"] == 4
    again = llm.generate(REQUESTS[:1], GREEDY)  # a feature-cache hit: the content key is the CPU path's
    assert again[0].token_ids == list(cpu_path_tokens()[0]) and llm.stats["tiles_encoded"] == 4


def test_given_pixel_values_and_device_tiles_share_a_vit_step():
    """A model.chat-style request (tokens + float32 CPU tiles) and a device-tiled image in one ViT batch."""
    image_request = {"prompt": "<image>\nWhat is it?", "images": [str(image_path("sq448"))], "max_tiles": 6}
    cpu = make_llm(device_preprocessing=False)
    ids = cpu.prepare(image_request, GREEDY).request.prompt_token_ids
    reference = cpu.generate([image_request], GREEDY)[0].token_ids
    llm = make_llm(device_preprocessing=True, max_vit_tiles_per_step=16)
    tokenized = {"prompt_token_ids": ids, "pixel_values": [load_image(image_path("sq448"), max_num=6)]}
    outputs = llm.generate([tokenized, REQUESTS[0]], GREEDY)
    assert [output.error for output in outputs] == [None, None]
    assert llm.stats["tiles_encoded"] == 1 + 3
    assert outputs[0].token_ids == reference
    assert outputs[1].token_ids == list(cpu_path_tokens()[0])


def test_host_image_holds_the_packed_pixels_and_its_key_is_unchanged():
    image = open_rgb_image(image_path("gray640x480"))  # converted to RGB as the official code does
    plan = plan_tiles(image.width, image.height, 1, 6, 448, True)
    packed = image.tobytes()
    held = host_image(packed, image.width, image.height, plan, 448)
    assert held.pixels.shape == (image.height, image.width, 3) and held.pixels.is_contiguous()
    assert held.pixels.numpy().tobytes() == packed
    assert _content_hash(image, plan.num_tiles, packed) == _content_hash(image, plan.num_tiles)
    with pytest.raises(ValueError, match="bytes"):
        host_image(packed[:-1], image.width, image.height, plan, 448)
    tiles = DeviceTiler(torch.device("cpu"), torch.float32, use_triton=False).tiles([held])[0]
    assert torch.equal(tiles, load_image(image_path("gray640x480"), max_num=6))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory and streams need CUDA")
def test_cuda_upload_from_pinned_memory_and_the_pinned_budget():
    from internvl_engine.preprocessing import device as module

    image = open_rgb_image(image_path("land800x600"))
    plan = plan_tiles(image.width, image.height, 1, 6, 448, True)
    before = module._pinned_bytes
    held = host_image(image.tobytes(), image.width, image.height, plan, 448)
    assert held.pixels.is_pinned() and module._pinned_bytes == before + image.width * image.height * 3
    tiler = DeviceTiler(torch.device("cuda"), torch.bfloat16, use_triton=True)
    tiles = tiler.tiles([held, held])
    del held
    expected = load_image(image_path("land800x600"), max_num=6).to(torch.bfloat16)
    assert all(torch.equal(t.cpu(), expected) for t in tiles)
    assert module._pinned_bytes == before  # the budget came back with the tensor
    assert PINNED_BYTES_LIMIT >= 3840 * 2160 * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_engine_tiles_on_the_gpu_by_default_with_the_cpu_path_tokens():
    def engine(**options) -> LLM:
        return LLM(checkpoint(MODELS[0]), dtype=torch.float32, device="cuda", max_vit_tiles_per_step=2, **options)

    default, cpu_path = engine(), engine(device_preprocessing=False)
    prepared = default.prepare(REQUESTS[0], GREEDY)
    held = next(iter(prepared.state.pixel_values.values()))
    assert isinstance(held, HostImage) and held.pixels.is_pinned()
    expected = cpu_path.generate(REQUESTS, GREEDY)
    got = default.generate(REQUESTS, GREEDY)
    assert [output.token_ids for output in got] == [output.token_ids for output in expected]
    assert default.vision._tiler.use_triton and default.stats["vit_s"] > 0
