"""Image preprocessing against the official recipe: goldens, tiling plans, PIL modes, bad inputs."""
from __future__ import annotations

import functools
import hashlib
import io
import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_engine.preprocessing import cpu as image_processor
from internvl_engine.preprocessing.cpu import (ImageLoadError, TilePlan, candidate_grids, dynamic_preprocess,
                                             image_to_pixel_values, load_image, plan_tiles)
from internvl_engine.preprocessing.resize import resize_tiles, split_resize_is_exact

from golden_utils import goldens_dir

GOLDENS = goldens_dir()
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _golden_params() -> list:
    """One param per preprocess.json case; the 4K images at max_num 40 (29 and 41 tiles) are slow."""
    cases = json.loads((GOLDENS / "preprocess.json").read_text())["cases"]
    params = []
    for name, case in cases.items():
        width, height = case["orig_size_wh"]
        slow = width * height >= 8_000_000 and case["max_num"] == 40
        params.append(pytest.param(name, id=name, marks=[pytest.mark.slow] if slow else []))
    return params


@pytest.fixture(scope="module")
def goldens() -> dict:
    return {"preprocess": json.loads((GOLDENS / "preprocess.json").read_text()),
            "images": json.loads((GOLDENS / "images.json").read_text())["images"]}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def official_grid(width: int, height: int, min_num: int, max_num: int, image_size: int,
                  candidates: dict) -> tuple[int, int]:
    """The official candidate loop and tie rule, written out plainly as an independent oracle."""
    key = (min_num, max_num)
    if key not in candidates:
        grids = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1)
                    for j in range(1, n + 1) if min_num <= i * j <= max_num)
        candidates[key] = sorted(grids, key=lambda grid: grid[0] * grid[1])
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidates[key]:
        diff = abs(width / height - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def official_pixel_values(image: Image.Image, max_num: int, image_size: int = 448) -> torch.Tensor:
    """The official recipe, naively: convert('RGB'), resize, PIL crops, per tile ToTensor + Normalize."""
    rgb = image.convert("RGB")
    cols, rows = official_grid(rgb.width, rgb.height, 1, max_num, image_size, {})
    resized = rgb.resize((image_size * cols, image_size * rows), Image.Resampling.BICUBIC)
    tiles = [resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
             for r in range(rows) for c in range(cols)]
    if cols * rows > 1:
        tiles.append(rgb.resize((image_size, image_size), Image.Resampling.BICUBIC))
    mean = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(3, 1, 1)
    return torch.stack([(torch.from_numpy(np.array(tile)).permute(2, 0, 1).float() / 255 - mean) / std
                        for tile in tiles])


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, followed by a bogus IDAT: openable, not decodable."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"\x00" * 16) + chunk(b"IEND", b"")


# --- goldens -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_num", [6, 12, 40])
def test_candidate_order_matches_official(goldens: dict, max_num: int) -> None:
    expected = [tuple(grid) for grid in goldens["preprocess"]["target_ratio_order"][str(max_num)]]
    assert list(candidate_grids(1, max_num)) == expected


@pytest.mark.parametrize("case_name", _golden_params())
def test_golden_case(goldens: dict, case_name: str) -> None:
    case = goldens["preprocess"]["cases"][case_name]
    path = GOLDENS / goldens["images"][case["image"]]["file"]
    plan = plan_tiles(*case["orig_size_wh"], 1, case["max_num"], 448, True)
    assert [plan.cols, plan.rows] == case["grid_cols_rows"]
    assert plan.thumbnail == case["thumbnail_appended"]
    assert plan.num_tiles == case["num_tiles"]

    tiles = dynamic_preprocess(Image.open(path).convert("RGB"), max_num=case["max_num"], use_thumbnail=True)
    assert [_sha256(tile.tobytes()) for tile in tiles] == case["tile_rgb_uint8_sha256"]

    pixel_values = load_image(path, max_num=case["max_num"])
    assert list(pixel_values.shape) == case["pixel_values_shape"]
    assert pixel_values.dtype == torch.float32 and pixel_values.is_contiguous()
    assert _sha256(pixel_values.numpy().tobytes()) == case["pixel_values_fp32_sha256"]


# --- tiling plans --------------------------------------------------------------------------------------

SIDES = [1, 2, 3, 7, 20, 30, 100, 175, 200, 300, 447, 448, 449, 600, 700, 800, 896, 1000, 1080, 1200,
         1344, 1750, 1920, 2160, 2560, 3840, 4096, 5000, 10000]


@pytest.mark.parametrize("min_num, max_num", [(1, 1), (1, 2), (1, 6), (1, 12), (1, 40), (3, 6), (3, 12), (2, 40)])
def test_plan_matches_official_loop(min_num: int, max_num: int) -> None:
    candidates: dict = {}
    for width in SIDES:
        for height in SIDES:
            cols, rows = official_grid(width, height, min_num, max_num, 448, candidates)
            for use_thumbnail in (False, True):
                plan = plan_tiles(width, height, min_num, max_num, 448, use_thumbnail)
                assert (plan.cols, plan.rows) == (cols, rows), (width, height)
                assert plan.thumbnail == (use_thumbnail and cols * rows > 1)
                assert min_num <= cols * rows <= max_num
                assert plan.num_tiles == cols * rows + plan.thumbnail <= max_num + 1


def test_plan_ties_and_small_tiles() -> None:
    # 1750x1000 and 175x100 tie between 7:4 and lower-area grids; the area rule decides.
    assert plan_tiles(1750, 1000, 1, 40, 448, True) == TilePlan(7, 4, True, 29)
    assert plan_tiles(175, 100, 1, 12, 448, True) == TilePlan(2, 1, True, 3)
    assert plan_tiles(448, 448, 1, 12, 448, True) == TilePlan(1, 1, False, 1)
    small_tiles = plan_tiles(100, 100, 1, 12, 16, False)
    assert (small_tiles.cols, small_tiles.rows) == official_grid(100, 100, 1, 12, 16, {}) == (3, 3)
    with pytest.raises(AttributeError):
        plan_tiles(448, 448).cols = 2  # frozen


def test_dynamic_preprocess_tiles_row_major() -> None:
    image = noise_image(900, 450)
    tiles = dynamic_preprocess(image, max_num=6, image_size=448, use_thumbnail=True)
    assert len(tiles) == 3 and all(tile.size == (448, 448) for tile in tiles)
    resized = np.asarray(image.resize((896, 448), Image.Resampling.BICUBIC))
    assert np.array_equal(np.asarray(tiles[1]), resized[:, 448:])
    assert np.array_equal(np.asarray(tiles[2]), np.asarray(image.resize((448, 448), Image.Resampling.BICUBIC)))
    assert len(dynamic_preprocess(image, max_num=6, use_thumbnail=False)) == 2


# --- pixel values --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _mode_images() -> dict[str, Image.Image]:
    """One 500x300 image per PIL mode (the tests only read them)."""
    rng = np.random.default_rng(1)
    rgb = noise_image(500, 300, seed=1)
    rgba = Image.fromarray(rng.integers(0, 256, (300, 500, 4), dtype=np.uint8))
    images = {mode: rgb.convert(mode) for mode in ("1", "L", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV",
                                                   "RGBX", "I;16B")}
    images.update({mode: rgba.convert(mode) for mode in ("LA", "PA", "RGBA", "RGBa")})
    images["I"] = Image.fromarray(rng.integers(-300, 600, (300, 500), dtype=np.int32))
    images["I;16"] = Image.fromarray(rng.integers(0, 65536, (300, 500), dtype=np.uint16))
    images["F"] = Image.fromarray((rng.random((300, 500), dtype=np.float32) * 400 - 50))
    palette = rgb.convert("P")
    palette.info["transparency"] = 3
    images["P+transparency"] = palette
    return images


@pytest.mark.parametrize("mode", list(_mode_images()))
def test_every_pil_mode_matches_official(mode: str) -> None:
    image = _mode_images()[mode]
    expected = official_pixel_values(image, max_num=6)
    assert expected.shape[0] > 1  # a grid plus a thumbnail
    assert torch.equal(load_image(image, max_num=6), expected)


def test_input_kinds_agree(tmp_path: Path) -> None:
    image = noise_image(640, 300, seed=2)
    data = png_bytes(image)
    path = tmp_path / "image.png"
    path.write_bytes(data)
    expected = official_pixel_values(image, max_num=12)
    with open(path, "rb") as handle:
        from_handle = load_image(handle, max_num=12)
        assert not handle.closed  # the caller's file stays the caller's
    for source in (str(path), path, data, bytearray(data), memoryview(data), io.BytesIO(data), image):
        assert torch.equal(load_image(source, max_num=12), expected), type(source)
    assert torch.equal(from_handle, expected)


def test_workers_and_twin_give_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    # Both are big enough to split at max_num 12; 1750x1000 resizes vertically first, 1400x1200 not.
    for width, height in ((1750, 1000), (1400, 1200)):
        image = noise_image(width, height, seed=width)
        expected = official_pixel_values(image, max_num=12)
        for workers in (1, 2, 3):
            assert torch.equal(load_image(image, max_num=12, workers=workers), expected), (width, workers)
    monkeypatch.setattr(image_processor, "_C", None)  # the NumPy twin, as without the extension
    assert torch.equal(load_image(image, max_num=12, workers=2), expected)


@pytest.mark.parametrize("size, out_size", [
    ((3840, 2160), (7, 4)), ((1750, 1000), (4, 2)), ((1000, 1000), (3, 2)), ((500, 2300), (1, 5)),
    ((2300, 500), (5, 1)), ((3000, 2000), (1, 1)),
    ((2500, 896), (7, 2)), ((3136, 2000), (7, 2)), ((1344, 500), (3, 4)),  # one axis already fits
])
def test_split_resize_is_bit_identical_to_pillow(size: tuple[int, int], out_size: tuple[int, int]) -> None:
    assert split_resize_is_exact(), "Pillow's resize pass order changed: update pillow_resizes_vertically_first"
    image = noise_image(*size, seed=size[0])
    tile = 448
    expected = image.resize((out_size[0] * tile, out_size[1] * tile), Image.Resampling.BICUBIC)
    for parts in (2, 3, 5):
        assembled = Image.new("RGB", expected.size)
        blocks = []

        def consume(block: Image.Image, col: int, row: int) -> None:
            assert block.width % tile == 0 and block.height % tile == 0
            blocks.append((block, col, row))

        with ThreadPoolExecutor(max_workers=parts) as pool:
            resize_tiles(image, *out_size, tile, consume, pool, parts)
        for block, col, row in blocks:
            assembled.paste(block, (col * tile, row * tile))
        assert assembled.tobytes() == expected.tobytes(), parts


def test_out_buffer_is_filled_and_checked() -> None:
    image = noise_image(900, 450, seed=3)
    plan = plan_tiles(900, 450, 1, 6, 448, True)
    buffer = torch.full((plan.num_tiles, 3, 448, 448), float("nan"))
    result = image_to_pixel_values(image, plan, out=buffer)
    assert result is buffer and torch.equal(buffer, official_pixel_values(image, max_num=6))
    with pytest.raises(ValueError, match="out must be"):
        image_to_pixel_values(image, plan, out=torch.empty(2, 3, 448, 448))
    with pytest.raises(ValueError, match="RGB"):
        image_to_pixel_values(image.convert("L"), plan)


def test_normalization_lut_is_the_official_arithmetic() -> None:
    lut = image_processor.normalization_lut()
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 1, 256)
    expected = (levels.float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    assert lut.dtype == torch.float32 and torch.equal(lut, expected.view(3, 256))


# --- bad inputs ----------------------------------------------------------------------------------------

def test_missing_and_unreadable_inputs(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path)  # a directory
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(b"this is not an image at all")
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"This is not a JPEG, whatever its name says. " * 100)
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(garbage)
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(TypeError, match="expected a path"):
        load_image(12345)


@pytest.mark.parametrize("format_name", ["PNG", "JPEG"])
def test_truncated_image_is_caught(format_name: str) -> None:
    buffer = io.BytesIO()
    noise_image(400, 300, seed=4).save(buffer, format=format_name)
    truncated = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(truncated)


def test_pixel_limit_is_checked_before_decoding() -> None:
    # The header claims 12000x12000 = 144 MP over a bogus body: rejected from the header, never decoded.
    bomb = png_header_only(12000, 12000)
    with pytest.warns(Image.DecompressionBombWarning):  # PIL's own warning threshold is 89 MP
        with pytest.raises(ImageLoadError, match="144000000 pixels, over the limit of 100000000"):
            load_image(bomb)
    small = png_bytes(noise_image(20, 30))
    with pytest.raises(ImageLoadError, match="max_pixels"):
        load_image(small, max_pixels=599)
    assert load_image(small, max_pixels=600).shape == (7, 3, 448, 448)
    with pytest.raises(ImageLoadError, match="over the limit of 100"):
        load_image(noise_image(20, 30), max_pixels=100)


def test_pil_decompression_bomb_error_becomes_image_load_error() -> None:
    limit_before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageLoadError, match="decompression-bomb"):
        load_image(png_header_only(30000, 30000), max_pixels=None)  # PIL refuses > 2 x 89 MP itself
    assert Image.MAX_IMAGE_PIXELS == limit_before  # no global state touched


@pytest.mark.parametrize("kwargs, message", [
    ({"max_num": 0}, "max_num must be >= 1"),
    ({"max_num": 3, "min_num": 4}, r"min_num \(4\) must not exceed max_num \(3\)"),
    ({"min_num": 0}, "min_num must be >= 1"),
    ({"input_size": 0}, "input_size/image_size must be >= 1"),
])
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ImageLoadError, match=message):
        load_image(b"not even read: arguments are checked first", **kwargs)
