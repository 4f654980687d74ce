"""Pillow's 8-bit bicubic resize as integer tables (host) and as torch integer ops (the reference).

Pillow (``src/libImaging/Resample.c``) resizes separably: one pass along one axis into a uint8 image,
then one along the other. A pass that keeps its axis's length is skipped; a same-size resize is a copy.
Which pass runs first when both run is Pillow's choice; `pillow_resizes_vertically_first` holds the rule
measured on the installed Pillow 13 and is reused here, not re-derived.

For one pass from ``in_size`` to ``out_size`` pixels, output pixel ``o`` reads input pixels
``start[o] .. start[o] + count[o] - 1`` with int32 weights ``coeffs[o, k]`` (22 fractional bits)::

    value = clamp((2**21 + sum_k pixel[start[o] + k] * coeffs[o, k]) >> 22, 0, 255)   # per channel

(``>>`` is arithmetic: a negative sum clips to 0, Pillow's ``clip8`` table). `pass_tables` builds the
tables with Pillow's double-precision steps in Pillow's order (NumPy float64 elementwise ops are IEEE
double like the C code; the weight sum is accumulated tap by tap, never with NumPy's pairwise sum).
Two details of Resample.c that change nothing here: the horizontal-first path resamples only the input
rows the vertical pass reads (``ybox_first .. ybox_last``), which for a whole-image box are all rows; and
recent Pillow multiplies by ``1 / filterscale`` where older code divided by ``filterscale`` (the tables
agreed on 3,000 random downscales; the product is used here). Checked against Pillow 13 on x86-64, whose
C build does not fuse multiply-adds; a build that did could round a rare weight differently.
"""
from __future__ import annotations

import numpy as np
import torch

from internvl_engine.preprocessing.resize import pillow_resizes_vertically_first

PRECISION_BITS = 22  # Pillow's 8-bit path: 32 - 8 bits of value - 2 bits of headroom
_BICUBIC_SUPPORT = 2.0
_BICUBIC_A = -0.5


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic_filter (a = -0.5), same operation order, float64."""
    x = np.abs(x)
    a = _BICUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def pass_tables(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer tables of one bicubic pass ``in_size -> out_size`` (CPU tensors).

    Returns ``bounds`` int32 [out_size, 2] = (start, count) and ``coeffs`` int32 [out_size, ksize] with
    ``ksize = ceil(support) * 2 + 1`` and zeros past each row's ``count`` (Pillow's layout).
    Mirrors precompute_coeffs + normalize_coeffs_8bpc.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"pass sizes must be >= 1, got {in_size} -> {out_size}")
    scale = float(in_size) / out_size  # (double)(in1 - in0) / outSize, box (0, in_size) exact in float32
    filterscale = max(scale, 1.0)
    support = _BICUBIC_SUPPORT * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    inv_filterscale = 1.0 / filterscale
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale  # in0 = 0
    # (int) truncates toward zero; astype does the same.
    start = np.maximum((center - support + 0.5).astype(np.int64), 0)
    stop = np.minimum((center + support + 0.5).astype(np.int64), in_size)
    count = stop - start
    taps = np.arange(ksize, dtype=np.int64)
    used = taps[None, :] < count[:, None]  # [out, ksize]
    # (x + xmin - center + 0.5) * inv_filterscale: the int sum first, then double ops left to right.
    weights = np.where(used, _bicubic(((taps[None, :] + start[:, None]) - center[:, None] + 0.5)
                                      * inv_filterscale), 0.0)
    total = np.zeros(out_size, dtype=np.float64)
    for k in range(ksize):  # sequential, as the C loop (adding an unused tap's +0.0 changes nothing)
        total = total + weights[:, k]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total != 0.0, total, 1.0)[:, None],
                       weights)
    scaled = weights * float(1 << PRECISION_BITS)  # exact: a power of two
    fixed = np.trunc(np.where(weights < 0, -0.5 + scaled, 0.5 + scaled)).astype(np.int32)
    bounds = np.stack([start, count], axis=1).astype(np.int32)
    return torch.from_numpy(bounds), torch.from_numpy(fixed)


def identity_tables(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables of a pass that copies: (v * 2**22 + 2**21) >> 22 == v. Lets the fused kernel run when
    Pillow runs no pass at all (a same-size resize)."""
    start = torch.arange(size, dtype=torch.int32)
    bounds = torch.stack([start, torch.ones_like(start)], dim=1)
    return bounds, torch.full((size, 1), 1 << PRECISION_BITS, dtype=torch.int32)


def resize_passes(width: int, height: int, out_width: int, out_height: int
                  ) -> list[tuple[bool, torch.Tensor, torch.Tensor]]:
    """Pillow's passes for ``resize((out_width, out_height), BICUBIC)`` of a ``width x height`` image, in
    order: ``(vertical, bounds, coeffs)`` per pass; empty for a same-size resize (a copy)."""
    passes = []
    if out_width != width:
        passes.append((False, *pass_tables(width, out_width)))
    if out_height != height:
        passes.append((True, *pass_tables(height, out_height)))
    if len(passes) == 2 and pillow_resizes_vertically_first(width, height, out_width, out_height):
        passes.reverse()
    return passes


def resample_pass_ref(src: torch.Tensor, vertical: bool, bounds: torch.Tensor,
                      coeffs: torch.Tensor) -> torch.Tensor:
    """One pass on a uint8 [H, W, C] tensor (any device) with torch integer ops -> uint8, resampling
    the rows axis when `vertical`, else the columns axis."""
    axis = 0 if vertical else 1
    bounds = bounds.to(src.device, torch.int64)
    coeffs = coeffs.to(src.device, torch.int64)
    src64 = src.to(torch.int64)
    out_len = bounds.shape[0]
    shape = (out_len, 1, 1) if vertical else (1, out_len, 1)
    out_shape = list(src.shape)
    out_shape[axis] = out_len
    acc = torch.full(out_shape, 1 << (PRECISION_BITS - 1), dtype=torch.int64, device=src.device)
    for k in range(coeffs.shape[1]):  # one tap for every output pixel at a time: O(output) memory
        index = (bounds[:, 0] + k).clamp(max=src.shape[axis] - 1)  # taps past count have weight 0
        acc += src64.index_select(axis, index) * coeffs[:, k].view(shape)
    return (acc >> PRECISION_BITS).clamp(0, 255).to(torch.uint8)


def pil_resize_ref(image: torch.Tensor, out_width: int, out_height: int) -> torch.Tensor:
    """``Image.resize((out_width, out_height), BICUBIC)`` of a uint8 [H, W, C] tensor, bit for bit."""
    height, width = image.shape[0], image.shape[1]
    out = image
    for vertical, bounds, coeffs in resize_passes(width, height, out_width, out_height):
        out = resample_pass_ref(out, vertical, bounds, coeffs)
    return out.clone() if out is image else out
