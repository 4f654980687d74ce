"""The C++ extension `internvl_engine._C` against its NumPy twin: same bytes, same errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from internvl_engine.preprocessing.cpu import normalization_lut, normalize_tiles_reference

try:
    from internvl_engine import _C
except ImportError as error:  # reported by the tests below as failures, never skipped
    _C = None
    IMPORT_ERROR = repr(error)


@pytest.fixture
def extension():
    if _C is None:
        pytest.fail(f"internvl_engine._C is not built ({IMPORT_ERROR}); run `pip install -e .` or "
                    "`python setup.py build_ext --inplace`")
    return _C


def test_extension_imports(extension) -> None:
    assert callable(extension.normalize_tiles)


def _inputs(cols: int, rows: int, tile: int, total_tiles: int, seed: int):
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 256, (rows * tile, cols * tile, 3), dtype=np.uint8)
    lut = rng.standard_normal((3, 256)).astype(np.float32)  # arbitrary: catches channel or index mix-ups
    out = np.full((total_tiles, 3, tile, tile), np.nan, dtype=np.float32)
    return src, out, lut


@pytest.mark.parametrize("cols, rows", [(1, 1), (3, 2), (1, 5), (5, 1), (4, 3)])
@pytest.mark.parametrize("tile", [1, 7, 16, 448])
def test_matches_twin(extension, cols: int, rows: int, tile: int) -> None:
    first_tile = 2
    src, out_cpp, lut = _inputs(cols, rows, tile, cols * rows + 3, seed=cols * 100 + rows * 10 + tile)
    out_twin = out_cpp.copy()
    extension.normalize_tiles(src, out_cpp, lut, cols, rows, tile, first_tile)
    normalize_tiles_reference(src, out_twin, lut, cols, rows, tile, first_tile)
    assert out_cpp.tobytes() == out_twin.tobytes()  # NaN sentinels included: untouched tiles stay so
    written = out_cpp[first_tile:first_tile + cols * rows]
    assert not np.isnan(written).any() and np.isnan(out_cpp[:first_tile]).all()
    assert np.isnan(out_cpp[first_tile + cols * rows:]).all()
    # Tile (row r, col c) holds lut[channel, src pixel] of its block, channel-planar.
    r, c = rows - 1, cols - 1
    block = src[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
    expected = np.stack([lut[channel][block[..., channel]] for channel in range(3)])
    assert np.array_equal(written[r * cols + c], expected)


def test_writes_into_a_torch_tensor(extension) -> None:
    src = np.random.default_rng(0).integers(0, 256, (14, 21, 3), dtype=np.uint8)
    pixel_values = torch.zeros(6, 3, 7, 7)
    lut = normalization_lut()
    extension.normalize_tiles(src, pixel_values.numpy(), lut.numpy(), 3, 2, 7, 0)
    expected = np.zeros((6, 3, 7, 7), dtype=np.float32)
    normalize_tiles_reference(src, expected, lut.numpy(), 3, 2, 7, 0)
    assert torch.equal(pixel_values, torch.from_numpy(expected))


def _bad_calls():
    """(name, args, message) with exactly one thing wrong; grid 3x2 of 7-pixel tiles."""
    src = np.zeros((14, 21, 3), np.uint8)
    out = np.zeros((6, 3, 7, 7), np.float32)
    lut = np.zeros((3, 256), np.float32)
    good = (src, out, lut, 3, 2, 7, 0)

    def replace(index: int, value):
        args = list(good)
        args[index] = value
        return tuple(args)

    return [
        ("src dtype", replace(0, src.astype(np.int16)), "src must have dtype uint8"),
        ("src float", replace(0, src.astype(np.float32)), "src must have dtype uint8"),
        ("src shape", replace(0, np.zeros((14, 20, 3), np.uint8)), r"src must have shape .*\[14, 21, 3\]"),
        ("src channels", replace(0, np.zeros((14, 21, 4), np.uint8)), "src must have shape"),
        ("src 2-d", replace(0, np.zeros((14, 63), np.uint8)), "src must have shape"),
        ("src strided", replace(0, np.zeros((14, 42, 3), np.uint8)[:, ::2]), "src must be C-contiguous"),
        ("src tensor", replace(0, torch.zeros(14, 21, 3, dtype=torch.uint8)), "src must be a numpy array"),
        ("out dtype", replace(1, out.astype(np.float64)), "out must have dtype float32"),
        ("out shape", replace(1, np.zeros((6, 3, 7, 8), np.float32)), r"out must have shape \[N, 3, 7, 7\]"),
        ("out too few", replace(1, np.zeros((5, 3, 7, 7), np.float32)), "out has 5 tiles, too few"),
        ("out strided", replace(1, np.zeros((12, 3, 7, 7), np.float32)[::2]), "out must be C-contiguous"),
        ("out fortran", replace(1, np.asfortranarray(out)), "out must be C-contiguous"),
        ("out read-only", replace(1, np.lib.stride_tricks.as_strided(out, writeable=False)), "writeable"),
        ("lut shape", replace(2, np.zeros((256, 3), np.float32)), r"lut must have shape \[3, 256\]"),
        ("lut dtype", replace(2, lut.astype(np.float64)), "lut must have dtype float32"),
        ("first_tile", replace(6, 1), r"too few for tiles \[1, 7\)"),
        ("negative first_tile", replace(6, -1), "first_tile >= 0"),
        ("zero tile", (np.zeros((0, 0, 3), np.uint8), out, lut, 3, 2, 0, 0), "must be >= 1"),
        ("zero cols", replace(3, 0), "must be >= 1"),
    ]


@pytest.mark.parametrize("name, args, message", _bad_calls(), ids=[call[0] for call in _bad_calls()])
def test_bad_arguments_raise_value_error(extension, name: str, args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        extension.normalize_tiles(*args)
    with pytest.raises(ValueError, match=message):  # the twin has the same contract
        normalize_tiles_reference(*args)
