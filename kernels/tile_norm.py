"""Decoded uint8 image on the device -> normalised InternVL tiles, bit-exact with `load_image`.

`load_image` resizes the RGB image (Pillow bicubic) to ``(S * cols, S * rows)``, cuts it row-major into
S x S tiles, appends the thumbnail (the original image resized to S x S) when the plan has one, and maps
every byte through ToTensor + Normalize in float32. Pillow's resize is two separable 8-bit fixed-point
passes (see `pil_resample`); here:

* `_first_pass_kernel` runs Pillow's first pass into a uint8 [H1, W1, 3] intermediate;
* `_second_pass_norm_kernel` runs the second pass, the crop (its grid is output tiles x row blocks x
  column blocks, each program computing its tile's pixels straight from the intermediate) and the
  normalisation (a gather from the [3, 256] `normalization_lut`, already cast to the output dtype on the
  host: no division, no cast in the kernel, so every dtype is the float32 result cast by torch), writing
  ``out[tile, c, y, x]`` directly.

When Pillow skips a pass (an axis keeps its length) only the second kernel runs, on the image itself; a
same-size resize runs it with an identity table. The thumbnail is the same one or two launches with its
own tables, writing tile ``num_tiles - 1``. Integer weights and bounds are built on the host in float64
(`pil_resample.pass_tables`); they are a few KB and never cached, and reach the device by non-blocking
copies from pinned memory: a call never makes the host wait for the GPU (the engine queues it before the ViT).

Full size: image [H, W, 3] uint8 (e.g. 2160 x 3840), S = 448, up to 40 tiles + thumbnail. Bytes moved per
call (`tile_norm_bytes`): H*W*3 read per resize (grid, and thumbnail when there is one)
+ tiles*3*S*S*out_elem written + 2 * each two-pass resize's intermediate (H1*W1*3, written then read).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from internvl_engine.preprocessing.cpu import IMAGENET_MEAN, IMAGENET_STD, normalization_lut
from internvl_engine.preprocessing.tiling import TilePlan

from .pil_resample import PRECISION_BITS, identity_tables, pil_resize_ref, resize_passes

__all__ = ["tile_norm", "tile_norm_ref", "tile_norm_bytes"]

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _resample_block(src_ptr, stride_y, stride_x, stride_c,  # src: uint8 [H_in, W_in, 3], any strides
                    bounds_ptr,  # int32 [out_len, 2]: (first input pixel, tap count) per output pixel
                    coeffs_ptr, coeff_stride, max_taps,  # int32 [out_len, coeff_stride], 22 frac bits
                    gy, gx, row_mask, col_mask,  # int64 [BR, 1] / [1, BC] output coords of the pass
                    VERTICAL: tl.constexpr, PREC: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """One Pillow pass for a [BR, BC] block of its output: three int32 [BR, BC] channels in 0..255."""
    if VERTICAL:  # resample along rows: output row gy reads input rows start[gy] .., column gx
        o = gy
        o_mask = row_mask
        step = stride_y
        ptrs = src_ptr + gx * stride_x
    else:  # along columns: output column gx reads input columns start[gx] .., row gy
        o = gx
        o_mask = col_mask
        step = stride_x
        ptrs = src_ptr + gy * stride_y
    mask = row_mask & col_mask
    start = tl.load(bounds_ptr + o * 2, mask=o_mask, other=0)  # [BR, 1] or [1, BC]
    count = tl.load(bounds_ptr + o * 2 + 1, mask=o_mask, other=0)
    ptrs = ptrs + start.to(tl.int64) * step  # [BR, BC] pointers to each pixel's first tap
    k_ptrs = coeffs_ptr + o * coeff_stride
    half = 1 << (PREC - 1)  # Pillow starts every sum at 0.5 in fixed point (round to nearest)
    acc0 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32) + half
    acc1 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32) + half
    acc2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32) + half
    for k in range(0, max_taps):
        tap = k < count
        w = tl.load(k_ptrs + k, mask=o_mask, other=0)  # zero past the row's count (table padding)
        m = mask & tap
        # int32 like Pillow's `int ss`: |sum| <= 255 * ~1.3 * 2**22 < 2**31
        acc0 += tl.load(ptrs, mask=m, other=0).to(tl.int32) * w
        acc1 += tl.load(ptrs + stride_c, mask=m, other=0).to(tl.int32) * w
        acc2 += tl.load(ptrs + 2 * stride_c, mask=m, other=0).to(tl.int32) * w
        ptrs += step
    # clip8: arithmetic shift, then clamp (Pillow's lookup table maps < 0 to 0 and > 255 to 255)
    v0 = tl.minimum(tl.maximum(acc0 >> PREC, 0), 255)
    v1 = tl.minimum(tl.maximum(acc1 >> PREC, 0), 255)
    v2 = tl.minimum(tl.maximum(acc2 >> PREC, 0), 255)
    return v0, v1, v2


@triton.jit
def _first_pass_kernel(src_ptr, stride_y, stride_x, stride_c,  # uint8 [H, W, 3]
                       mid_ptr, mid_h, mid_w,  # uint8 [mid_h, mid_w, 3], contiguous
                       bounds_ptr, coeffs_ptr, coeff_stride, max_taps,
                       VERTICAL: tl.constexpr, PREC: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    gy = rows[:, None]  # [BR, 1]
    gx = cols[None, :]  # [1, BC]
    row_mask = gy < mid_h
    col_mask = gx < mid_w
    v0, v1, v2 = _resample_block(src_ptr, stride_y, stride_x, stride_c, bounds_ptr, coeffs_ptr,
                                 coeff_stride, max_taps, gy, gx, row_mask, col_mask,
                                 VERTICAL, PREC, BLOCK_R, BLOCK_C)
    mask = row_mask & col_mask
    out = mid_ptr + gy * (mid_w * 3) + gx * 3
    tl.store(out, v0.to(tl.uint8), mask=mask)
    tl.store(out + 1, v1.to(tl.uint8), mask=mask)
    tl.store(out + 2, v2.to(tl.uint8), mask=mask)


@triton.jit
def _second_pass_norm_kernel(src_ptr, stride_y, stride_x, stride_c,  # uint8 [H1, W1, 3]
                             out_ptr, out_stride_t, out_stride_c, out_stride_y,  # [N, 3, S, S], x stride 1
                             lut_ptr,  # out dtype [3, 256], contiguous: lut[c, byte]
                             bounds_ptr, coeffs_ptr, coeff_stride, max_taps,
                             grid_cols, first_tile, tile_size,
                             VERTICAL: tl.constexpr, PREC: tl.constexpr, BLOCK_R: tl.constexpr,
                             BLOCK_C: tl.constexpr):
    t = tl.program_id(0)  # tile of the grid, row-major
    tile_row = (t // grid_cols).to(tl.int64)
    tile_col = (t % grid_cols).to(tl.int64)
    r = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # rows within the tile
    c = tl.program_id(2).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = r[:, None] < tile_size
    col_mask = c[None, :] < tile_size
    gy = tile_row * tile_size + r[:, None]  # crop: the tile's pixels of the resized image
    gx = tile_col * tile_size + c[None, :]
    v0, v1, v2 = _resample_block(src_ptr, stride_y, stride_x, stride_c, bounds_ptr, coeffs_ptr,
                                 coeff_stride, max_taps, gy, gx, row_mask, col_mask,
                                 VERTICAL, PREC, BLOCK_R, BLOCK_C)
    mask = row_mask & col_mask
    out = (out_ptr + (first_tile + t).to(tl.int64) * out_stride_t + r[:, None] * out_stride_y
           + c[None, :])
    tl.store(out, tl.load(lut_ptr + v0, mask=mask, other=0), mask=mask)
    tl.store(out + out_stride_c, tl.load(lut_ptr + 256 + v1, mask=mask, other=0), mask=mask)
    tl.store(out + 2 * out_stride_c, tl.load(lut_ptr + 512 + v2, mask=mask, other=0), mask=mask)


def _check_args(image: torch.Tensor, plan: TilePlan, image_size: int, out_dtype: torch.dtype,
                mean, std) -> None:
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must have shape [H, W, 3] (RGB) with H, W >= 1, got {list(image.shape)}")
    if not isinstance(plan, TilePlan):
        raise ValueError(f"plan must be a TilePlan (see plan_tiles), got {type(plan).__name__}")
    if plan.cols < 1 or plan.rows < 1 or plan.num_tiles != plan.cols * plan.rows + int(plan.thumbnail):
        raise ValueError(f"inconsistent plan: {plan}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be an int >= 1, got {image_size!r}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {len(mean)} and {len(std)}")


def _block_shape(device: torch.device, rows: int, cols: int) -> tuple[int, int]:
    """Pixels per program (x 3 channels). GPU: 32 x 64. Interpreter (CPU tensors): every op costs about
    the same whatever its size, so as few programs as the output needs, up to 128 x 128."""
    if device.type == "cuda":
        return 32, 64
    return (min(128, max(16, triton.next_power_of_2(rows))), min(128, max(16, triton.next_power_of_2(cols))))


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host table (a few KB) on `device` without a host sync. A plain host-to-device copy synchronises
    the stream (it would wait for every kernel queued before it, e.g. the previous image's and the ViT's), so on
    CUDA the table goes through pinned memory and a non-blocking copy; torch's host allocator keeps the pinned
    block until that copy has run."""
    if device.type != "cuda":
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)


def _resize_into(image: torch.Tensor, out: torch.Tensor, lut: torch.Tensor, cols: int, rows: int,
                 tile_size: int, first_tile: int) -> None:
    """Resize `image` to (tile_size * cols, tile_size * rows) as Pillow does and write its tiles, normalised,
    to out[first_tile ..] row-major: an optional first-pass launch, then the fused launch."""
    device = image.device
    height, width = image.shape[0], image.shape[1]
    passes = resize_passes(width, height, tile_size * cols, tile_size * rows)
    if not passes:  # Pillow copies; the fused kernel still has to crop and normalise
        passes = [(False, *identity_tables(width))]
    src = image
    block_r, block_c = _block_shape(device, tile_size, tile_size)
    if len(passes) == 2:
        vertical, bounds, coeffs = passes[0]
        mid_h = bounds.shape[0] if vertical else height
        mid_w = width if vertical else bounds.shape[0]
        mid = torch.empty((mid_h, mid_w, 3), dtype=torch.uint8, device=device)
        mid_block = _block_shape(device, mid_h, mid_w)
        grid = (triton.cdiv(mid_h, mid_block[0]), triton.cdiv(mid_w, mid_block[1]))
        _first_pass_kernel[grid](
            src, src.stride(0), src.stride(1), src.stride(2), mid, mid_h, mid_w,
            _to_device(bounds, device), _to_device(coeffs, device), coeffs.shape[1], int(bounds[:, 1].max()),
            VERTICAL=vertical, PREC=PRECISION_BITS, BLOCK_R=mid_block[0], BLOCK_C=mid_block[1])
        src = mid
    vertical, bounds, coeffs = passes[-1]
    grid = (cols * rows, triton.cdiv(tile_size, block_r), triton.cdiv(tile_size, block_c))
    _second_pass_norm_kernel[grid](
        src, src.stride(0), src.stride(1), src.stride(2),
        out, out.stride(0), out.stride(1), out.stride(2), lut,
        _to_device(bounds, device), _to_device(coeffs, device), coeffs.shape[1], int(bounds[:, 1].max()),
        cols, first_tile, tile_size,
        VERTICAL=vertical, PREC=PRECISION_BITS, BLOCK_R=block_r, BLOCK_C=block_c,
        # 4 warps over a 32x64 block hit 255 registers and spilled on sm_90 (vertical second pass, ptxas -v);
        # 8 warps hold the three int32 accumulators per pixel in 173 registers without spills.
        num_warps=8)


def tile_norm(image: torch.Tensor, plan: TilePlan, image_size: int = 448,
              out_dtype: torch.dtype = torch.float32, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """RGB uint8 [H, W, 3] on the device -> pixel_values [plan.num_tiles, 3, S, S] in `out_dtype`.

    float32 output equals `load_image` bit for bit; float16 / bfloat16 equal that result cast by torch.
    `plan` is ``plan_tiles(W, H, ..., image_size, use_thumbnail)``.
    """
    _check_args(image, plan, image_size, out_dtype, mean, std)
    if image.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"tile_norm needs a CUDA tensor (or TRITON_INTERPRET=1), got one on {image.device}; "
                         f"use tile_norm_ref there")
    size = image_size
    out = torch.empty((plan.num_tiles, 3, size, size), dtype=out_dtype, device=image.device)
    # The exact float32 Normalize(ToTensor(byte)) per channel, cast once here with torch's rounding.
    lut = _to_device(normalization_lut(mean, std).to(out_dtype).contiguous(), image.device)
    _resize_into(image, out, lut, plan.cols, plan.rows, size, 0)
    if plan.thumbnail:
        _resize_into(image, out, lut, 1, 1, size, plan.num_tiles - 1)
    return out


def tile_norm_ref(image: torch.Tensor, plan: TilePlan, image_size: int = 448,
                  out_dtype: torch.dtype = torch.float32, mean=IMAGENET_MEAN,
                  std=IMAGENET_STD) -> torch.Tensor:
    """The same fixed-point algorithm with torch integer ops on any device (no PIL): the oracle."""
    _check_args(image, plan, image_size, out_dtype, mean, std)
    size, cols, rows = image_size, plan.cols, plan.rows
    resized = pil_resize_ref(image, size * cols, size * rows)  # [rows*S, cols*S, 3]
    # [rows, S, cols, S, 3] -> [rows, cols, 3, S, S] -> [tiles, 3, S, S]
    tiles = resized.view(rows, size, cols, size, 3).permute(0, 2, 4, 1, 3).reshape(rows * cols, 3, size, size)
    if plan.thumbnail:
        thumb = pil_resize_ref(image, size, size).permute(2, 0, 1)[None]
        tiles = torch.cat([tiles, thumb])
    lut = normalization_lut(mean, std).to(image.device)
    channel = torch.arange(3, device=image.device).view(1, 3, 1, 1)
    return lut[channel, tiles.long()].to(out_dtype)


def tile_norm_bytes(height: int, width: int, plan: TilePlan, image_size: int = 448,
                    out_dtype: torch.dtype = torch.float32) -> int:
    """Bytes one `tile_norm` call reads and writes (the benchmark's GB/s numerator)."""
    size = image_size
    total = plan.num_tiles * 3 * size * size * torch.empty((), dtype=out_dtype).element_size()
    resizes = [(plan.cols, plan.rows)] + ([(1, 1)] if plan.thumbnail else [])
    for cols, rows in resizes:
        total += height * width * 3
        passes = resize_passes(width, height, size * cols, size * rows)
        if len(passes) == 2:
            mid_len = passes[0][1].shape[0]
            total += 2 * 3 * (mid_len * width if passes[0][0] else height * mid_len)
    return total
