"""PIL's bicubic resize, bit for bit, split over threads and delivered as blocks of whole tiles.

Resizing dominates host preprocessing (a 4K image on the 2-vCPU dev VM: ~190 ms for the 7x4 grid and
~65 ms for the thumbnail, against ~12 ms for normalising all 29 tiles), and one PIL call uses one core.
Pillow resamples separably: one pass along one axis into an 8-bit image, then one along the other axis.
In a pass, each output row (horizontal pass) or column (vertical pass) depends only on the same input
row/column, with weights that depend only on the two lengths of the resized axis. So a pass can run in
bands cut across the axis it leaves alone, each band an ordinary PIL call that drops the GIL, and the
bytes are those of one ``image.resize(size, BICUBIC)`` as long as the passes run in Pillow's order.
That order is not documented: `pillow_resizes_vertically_first` holds the rule measured on Pillow 13,
and `split_resize_is_exact` checks it against the installed Pillow once per process; where it does not
hold, nothing is split.
"""
from __future__ import annotations

import functools
from concurrent.futures import Executor
from typing import Callable, Optional, TypeVar

import numpy as np
from PIL import Image

BICUBIC = Image.Resampling.BICUBIC
# Below about a megapixel of input plus output per band, the crops and pastes of a split resize cost
# more than another thread saves.
_MIN_PIXELS_PER_BAND = 1 << 20
# (width, height, out_width, out_height) on both sides of the pass-order boundary, up and down.
_ORDER_PROBES = ((120, 120, 100, 20), (120, 120, 130, 60), (200, 100, 176, 50), (200, 100, 175, 50),
                 (100, 100, 200, 150), (120, 100, 100, 120), (90, 300, 5, 30), (300, 90, 30, 5))

# consume(block, tile_col, tile_row): block covers tile columns tile_col .. tile_col + block.width // S - 1
# and tile rows tile_row .. tile_row + block.height // S - 1 of the resized image.
BlockConsumer = Callable[[Image.Image, int, int], None]
T = TypeVar("T")


def pillow_resizes_vertically_first(width: int, height: int, out_width: int, out_height: int) -> bool:
    """Pillow 13's pass order when both passes run: vertical first when the height loses more than
    twice as many pixels as the width, horizontal first otherwise. Found by probing Pillow 13.0 (it
    looks like python-pillow/Pillow#9549; Pillow 12's Resample.c always ran the horizontal pass first)."""
    return out_height < height and height - out_height > 2 * (width - out_width)


def _cuts(length: int, parts: int) -> list[int]:
    """Offsets splitting `length` into min(parts, length) near-equal non-empty pieces."""
    parts = max(1, min(parts, length))
    return [length * i // parts for i in range(parts + 1)]


def _run(pool: Optional[Executor], function: Callable[[int], T], count: int) -> list[T]:
    """function(0), ..., function(count - 1), on `pool` when there is one; results in order."""
    if pool is None:
        return [function(i) for i in range(count)]
    return list(pool.map(function, range(count)))


def _split_pass(image: Image.Image, size: tuple[int, int], cuts: list[int], by_rows: bool,
                pool: Optional[Executor], finish: Callable[[int, Image.Image], T]) -> list[T]:
    """Resize `image` to `size` along one axis (the width when `by_rows`, else the height; the other
    length must already match) in bands of rows or columns cut at pixel offsets `cuts`.
    ``finish(offset, band)`` runs on each band in its worker; its results come back in order."""
    width, height = image.size

    def band(i: int) -> T:
        start, stop = cuts[i], cuts[i + 1]
        if by_rows:
            piece, target = image.crop((0, start, width, stop)), (size[0], stop - start)
        else:
            piece, target = image.crop((start, 0, stop, height)), (stop - start, size[1])
        return finish(start, piece if piece.size == target else piece.resize(target, BICUBIC))

    return _run(pool, band, len(cuts) - 1)


def _resize_split(image: Image.Image, cols: int, rows: int, tile_size: int, consume: BlockConsumer,
                  pool: Optional[Executor], parts: int) -> None:
    """Both passes in Pillow's order: the first in `parts` bands pasted into one image, the second in up
    to `parts` bands of whole tiles, each handed to `consume` in its worker."""
    width, height = image.size
    size = (cols * tile_size, rows * tile_size)
    vertical_first = pillow_resizes_vertically_first(width, height, *size)
    # Vertical first: columns keep their width through the first pass, then the horizontal pass runs
    # on bands of whole tile rows. Horizontal first: the other way round.
    middle_size = (width, size[1]) if vertical_first else (size[0], height)
    middle = image
    if middle_size != image.size:
        across = middle_size[0] if vertical_first else middle_size[1]
        middle = Image.new(image.mode, middle_size)
        for start, band in _split_pass(image, middle_size, _cuts(across, parts), not vertical_first, pool,
                                       lambda start, band: (start, band)):
            middle.paste(band, (start, 0) if vertical_first else (0, start))
    tile_cuts = [tile * tile_size for tile in _cuts(rows if vertical_first else cols, parts)]

    def finish(start: int, block: Image.Image) -> None:
        if vertical_first:
            consume(block, 0, start // tile_size)
        else:
            consume(block, start // tile_size, 0)

    _split_pass(middle, size, tile_cuts, vertical_first, pool, finish)


@functools.lru_cache(maxsize=1)
def split_resize_is_exact() -> bool:
    """Whether the split resize reproduces the installed Pillow's resize, tested once per process on
    small noise images around the pass-order boundary. If a Pillow release changes the order rule again,
    splitting switches off (slower, never wrong)."""
    rng = np.random.default_rng(0)
    for width, height, out_width, out_height in _ORDER_PROBES:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        resized = Image.new("RGB", (out_width, out_height))
        _resize_split(image, out_width, out_height, 1,
                      lambda block, col, row: resized.paste(block, (col, row)), None, parts=3)
        if resized.tobytes() != image.resize((out_width, out_height), BICUBIC).tobytes():
            return False
    return True


def resize_tiles(image: Image.Image, cols: int, rows: int, tile_size: int, consume: BlockConsumer,
                 pool: Optional[Executor] = None, parts: int = 1) -> None:
    """Resize `image` to ``(cols * tile_size, rows * tile_size)`` exactly as ``image.resize(size,
    BICUBIC)`` and hand the result to `consume` as blocks of whole tiles (see `BlockConsumer`).

    With a pool, ``parts >= 2``, an RGB image big enough to be worth it and a Pillow whose pass order is
    known, both passes run in bands on the pool and `consume` runs there too, once per band (it must be
    thread-safe for disjoint tiles). Otherwise there is one block, consumed on the calling thread.
    """
    width, height = image.size
    size = (cols * tile_size, rows * tile_size)
    parts = min(parts, (width * height + size[0] * size[1]) // _MIN_PIXELS_PER_BAND)
    if pool is None or parts < 2 or image.mode != "RGB" or not split_resize_is_exact():
        consume(image if image.size == size else image.resize(size, BICUBIC), 0, 0)
        return
    _resize_split(image, cols, rows, tile_size, consume, pool, parts)
