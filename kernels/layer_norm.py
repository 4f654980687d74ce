"""LayerNorm fused with InternViT's layer-scaled residual add (`x + ls * branch`), one read of each input.

Semantics, in the order the torch layer computes them (`models/intern_vit.VisionEncoderLayer`):
    h   = x                                    without a residual
    h   = residual + (x * layer_scale)         with one (x * layer_scale rounded to the dtype first, as torch does)
    out = layer_norm(h, (N,), weight, bias, eps)   statistics and affine in float32, rounded once to h's dtype
With a residual the wrapper returns (out, h): h is the next residual stream (the encoder layer's output when this
is the next layer's norm1).

  x:           [..., N] activations (the attention / MLP output when a residual is given); last dim contiguous,
               rows at any stride
  residual:    [..., N] the residual stream, same dtype
  layer_scale: [N] ls1 / ls2 (only with a residual; None: a plain residual add)
  weight, bias:[N] (bias may be None)
  out:         [..., N] contiguous, x's dtype

Design: as `rms_norm` (whose row helpers it shares): one program per row, narrow rows packed ROWS to a program,
whole rows in registers when N <= 8192 with exact two-pass statistics over the register-resident row (mean, then
the mean of squared deviations: no E[x^2] - E[x]^2 cancellation). Wider rows loop over BLOCK_N slices: pass 1
merges each slice's mean / M2 with Chan's parallel formula, pass 2 recomputes h (cache-hot), writes it and
normalises.

Full-size rows (N): InternViT-300M (Mini-InternVL 2B / 4B, norm_type layer_norm) 1024, rows = tiles * 1025.
InternViT-6B uses RMSNorm (`rms_norm`). Memory bound: rows * N * elem * (2 reads + 2 writes) with a residual.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from internvl_engine.kernels.rms_norm import _add_residual, as_rows, check_row_inputs, residual_target, row_block


@triton.jit
def _layer_norm_kernel(
    x_ptr,  # [rows, N] (row stride stride_x, last dim contiguous)
    residual_ptr,  # [rows, N] (row stride stride_r); read only when HAS_RESIDUAL
    scale_ptr,  # [N] layer scale; read only when HAS_SCALE
    weight_ptr,  # [N]
    bias_ptr,  # [N]; read only when HAS_BIAS
    out_ptr,  # [rows, N] (row stride stride_out)
    h_ptr,  # [rows, N] new residual h (row stride stride_h); written only when HAS_RESIDUAL, may alias residual
    stride_x,  # int64 strides, in elements
    stride_r,
    stride_out,
    stride_h,
    n_rows,
    N,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr,  # rows per program (power of two; > 1 only for narrow rows)
    BLOCK_N: tl.constexpr,  # power of two; >= N when ONE_BLOCK
    ONE_BLOCK: tl.constexpr,  # True: whole rows in registers
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS] int64
    row_ok = rows < n_rows
    x_rows = x_ptr + rows[:, None] * stride_x  # [ROWS, 1] pointers
    r_rows = residual_ptr + rows[:, None] * stride_r
    out_rows = out_ptr + rows[:, None] * stride_out
    h_rows = h_ptr + rows[:, None] * stride_h
    offs = tl.arange(0, BLOCK_N)
    if ONE_BLOCK:
        cols = offs[None, :]
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok  # [ROWS, BLOCK_N]
        h = tl.load(x_rows + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            h = _add_residual(h, r_rows, scale_ptr, cols, mask, N, HAS_SCALE, h_ptr.dtype.element_ty)
            tl.store(h_rows + cols, h, mask=mask)
        hf = h.to(tl.float32)
        mean = tl.sum(hf, axis=1) / N  # [ROWS]; masked lanes are zero
        centred = tl.where(mask, hf - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / N + eps)
        y = _affine(centred * rstd[:, None], weight_ptr, bias_ptr, cols, col_ok, HAS_BIAS)
        tl.store(out_rows + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        mean = tl.zeros([ROWS], dtype=tl.float32)
        m2 = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + offs[None, :]
            mask = row_ok[:, None] & (cols < N)
            h = tl.load(x_rows + cols, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                h = _add_residual(h, r_rows, scale_ptr, cols, mask, N, HAS_SCALE, h_ptr.dtype.element_ty)
            hf = h.to(tl.float32)
            count_b = tl.minimum(N - start, BLOCK_N).to(tl.float32)
            mean_b = tl.sum(hf, axis=1) / count_b
            centred = tl.where(mask, hf - mean_b[:, None], 0.0)
            m2_b = tl.sum(centred * centred, axis=1)
            # Chan et al.: merge (start values: mean, m2) with (count_b values: mean_b, m2_b).
            count = tl.zeros([ROWS], dtype=tl.float32) + start  # values merged so far
            total = count + count_b
            delta = mean_b - mean
            mean = mean + delta * (count_b / total)
            m2 = m2 + m2_b + delta * delta * (count * count_b / total)
        rstd = tl.rsqrt(m2 / N + eps)
        for start in range(0, N, BLOCK_N):
            cols = start + offs[None, :]
            col_ok = cols < N
            mask = row_ok[:, None] & col_ok
            h = tl.load(x_rows + cols, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                # Recomputed from the inputs and stored only now: h may alias residual, and each element is
                # read (above) before the same thread overwrites it (below).
                h = _add_residual(h, r_rows, scale_ptr, cols, mask, N, HAS_SCALE, h_ptr.dtype.element_ty)
                tl.store(h_rows + cols, h, mask=mask)
            normed = (h.to(tl.float32) - mean[:, None]) * rstd[:, None]
            y = _affine(normed, weight_ptr, bias_ptr, cols, col_ok, HAS_BIAS)
            tl.store(out_rows + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _affine(normed, weight_ptr, bias_ptr, cols, col_ok, HAS_BIAS: tl.constexpr):
    # normed [ROWS, BLOCK_N] fp32 -> normed * weight (+ bias), fp32; cols / col_ok [1, BLOCK_N].
    w = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = normed * w
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return y


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
               residual: torch.Tensor | None = None, layer_scale: torch.Tensor | None = None, *,
               residual_out: torch.Tensor | None = None,
               block_n: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm of x [..., N] -> out [..., N]; with `residual`, of h = residual + x (* layer_scale) -> (out, h).

    residual_out: where h goes (`residual` itself updates the stream in place); by default a new tensor.
    block_n: a power of two forcing the slice width (see `rms_norm.row_block`).
    """
    check_row_inputs("layer_norm", x, {"weight": weight, "bias": bias}, residual, layer_scale)
    n = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = residual_target("layer_norm", x, residual_out) if residual is not None else None
    rows = out.numel() // n if n else 0
    if rows == 0:
        return out if h is None else (out, h)
    x2, out2 = as_rows(x), out.view(-1, n)
    r2 = as_rows(residual) if residual is not None else x2
    h2 = h.view(-1, n) if h is not None else out2
    weight = weight.contiguous()
    scale = layer_scale.contiguous() if layer_scale is not None else weight  # never read without HAS_SCALE
    shift = bias.contiguous() if bias is not None else weight  # never read without HAS_BIAS
    per_program, block, one_block, num_warps = row_block(n, block_n)
    _layer_norm_kernel[(triton.cdiv(rows, per_program),)](
        x2, r2, scale, weight, shift, out2, h2,
        x2.stride(0), r2.stride(0), out2.stride(0), h2.stride(0), rows, n, float(eps),
        HAS_RESIDUAL=residual is not None, HAS_SCALE=layer_scale is not None, HAS_BIAS=bias is not None,
        ROWS=per_program, BLOCK_N=block, ONE_BLOCK=one_block, num_warps=num_warps,
    )
    return out if h is None else (out, h)


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                   residual: torch.Tensor | None = None, layer_scale: torch.Tensor | None = None
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference, the model's own op order: (residual + x * layer_scale), then F.layer_norm."""
    h = x
    if residual is not None:
        h = residual + (x * layer_scale if layer_scale is not None else x)
    out = torch.nn.functional.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    return out if residual is None else (out, h)
