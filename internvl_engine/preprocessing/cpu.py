"""The CPU preprocessing path: a file, bytes or PIL image -> pixel_values
``[tiles, 3, S, S]`` float32, bit-identical to the official `load_image`.

The official recipe is PIL ``.convert('RGB')`` -> `dynamic_preprocess` (one bicubic resize, one PIL crop
per tile, a thumbnail) -> per tile torchvision ``Resize((S, S))`` (an identity on an S x S tile),
``ToTensor`` (uint8 / 255 in float32) and ``Normalize`` ((x - mean) / std in float32) -> ``torch.stack``.
Here the grid is resized once (split exactly over threads, see `resize`) and one pass maps the
resized uint8 image straight into the output tensor through a per-channel 256-entry table that holds the
official float32 result for every byte value: no per-tile crops, temporaries or stack copy. That pass is
`internvl_engine._C.normalize_tiles` (C++), or its NumPy twin `normalize_tiles_reference`.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from .image_io import DEFAULT_MAX_PIXELS, ImageLoadError, ImageSource, ImageTooLargeError, open_rgb_image
from .resize import BlockConsumer, resize_tiles
from .tiling import (TilePlan, candidate_grids, check_tiling_args, dynamic_preprocess, find_closest_aspect_ratio,
                     plan_tiles)

try:
    from internvl_engine import _C
except ImportError:  # extension not built: the NumPy twin gives the same bytes, more slowly
    _C = None

__all__ = [
    "DEFAULT_MAX_PIXELS", "IMAGENET_MEAN", "IMAGENET_STD", "ImageLoadError", "ImageTooLargeError", "TilePlan",
    "candidate_grids", "dynamic_preprocess", "find_closest_aspect_ratio", "image_to_pixel_values", "load_image",
    "normalization_lut", "normalize_tiles_reference", "open_rgb_image", "plan_tiles",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalization_lut(mean: tuple[float, float, float] = IMAGENET_MEAN,
                      std: tuple[float, float, float] = IMAGENET_STD) -> torch.Tensor:
    """[3, 256] float32 with ``lut[c, v]`` == Normalize(ToTensor(byte v))[c], bit for bit.

    Uses torchvision's float32 ops in its order on a 3-channel "image" holding every byte value:
    ``to(float32).div(255)``, then ``sub(mean[:, None, None]).div(std[:, None, None])`` with mean and
    std as float32 tensors. Every op is elementwise and correctly rounded, so each table entry equals
    what the official transform computes for that byte anywhere in an image.
    """
    levels = torch.arange(256, dtype=torch.uint8).expand(3, 1, 256)  # [C=3, H=1, W=256]
    mean_t = torch.as_tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.as_tensor(std, dtype=torch.float32)[:, None, None]
    return levels.to(torch.float32).div(255).sub(mean_t).div(std_t).reshape(3, 256)


def _check_normalize_args(src: np.ndarray, out: np.ndarray, lut: np.ndarray, grid_cols: int,
                          grid_rows: int, tile_size: int, first_tile: int) -> None:
    """The checks of the C++ `normalize_tiles`, with the same messages, as ValueError."""
    if grid_cols < 1 or grid_rows < 1 or tile_size < 1 or first_tile < 0:
        raise ValueError(f"grid_cols, grid_rows and tile_size must be >= 1 and first_tile >= 0, got "
                         f"{grid_cols}, {grid_rows}, {tile_size}, {first_tile}")
    for label, array, dtype in (("src", src, np.uint8), ("out", out, np.float32), ("lut", lut, np.float32)):
        if not isinstance(array, np.ndarray):
            raise ValueError(f"{label} must be a numpy array (use tensor.numpy()), got {type(array).__name__}")
        if array.dtype != dtype:
            raise ValueError(f"{label} must have dtype {np.dtype(dtype).name}, got {array.dtype.name}")
        if not array.flags.c_contiguous:
            raise ValueError(f"{label} must be C-contiguous")
    expected = (grid_rows * tile_size, grid_cols * tile_size, 3)
    if src.shape != expected:
        raise ValueError(f"src must have shape [rows*tile, cols*tile, 3] = {list(expected)}, "
                         f"got {list(src.shape)}")
    if out.ndim != 4 or out.shape[1:] != (3, tile_size, tile_size):
        raise ValueError(f"out must have shape [N, 3, {tile_size}, {tile_size}], got {list(out.shape)}")
    if first_tile + grid_cols * grid_rows > out.shape[0]:
        raise ValueError(f"out has {out.shape[0]} tiles, too few for tiles [{first_tile}, "
                         f"{first_tile + grid_cols * grid_rows})")
    if not out.flags.writeable:
        raise ValueError("out must be writeable")
    if lut.shape != (3, 256):
        raise ValueError(f"lut must have shape [3, 256], got {list(lut.shape)}")


def normalize_tiles_reference(src: np.ndarray, out: np.ndarray, lut: np.ndarray, grid_cols: int,
                              grid_rows: int, tile_size: int, first_tile: int) -> None:
    """NumPy twin of ``_C.normalize_tiles``: same contract, same errors, same bytes.

    src: uint8 [rows*S, cols*S, 3] (the resized image); out: float32 [N, 3, S, S], written in place at
    tiles ``first_tile ..`` in row-major grid order; lut: float32 [3, 256] (see `normalization_lut`).
    """
    _check_normalize_args(src, out, lut, grid_cols, grid_rows, tile_size, first_tile)
    num_tiles = grid_cols * grid_rows
    # [rows*S, cols*S, 3] -> [rows, S, cols, S, 3] -> [rows, cols, 3, S, S] -> [tiles, 3, S, S]
    tiles = (src.reshape(grid_rows, tile_size, grid_cols, tile_size, 3).transpose(0, 2, 4, 1, 3)
             .reshape(num_tiles, 3, tile_size, tile_size))
    channel = np.arange(3).reshape(1, 3, 1, 1)
    out[first_tile:first_tile + num_tiles] = lut[channel, tiles]


def _default_workers() -> int:
    """Threads for one image: the CPUs this process may use, at most 4, so that one big image does not
    take a whole server's cores from the other requests' preprocessing."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, available))


def image_to_pixel_values(image: Image.Image, plan: TilePlan, image_size: int = 448, *,
                          workers: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """An RGB PIL image and its `plan` -> pixel_values float32 [plan.num_tiles, 3, S, S] (S = image_size):
    the grid tiles row-major, then the thumbnail (the whole image resized to S x S) if the plan has one.

    `workers` threads (default: up to 4 CPUs; 1: all on the calling thread) split the resizes and the
    normalising exactly (see `preprocessing.resize`); the bytes never depend on it. `out`, if given, is filled
    and returned instead of a new tensor (a reused or pinned buffer of the right shape).
    """
    if image.mode != "RGB":
        raise ValueError(f"image_to_pixel_values needs an RGB image, got mode {image.mode!r}")
    shape = (plan.num_tiles, 3, image_size, image_size)
    if out is None:
        # NumPy asks the kernel for transparent huge pages on big buffers (torch.empty does not): filling
        # a fresh 29-tile (70 MB) output then took ~8 ms here instead of ~29 ms of 4 KiB page faults.
        out = torch.from_numpy(np.empty(shape, dtype=np.float32))
    elif tuple(out.shape) != shape or out.dtype != torch.float32 or out.device.type != "cpu" \
            or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 CPU tensor of shape {list(shape)}, got "
                         f"{out.dtype} {list(out.shape)} on {out.device}")
    out_array = out.numpy()  # shares memory: the normalising pass writes the tensor in place
    lut = normalization_lut().numpy()
    normalize = _C.normalize_tiles if _C is not None else normalize_tiles_reference

    def writer(first_tile: int, grid_cols: int) -> BlockConsumer:
        """Normalise a block of whole tiles into out[first_tile + row * grid_cols + col ...]."""
        def consume(block: Image.Image, tile_col: int, tile_row: int) -> None:
            pixels = np.asarray(block)  # [block_rows * S, block_cols * S, 3] uint8, C-contiguous
            block_cols = block.width // image_size
            for row in range(block.height // image_size):  # a row of tiles is contiguous in `out`
                band = pixels[row * image_size:(row + 1) * image_size]
                normalize(band, out_array, lut, block_cols, 1, image_size,
                          first_tile + (tile_row + row) * grid_cols + tile_col)
        return consume

    grid_writer = writer(0, plan.cols)
    thumbnail_writer = writer(plan.cols * plan.rows, 1)
    workers = _default_workers() if workers is None else max(1, workers)
    if workers == 1:
        resize_tiles(image, plan.cols, plan.rows, image_size, grid_writer)
        if plan.thumbnail:
            resize_tiles(image, 1, 1, image_size, thumbnail_writer)
        return out
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # The thumbnail is one task that never waits on the pool (so it cannot deadlock it); the grid is
        # cut into more bands than workers, so the others need not wait for the one busy with the thumbnail.
        thumbnail = (pool.submit(resize_tiles, image, 1, 1, image_size, thumbnail_writer)
                     if plan.thumbnail else None)
        resize_tiles(image, plan.cols, plan.rows, image_size, grid_writer, pool, parts=2 * workers)
        if thumbnail is not None:
            thumbnail.result()
    return out


def load_image(image_file: ImageSource, input_size: int = 448, max_num: int = 12, *, min_num: int = 1,
               use_thumbnail: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               workers: int | None = None) -> torch.Tensor:
    """The official `load_image`: pixel_values float32 [tiles, 3, input_size, input_size], bit-identical.

    image_file: a path, encoded bytes, a binary file object or a PIL image (any mode; converted with
    ``.convert('RGB')`` like the official code). Raises ImageLoadError for a missing, unreadable,
    truncated or oversized image (over `max_pixels`, checked before decoding) and for bad arguments.
    """
    try:
        check_tiling_args(min_num, max_num, input_size)
    except ValueError as err:
        raise ImageLoadError(str(err)) from None
    image = open_rgb_image(image_file, max_pixels=max_pixels)
    plan = plan_tiles(image.width, image.height, min_num, max_num, input_size, use_thumbnail)
    return image_to_pixel_values(image, plan, input_size, workers=workers)
