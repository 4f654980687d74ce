"""Resize + crop + normalise kernel vs `load_image` (Pillow) and its torch integer twin, bit for bit.

The algorithm does not depend on the tile size, so the sweep uses S = 28 (tiny tiles run fast under the
interpreter); a few cases use the real S = 448.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_engine.preprocessing.cpu import load_image, normalization_lut
from internvl_engine.preprocessing.resize import pillow_resizes_vertically_first
from internvl_engine.preprocessing.tiling import TilePlan, plan_tiles
from internvl_engine.kernels.pil_resample import pass_tables, pil_resize_ref, resize_passes
from internvl_engine.kernels.tile_norm import tile_norm, tile_norm_bytes, tile_norm_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# No tl.dot and no cast in the kernel (the table is cast on the host), so bf16 runs under the interpreter.
DTYPES = [torch.float16, torch.float32, torch.bfloat16]


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """RGB noise with saturated bands (0 / 255 steps make bicubic overshoot, exercising the clipping)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[::3] = np.where(pixels[::3] > 127, 255, 0).astype(np.uint8)
    return Image.fromarray(pixels)


def to_device(image: Image.Image) -> torch.Tensor:
    """The host side of the device path: PIL's convert('RGB'), then the uint8 [H, W, 3] pixels uploaded."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).to(DEVICE)


def check(image: Image.Image, size: int, max_num: int, min_num: int = 1) -> torch.Tensor:
    """tile_norm == tile_norm_ref == load_image, all float32 bits; returns the kernel's output."""
    pixels = to_device(image)
    plan = plan_tiles(image.width, image.height, min_num, max_num, size, True)
    expected = load_image(image, input_size=size, max_num=max_num, min_num=min_num, workers=1)
    ref = tile_norm_ref(pixels, plan, size)
    out = tile_norm(pixels, plan, size)
    assert out.shape == (plan.num_tiles, 3, size, size) and out.dtype == torch.float32
    assert out.device == pixels.device and out.is_contiguous()
    assert torch.equal(ref.cpu(), expected), (ref.cpu() - expected).abs().max()
    assert torch.equal(out, ref), (out - ref).abs().max()
    return out


# (width, height, max_num) at S = 28, and what each one covers.
SWEEP = [
    (1, 1, 12),    # 1 tile, no thumbnail, both axes up from one pixel
    (2, 3, 12),    # 2x3 grid + thumbnail from 6 pixels
    (3, 2, 6),
    (30, 200, 12),  # tall: 1x7 grid; thumbnail shrinks the height far more (vertical first)
    (200, 30, 12),  # wide: 7x1 grid; horizontal first
    (175, 100, 6),  # aspect tie (2,1) vs (3,2): at S = 28 the image is big enough for (3,2)
    (40, 30, 12),   # 4x3 = 12 tiles + thumbnail
    (60, 50, 40),   # 6x5 = 30 tiles + thumbnail
    (28, 56, 12),   # grid 1x2 is a same-size copy; thumbnail is a vertical pass only
    (56, 28, 12),   # grid 2x1 copy; thumbnail horizontal only
]


@pytest.mark.parametrize("width,height,max_num", SWEEP, ids=[f"{w}x{h}-max{m}" for w, h, m in SWEEP])
def test_matches_load_image(width: int, height: int, max_num: int) -> None:
    check(noise_image(width, height, seed=width * 1000 + height), 28, max_num)


# One tile (max_num=1): the image is resized to exactly 28 x 28, so the sizes pick each pass case.
SINGLE = [
    (40, 40),  # both down, horizontal first
    (30, 60),  # height loses far more than width: vertical first
    (20, 40),  # width up, height down: vertical first
    (40, 20),  # width down, height up: horizontal first
    (10, 12),  # both up: horizontal first
    (28, 60),  # width kept: vertical pass only
    (28, 10),  # vertical upscale only
    (60, 28),  # horizontal pass only
    (10, 28),  # horizontal upscale only
    (28, 28),  # same size: Pillow copies
    (333, 29),  # ~12x horizontal downscale (49-tap rows), height down by one
]


@pytest.mark.parametrize("width,height", SINGLE, ids=[f"{w}x{h}" for w, h in SINGLE])
def test_single_tile_pass_cases(width: int, height: int) -> None:
    check(noise_image(width, height, seed=width + 7 * height), 28, 1)


def test_pass_order_cases_are_both_covered() -> None:
    """The sweep really reaches both of Pillow 13's orders and both single-pass cases."""
    orders = {pillow_resizes_vertically_first(w, h, 28, 28) for w, h in SINGLE if w != 28 and h != 28}
    assert orders == {True, False}
    assert [len(resize_passes(w, h, 28, 28)) for w, h in ((28, 60), (60, 28), (28, 28))] == [1, 1, 0]


def test_copy_thumbnail_with_min_num() -> None:
    """A 28 x 28 image forced to 2 tiles: the thumbnail is a same-size copy, the grid one pass."""
    check(noise_image(28, 28, seed=5), 28, 4, min_num=2)


MODES = ["1", "L", "LA", "P", "RGBA", "CMYK", "I;16"]


@pytest.mark.parametrize("mode", MODES)
def test_pil_modes(mode: str) -> None:
    """Any mode is converted on the host exactly as load_image does, then the kernel matches it."""
    rgb = noise_image(45, 33, seed=11)
    if mode == "I;16":
        levels = np.asarray(rgb.convert("L")).astype("<u2") * 257  # 16-bit little-endian samples
        image = Image.frombytes("I;16", rgb.size, levels.tobytes())
    elif mode in ("LA", "RGBA"):
        image = rgb.convert("RGBA").convert(mode)
        image.putalpha(Image.fromarray(np.asarray(rgb)[:, :, 0]))
    else:
        image = rgb.convert(mode)
    assert image.mode == mode
    check(image, 28, 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_output_dtypes(dtype: torch.dtype) -> None:
    """fp16 / bf16 outputs are the float32 result cast by torch (round to nearest): the table is cast on
    the host, so the kernel's error against float32 is exactly torch's."""
    image = noise_image(50, 35, seed=3)
    pixels = to_device(image)
    plan = plan_tiles(50, 35, 1, 6, 28, True)
    ref32 = tile_norm_ref(pixels, plan, 28)
    ref_lowp = tile_norm_ref(pixels, plan, 28, out_dtype=dtype)
    out = tile_norm(pixels, plan, 28, out_dtype=dtype)
    assert out.dtype == dtype
    assert torch.equal(out, ref_lowp) and torch.equal(ref_lowp, ref32.to(dtype))
    err_kernel = (out.float() - ref32).abs().max().item()
    err_torch = (ref_lowp.float() - ref32).abs().max().item()
    assert err_kernel <= 2 * err_torch + 1e-6


def test_strided_input_and_custom_normalisation() -> None:
    """A cropped view of a bigger image (row stride != width * 3) and a non-ImageNet mean/std."""
    big = to_device(noise_image(90, 70, seed=9))
    view = big[5:52, 7:80]  # [47, 73, 3], not contiguous
    assert not view.is_contiguous()
    plan = plan_tiles(73, 47, 1, 6, 28, True)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.25, 0.125)
    out = tile_norm(view, plan, 28, mean=mean, std=std)
    assert torch.equal(out, tile_norm_ref(view.contiguous(), plan, 28, mean=mean, std=std))
    default = tile_norm(view.contiguous(), plan, 28)
    lut = normalization_lut(mean, std).to(out.device)
    back = normalization_lut().to(out.device)
    # Same bytes under both tables: invert the default table and look the bytes up in the custom one.
    bytes_ = torch.stack([torch.searchsorted(back[c], default[:, c].contiguous()) for c in range(3)], 1)
    assert torch.equal(out, torch.stack([lut[c][bytes_[:, c]] for c in range(3)], 1))


def test_resize_ref_matches_pillow_random_sizes() -> None:
    """The integer tables and the torch passes against Image.resize on random sizes, up and down."""
    rng = np.random.default_rng(0)
    for case in range(40):
        width, height = (int(v) for v in rng.integers(1, 120, 2))
        out_w, out_h = (int(v) for v in rng.integers(1, 150, 2))
        image = noise_image(width, height, seed=case)
        expected = np.asarray(image.resize((out_w, out_h), Image.Resampling.BICUBIC))
        got = pil_resize_ref(torch.from_numpy(np.asarray(image).copy()), out_w, out_h).numpy()
        assert np.array_equal(got, expected), (width, height, out_w, out_h)


def test_tables_layout() -> None:
    """Pillow's layout: ksize = ceil(support) * 2 + 1 taps, zeros past each count, weights sum to 2**22
    (up to one rounding unit per tap)."""
    bounds, coeffs = pass_tables(1000, 28)  # scale 35.7: support 71.4, ksize 145
    assert coeffs.shape == (28, 145) and bounds.shape == (28, 2)
    counts = bounds[:, 1]
    assert int(counts.max()) <= 145 and int(bounds[:, 0].min()) == 0
    assert int((bounds[:, 0] + counts).max()) == 1000
    taps = torch.arange(145)[None]
    assert torch.all(coeffs[taps >= counts[:, None]] == 0)
    assert torch.all((coeffs.sum(1) - (1 << 22)).abs() <= counts)


def test_bytes_formula() -> None:
    plan = TilePlan(cols=1, rows=1, thumbnail=False, num_tiles=1)
    assert tile_norm_bytes(height=28, width=28, plan=plan, image_size=28) == 28 * 28 * 3 + 3 * 28 * 28 * 4  # a copy: no intermediate
    plan = plan_tiles(30, 20, 1, 6, 28, True)  # grid 3x2 (up, horizontal first: mid 20 x 84) + thumbnail
    mid_grid = 20 * 84 * 3
    mid_thumb = 20 * 28 * 3  # 30x20 -> 28x28: horizontal first
    assert tile_norm_bytes(height=20, width=30, plan=plan, image_size=28, out_dtype=torch.bfloat16) == (
        2 * 30 * 20 * 3 + 7 * 3 * 28 * 28 * 2 + 2 * (mid_grid + mid_thumb))


def test_rejects_bad_arguments() -> None:
    pixels = to_device(noise_image(10, 8))
    plan = plan_tiles(10, 8, 1, 4, 28, True)
    with pytest.raises(ValueError, match="uint8"):
        tile_norm(pixels.float(), plan, 28)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        tile_norm(pixels[..., :2], plan, 28)
    with pytest.raises(ValueError, match="inconsistent plan"):
        tile_norm(pixels, TilePlan(cols=2, rows=1, thumbnail=True, num_tiles=2), 28)
    with pytest.raises(ValueError, match="out_dtype"):
        tile_norm(pixels, plan, 28, out_dtype=torch.float64)
    with pytest.raises(ValueError, match="image_size"):
        tile_norm_ref(pixels, plan, 0)
    with pytest.raises(ValueError, match="TilePlan"):
        tile_norm(pixels, (1, 1), 28)


# The real tile size: a near-identity resize in both directions, and the aspect tie going the other way.
@pytest.mark.slow
@pytest.mark.parametrize("width,height,max_num", [(447, 449, 12), (175, 100, 6)])
def test_real_tile_size(width: int, height: int, max_num: int) -> None:
    out = check(noise_image(width, height, seed=1), 448, max_num)
    if (width, height) == (175, 100):  # too small for (3,2) at S = 448: (2,1) + thumbnail
        assert out.shape[0] == 3


@pytest.mark.slow
def test_real_tile_size_downscale_grid() -> None:
    """900 x 620 -> 3x2 grid of 448 tiles (1344 x 896: both up) and a ~2x-down thumbnail."""
    check(noise_image(900, 620, seed=2), 448, 6)
