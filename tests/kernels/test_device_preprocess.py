"""`load_image_on_device` (uint8 upload + tile normalisation on the device) equals `load_image` bit for bit."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from internvl_engine import ImageLoadError, load_image
from internvl_engine.preprocessing.device import DeviceTiler, host_image, load_image_on_device
from internvl_engine.preprocessing.tiling import plan_tiles

from golden_utils import image_path


@pytest.mark.parametrize("backend,name,max_num", [("torch", "tiesmall175x100", 6), ("torch", "tall300x1200", 6),
                                                  pytest.param("triton", "tiesmall175x100", 6,
                                                               marks=pytest.mark.slow)])
def test_matches_load_image_bit_for_bit(backend, name, max_num):
    expected = load_image(image_path(name), max_num=max_num)
    got = load_image_on_device(image_path(name), "cpu", max_num=max_num, backend=backend)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(got, expected)


def test_small_tiles_with_triton_and_other_dtypes():
    image = Image.new("RGB", (37, 23), (200, 30, 90))
    expected = load_image(image, input_size=28, max_num=4)
    got = load_image_on_device(image, "cpu", input_size=28, max_num=4, backend="triton")
    assert torch.equal(got, expected)
    half = load_image_on_device(image, "cpu", input_size=28, max_num=4, backend="torch", dtype=torch.float16)
    assert torch.equal(half, expected.to(torch.float16))


def test_bad_inputs(tmp_path):
    with pytest.raises(ImageLoadError, match="max_num"):
        load_image_on_device(image_path("sq448"), "cpu", max_num=0)
    with pytest.raises(ImageLoadError, match="not found"):
        load_image_on_device(tmp_path / "missing.png", "cpu")
    with pytest.raises(ValueError, match="backend"):
        load_image_on_device(image_path("sq448"), "cpu", backend="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_tiler_matches_load_image(dtype):
    """The engine's path: host_image (the workers' uint8 copy) -> DeviceTiler (upload + tile_norm), several images
    in one call, in the model's dtype: load_image's tiles cast by torch."""
    images = [Image.new("RGB", (37, 23), (200, 30, 90)), Image.effect_mandelbrot((50, 61), (-2, -1.5, 1, 1.5), 40)]
    held, expected = [], []
    for image in images:
        rgb = image.convert("RGB")
        plan = plan_tiles(rgb.width, rgb.height, 1, 6, 28, True)
        held.append(host_image(rgb.tobytes(), rgb.width, rgb.height, plan, 28))
        expected.append(load_image(rgb, input_size=28, max_num=6).to(dtype))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for use_triton in (True, False):
        tiles = DeviceTiler(device, dtype, use_triton).tiles(held)
        assert [t.dtype for t in tiles] == [dtype] * len(images)
        assert all(torch.equal(t.cpu(), e) for t, e in zip(tiles, expected))
