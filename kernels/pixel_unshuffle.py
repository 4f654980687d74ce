"""Pixel (un)shuffle of the ViT patch grid fused with the LayerNorm that opens the projector `mlp1`.

Semantics: `layer_norm(drop_cls_and_shuffle(vit_hidden, 0.5, ps_version), (4C,), weight, bias, eps)`, i.e.
drop the class token, view the side x side patch grid (row-major), gather every 2x2 neighbourhood into one
4C-wide token in the official element order, then LayerNorm over 4C. With h = side // 2, output token
t = p * h + q holds four C-wide chunks j = 0..3 (dr = j // 2, dc = j % 2) taken from patch

    v1: (row, col) = (2q + dr, 2p + dc)     (the transposed token order the V1.5 weights were trained with)
    v2: (row, col) = (2p + dr, 2q + dc)

which is the formula of tests/test_projector.py written per chunk. Nothing is materialised between the
gather and the normalisation: each source element is read once and each output element written once.

Design: a 1-D grid over all tiles * h*h output tokens, TOKENS consecutive tokens per program (16 for tiny
widths, 2 for C = 1024, 1 for C = 3200). When C <= 4096 the 4 chunks live in registers as [TOKENS, BLOCK_C]
fp32 tiles (masked past C) and mean / variance are an exact two-pass over them; wider C loops over BLOCK_C
slices, merging per-slice mean / M2 (Chan's formula), then re-reads the row (cache-hot) to normalise.

Full-size shapes (448 px tiles, side 32, 256 output tokens per tile):
    InternViT-6B  (InternVL-Chat-V1.5):  vit_hidden [tiles, 1025, 3200] -> out [tiles, 256, 12800]
    InternViT-300M (Mini-InternVL 2B/4B): vit_hidden [tiles, 1025, 1024] -> out [tiles, 256, 4096]
tiles = (dynamic tiles + 1 thumbnail) per image, summed over the batch (13 per image at max_num 12).

Bytes moved per call (memory bound, no FLOP count worth reporting):
    tiles * 1024 * C * elem (read)  +  tiles * 256 * 4C * elem (write)  +  2 * 4C * param_elem (weight, bias)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from internvl_engine.models.projector import drop_cls_and_shuffle

# Largest power-of-two chunk width held in registers (4 chunks of it per program). C = 3200 (6B) -> 4096 fits;
# wider ViTs fall back to the looped two-read path.
_MAX_REGISTER_BLOCK_C = 4096
_LOOP_BLOCK_C = 2048


@triton.jit
def _pixel_unshuffle_layernorm_kernel(
    x_ptr,  # [tiles, seq, C]; seq = 1 + side * side; last dim contiguous, other strides arbitrary
    w_ptr,  # [4C] contiguous (LayerNorm weight)
    b_ptr,  # [4C] contiguous (LayerNorm bias)
    out_ptr,  # [tiles, h * h, 4C] contiguous, h = side // 2
    stride_xt,  # elements between tiles of x
    stride_xs,  # elements between tokens of x
    C,  # ViT width
    SIDE,  # patch grid side (even)
    n_tokens,  # tiles * h * h output tokens in all
    eps,
    PS_V2: tl.constexpr,  # False: v1 token order, True: v2
    TOKENS: tl.constexpr,  # output tokens (rows) per program, power of two
    BLOCK_C: tl.constexpr,  # power of two; >= C when ONE_BLOCK
    ONE_BLOCK: tl.constexpr,  # True: whole 4C rows held in registers as 4 chunks of [TOKENS, BLOCK_C]
):
    # Global output token g = tile * h*h + t, TOKENS consecutive ones per program (they may straddle tiles).
    g = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)  # [TOKENS] int64
    row_ok = g < n_tokens
    half = SIDE // 2
    n_out = half * half
    tile = g // n_out
    t = g % n_out
    p = t // half
    q = t % half
    if PS_V2:
        row0 = 2 * p
        col0 = 2 * q
    else:
        row0 = 2 * q
        col0 = 2 * p
    # Source token (class token at 0) of chunk j = 0..3 is 1 + (row0 + j // 2) * SIDE + col0 + j % 2.
    src0 = x_ptr + tile * stride_xt + (1 + row0 * SIDE + col0) * stride_xs  # [TOKENS] pointers
    out_row = out_ptr + g * 4 * C  # [TOKENS] pointers
    n_total = 4 * C
    offs = tl.arange(0, BLOCK_C)

    if ONE_BLOCK:
        col_ok = offs < C
        mask = row_ok[:, None] & col_ok[None, :]  # [TOKENS, BLOCK_C]
        cols = offs[None, :]
        x0 = tl.load((src0)[:, None] + cols, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load((src0 + stride_xs)[:, None] + cols, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load((src0 + SIDE * stride_xs)[:, None] + cols, mask=mask, other=0.0).to(tl.float32)
        x3 = tl.load((src0 + (SIDE + 1) * stride_xs)[:, None] + cols, mask=mask, other=0.0).to(tl.float32)
        # Exact two-pass statistics over the register-resident rows (masked lanes are zero).
        mean = (tl.sum(x0, axis=1) + tl.sum(x1, axis=1) + tl.sum(x2, axis=1) + tl.sum(x3, axis=1)) / n_total
        d0 = tl.where(mask, x0 - mean[:, None], 0.0)
        d1 = tl.where(mask, x1 - mean[:, None], 0.0)
        d2 = tl.where(mask, x2 - mean[:, None], 0.0)
        d3 = tl.where(mask, x3 - mean[:, None], 0.0)
        var = (tl.sum(d0 * d0, axis=1) + tl.sum(d1 * d1, axis=1) + tl.sum(d2 * d2, axis=1)
               + tl.sum(d3 * d3, axis=1)) / n_total
        rstd = 1.0 / tl.sqrt(var + eps)  # [TOKENS]
        for j in tl.static_range(4):
            if j == 0:
                d = d0
            elif j == 1:
                d = d1
            elif j == 2:
                d = d2
            else:
                d = d3
            w = tl.load(w_ptr + j * C + offs, mask=col_ok, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + j * C + offs, mask=col_ok, other=0.0).to(tl.float32)
            y = d * rstd[:, None] * w[None, :] + b[None, :]
            tl.store(out_row[:, None] + j * C + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # Read 1: per-block mean / M2 (exact inside the block), merged with Chan's parallel formula.
        mean = tl.zeros([TOKENS], dtype=tl.float32)
        m2 = tl.zeros([TOKENS], dtype=tl.float32)
        for j in tl.static_range(4):
            src = src0 + ((j // 2) * SIDE + (j % 2)) * stride_xs
            for c0 in range(0, C, BLOCK_C):
                col_ok = c0 + offs < C
                mask = row_ok[:, None] & col_ok[None, :]
                xv = tl.load(src[:, None] + (c0 + offs)[None, :], mask=mask, other=0.0).to(tl.float32)
                nb = tl.minimum(C - c0, BLOCK_C).to(tl.float32)
                mean_b = tl.sum(xv, axis=1) / nb
                db = tl.where(mask, xv - mean_b[:, None], 0.0)
                m2_b = tl.sum(db * db, axis=1)
                count = (j * C + c0).to(tl.float32)  # elements merged so far (no loop-carried scalar)
                new_count = count + nb
                delta = mean_b - mean
                mean = mean + delta * (nb / new_count)
                m2 = m2 + m2_b + delta * delta * (count * nb / new_count)
        rstd = 1.0 / tl.sqrt(m2 / n_total + eps)
        # Read 2 (L1/L2-resident on a GPU): normalise, scale, shift, store once.
        for j in tl.static_range(4):
            src = src0 + ((j // 2) * SIDE + (j % 2)) * stride_xs
            for c0 in range(0, C, BLOCK_C):
                col_ok = c0 + offs < C
                mask = row_ok[:, None] & col_ok[None, :]
                cols = (c0 + offs)[None, :]
                xv = tl.load(src[:, None] + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + j * C + c0 + offs, mask=col_ok, other=0.0).to(tl.float32)
                b = tl.load(b_ptr + j * C + c0 + offs, mask=col_ok, other=0.0).to(tl.float32)
                y = (xv - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
                tl.store(out_row[:, None] + j * C + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _grid_side(seq: int) -> int:
    """side of the patch grid behind seq = 1 + side * side tokens; must be a positive even integer."""
    n_patches = seq - 1
    side = int(round(max(n_patches, 0) ** 0.5))
    if n_patches <= 0 or side * side != n_patches or side % 2 != 0:
        raise ValueError(
            f"vit_hidden has {seq} tokens; expected 1 + side*side with an even side (1025 for 448 px tiles)"
        )
    return side


def pixel_unshuffle_layernorm(
    vit_hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    ps_version: str = "v1",
    *,
    block_c: int | None = None,
) -> torch.Tensor:
    """vit_hidden [tiles, 1 + side^2, C] -> out [tiles, (side/2)^2, 4C] (contiguous, input dtype).

    out = layer_norm(drop_cls_and_shuffle(vit_hidden, 0.5, ps_version), (4C,), weight, bias, eps).
    `block_c` (a power of two) overrides the chunk width; when it is smaller than C the looped path runs
    (used by the tests to cover that path with tiny widths).
    """
    if ps_version not in ("v1", "v2"):
        raise ValueError(f"ps_version must be 'v1' or 'v2', got {ps_version!r}")
    if vit_hidden.dim() != 3:
        raise ValueError(f"vit_hidden must be [tiles, seq, C], got shape {tuple(vit_hidden.shape)}")
    if not vit_hidden.is_floating_point():
        raise ValueError(f"vit_hidden must be floating point, got {vit_hidden.dtype}")
    tiles, seq, c = vit_hidden.shape
    if c > 1 and vit_hidden.stride(2) != 1:
        raise ValueError(f"vit_hidden's last dim must be contiguous, got strides {vit_hidden.stride()}")
    side = _grid_side(seq)
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None or param.dim() != 1 or param.shape[0] != 4 * c:
            shape = None if param is None else tuple(param.shape)
            raise ValueError(f"{name} must have shape [4C] = [{4 * c}], got {shape}")
        if param.device != vit_hidden.device:
            raise ValueError(f"{name} is on {param.device}, vit_hidden on {vit_hidden.device}")
        if not param.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {param.dtype}")
    weight = weight.contiguous()
    bias = bias.contiguous()
    n_out = (side // 2) ** 2
    out = torch.empty((tiles, n_out, 4 * c), dtype=vit_hidden.dtype, device=vit_hidden.device)
    if tiles == 0 or c == 0:
        return out

    if block_c is not None:
        if block_c <= 0 or block_c & (block_c - 1):
            raise ValueError(f"block_c must be a positive power of two, got {block_c}")
        one_block = block_c >= c
    else:
        one_block = c <= _MAX_REGISTER_BLOCK_C
        block_c = triton.next_power_of_2(c) if one_block else _LOOP_BLOCK_C
    # Several tokens per program only when C is narrow, so that a program keeps at most 4 x 2048 fp32 values
    # (1 token for ViT widths >= 2048: C = 3200 keeps 4 x 4096, about 32 values per thread at 16 warps).
    chunk = 4 * block_c if one_block else block_c
    tokens = max(1, min(16, 8192 // chunk))
    num_warps = max(1, min(16, tokens * chunk // 512))
    n_tokens = tiles * n_out
    grid = (triton.cdiv(n_tokens, tokens),)
    _pixel_unshuffle_layernorm_kernel[grid](
        vit_hidden, weight, bias, out,
        vit_hidden.stride(0), vit_hidden.stride(1),
        c, side, n_tokens, float(eps),
        PS_V2=(ps_version == "v2"),
        TOKENS=tokens,
        BLOCK_C=block_c,
        ONE_BLOCK=one_block,
        num_warps=num_warps,
    )
    return out


def pixel_unshuffle_layernorm_ref(
    vit_hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    ps_version: str = "v1",
) -> torch.Tensor:
    """PyTorch reference: the model's own drop_cls_and_shuffle followed by LayerNorm(4C)."""
    # .contiguous(): the model's view chain rejects a padded token pitch, which the kernel accepts.
    shuffled = drop_cls_and_shuffle(vit_hidden.contiguous(), 0.5, ps_version)
    return torch.nn.functional.layer_norm(shuffled, (shuffled.shape[-1],), weight, bias, eps)
