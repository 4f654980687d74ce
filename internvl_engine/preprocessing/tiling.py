"""InternVL dynamic tiling: which (cols, rows) grid an image gets, and the official PIL tiling.

The rules follow the official `dynamic_preprocess` exactly, because the number of tiles decides the number
of `<IMG_CONTEXT>` tokens (256 per tile) and any drift changes the model's input:

* candidates are every grid with ``min_num <= cols * rows <= max_num``, in the order the official code
  produces (a Python ``set`` filled in a fixed loop order, then a *stable* sort by area; the set's
  iteration order decides how equal-area grids are ordered, and that order decides ties);
* the grid whose ``cols / rows`` is closest to ``width / height`` wins; on an exact tie a later candidate
  replaces the best one only when the image has more than half the pixels of that candidate grid;
* the image is resized (PIL bicubic) to ``(S * cols, S * rows)`` and cut into tiles row-major, and a
  thumbnail (the original image resized to ``S x S``) is appended when asked for and there is more than
  one tile.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from PIL import Image

Grid = tuple[int, int]  # (cols, rows)


@dataclass(frozen=True)
class TilePlan:
    """How one image is tiled: a ``cols x rows`` grid of tiles, plus an optional thumbnail tile."""

    cols: int
    rows: int
    thumbnail: bool
    num_tiles: int  # cols * rows + thumbnail: the leading dimension of pixel_values


def check_tiling_args(min_num: int, max_num: int, image_size: int) -> None:
    """Raise ValueError naming the bad argument; the official code would silently misbehave instead."""
    if image_size < 1:
        raise ValueError(f"input_size/image_size must be >= 1, got {image_size}")
    if max_num < 1:
        raise ValueError(f"max_num must be >= 1, got {max_num}")
    if min_num < 1:
        raise ValueError(f"min_num must be >= 1, got {min_num}")
    if min_num > max_num:
        raise ValueError(f"min_num ({min_num}) must not exceed max_num ({max_num})")


@functools.lru_cache(maxsize=64)
def candidate_grids(min_num: int, max_num: int) -> tuple[Grid, ...]:
    """All (cols, rows) with ``min_num <= cols * rows <= max_num``, in the official candidate order.

    The official order is that of a set filled in this exact loop order and then stably sorted by area.
    Equal-area grids (e.g. (1, 2) and (2, 1)) keep the set's iteration order, which depends on the tuple
    hashes, the set's table size and the insertion history, so the set is built the same way rather
    than re-deriving the order. Cached (immutable tuples) because max_num=40 walks ~22k pairs.
    """
    grids: set[Grid] = set()
    for n in range(min_num, max_num + 1):
        for cols in range(1, n + 1):
            for rows in range(1, n + 1):
                if min_num <= cols * rows <= max_num:
                    grids.add((cols, rows))
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def find_closest_aspect_ratio(aspect_ratio: float, target_ratios: tuple[Grid, ...] | list[Grid],
                              width: int, height: int, image_size: int) -> Grid:
    """The candidate grid whose cols/rows is closest to `aspect_ratio` (official tie-break rule).

    Scans `target_ratios` in order; a strictly smaller difference always wins, an equal difference wins
    only when ``width * height > 0.5 * image_size**2 * cols * rows`` (the image fills more than half of
    the larger grid, so the extra tiles carry real detail).
    """
    best: Grid = (1, 1)
    best_diff = float("inf")
    area = width * height
    for cols, rows in target_ratios:
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def plan_tiles(width: int, height: int, min_num: int = 1, max_num: int = 12, image_size: int = 448,
               use_thumbnail: bool = False) -> TilePlan:
    """The tile plan of a ``width x height`` image (defaults as the official `dynamic_preprocess`;
    the official `load_image` passes ``use_thumbnail=True``)."""
    check_tiling_args(min_num, max_num, image_size)
    if width < 1 or height < 1:
        raise ValueError(f"image must have a positive size, got {width}x{height}")
    cols, rows = find_closest_aspect_ratio(width / height, candidate_grids(min_num, max_num),
                                           width, height, image_size)
    thumbnail = use_thumbnail and cols * rows > 1
    return TilePlan(cols=cols, rows=rows, thumbnail=thumbnail, num_tiles=cols * rows + int(thumbnail))


def dynamic_preprocess(image: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448,
                       use_thumbnail: bool = False) -> list[Image.Image]:
    """The official tiling as a list of ``image_size x image_size`` PIL tiles (row-major, thumbnail last).

    This is the slow, faithful form (one PIL crop per tile); `image_processor.load_image` produces the
    same pixels straight into a tensor.
    """
    plan = plan_tiles(image.width, image.height, min_num, max_num, image_size, use_thumbnail)
    resized = image.resize((image_size * plan.cols, image_size * plan.rows), Image.Resampling.BICUBIC)
    tiles = []
    for row in range(plan.rows):
        for col in range(plan.cols):
            left, top = col * image_size, row * image_size
            tiles.append(resized.crop((left, top, left + image_size, top + image_size)))
    if plan.thumbnail:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles
