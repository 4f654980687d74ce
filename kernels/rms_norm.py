"""RMSNorm fused with the residual add that precedes it (and InternViT's layer scale), one read of each input.

Semantics, exactly the official order of operations (`models/layers.RMSNorm`):
    h   = x                                    without a residual
    h   = residual + (x * layer_scale)         with one (x * layer_scale rounded to the dtype first, as torch does)
    out = weight * (h.float() * rsqrt(mean(h.float()^2) + eps)).to(h.dtype)
i.e. normalise in float32, cast back to the activation dtype, THEN multiply by the weight (in the weight's and
the activation's promoted dtype). With a residual the wrapper returns (out, h): h is the next residual stream.

  x:           [..., N] activations (the sub-layer's output when a residual is given); the last dim contiguous,
               rows at any stride (e.g. InternViT's q/k, strided views of the packed qkv projection)
  residual:    [..., N] the residual stream, same dtype
  layer_scale: [N] InternViT's ls1 / ls2 (only with a residual)
  weight:      [N]
  out:         [..., N] contiguous, dtype promote(weight, x) (the activation dtype in the engine)

Design: one program per row (rows narrower than 2048 are packed ROWS to a program, up to 64, so that a
program still moves ~2048 values), the whole row register-resident when N <= 8192 (BLOCK_N = next power of two,
masked): a single pass with one read of x / residual and one write of h and of out; the mean of squares is a
tree reduction of the fp32 row. Wider rows (no model in the family has them) loop over BLOCK_N slices twice:
pass 1 accumulates the squares of h in an fp32 vector, pass 2 recomputes h from the inputs (cache-hot), writes
it and normalises, so the kernel is correct when h aliases the residual.

Full-size rows (N): InternLM2-20B 6144, InternLM2-1.8B 2048, Phi-3-mini 3072, InternViT-6B 3200 (norm1/norm2,
and q_norm / k_norm over the whole width). Rows: tokens (LLM) or tiles * 1025 (ViT). Memory bound:
rows * N * elem * (2 reads + 2 writes) with a residual, (1 read + 1 write) without.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_REGISTER_BLOCK = 8192  # widest row held in registers (6144 -> 8192 at 16 warps: 16 values per thread)
_LOOP_BLOCK = 4096
_MIN_VALUES = 2048  # values per program that rows narrower than this are packed to
_MAX_ROWS = 64
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [rows, N] (row stride stride_x, last dim contiguous)
    residual_ptr,  # [rows, N] (row stride stride_r); read only when HAS_RESIDUAL
    scale_ptr,  # [N] layer scale; read only when HAS_SCALE
    weight_ptr,  # [N]
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
        col_ok = offs < N
        mask = row_ok[:, None] & col_ok[None, :]  # [ROWS, BLOCK_N]
        cols = offs[None, :]
        h = tl.load(x_rows + cols, mask=mask, other=0.0)  # activation dtype
        if HAS_RESIDUAL:
            h = _add_residual(h, r_rows, scale_ptr, cols, mask, N, HAS_SCALE, h_ptr.dtype.element_ty)
            tl.store(h_rows + cols, h, mask=mask)
        hf = h.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(hf * hf, axis=1) / N + eps)  # [ROWS]; masked lanes are zero
        w = tl.load(weight_ptr + offs, mask=col_ok, other=0.0)
        normed = (hf * rstd[:, None]).to(h.dtype)  # cast back to the activation dtype before the weight
        y = normed.to(tl.float32) * w.to(tl.float32)[None, :]  # exact for 16-bit inputs; rounded once below
        tl.store(out_rows + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        squares = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + offs[None, :]
            mask = row_ok[:, None] & (cols < N)
            h = tl.load(x_rows + cols, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                h = _add_residual(h, r_rows, scale_ptr, cols, mask, N, HAS_SCALE, h_ptr.dtype.element_ty)
            hf = h.to(tl.float32)
            squares += hf * hf
        rstd = tl.rsqrt(tl.sum(squares, axis=1) / N + eps)
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
            w = tl.load(weight_ptr + cols, mask=col_ok, other=0.0)
            normed = (h.to(tl.float32) * rstd[:, None]).to(h.dtype)
            y = normed.to(tl.float32) * w.to(tl.float32)
            tl.store(out_rows + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_residual(x, r_rows, scale_ptr, cols, mask, N, HAS_SCALE: tl.constexpr, DTYPE: tl.constexpr):
    # residual + x (* layer_scale) over a [ROWS, BLOCK_N] tile: each torch op rounds to the activation dtype, so
    # each is rounded here too.
    r = tl.load(r_rows + cols, mask=mask, other=0.0)
    if HAS_SCALE:
        s = tl.load(scale_ptr + cols, mask=cols < N, other=0.0)  # [1, BLOCK_N]
        x = (x.to(tl.float32) * s.to(tl.float32)).to(DTYPE)
    return (r.to(tl.float32) + x.to(tl.float32)).to(DTYPE)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] -> a [rows, N] view (a copy only when the leading dims cannot be flattened) with a unit last
    stride."""
    flat = t.reshape(-1, t.shape[-1])
    if flat.shape[1] > 1 and flat.stride(1) != 1:
        flat = flat.contiguous()
    return flat


def check_row_inputs(kernel: str, x: torch.Tensor, params: dict[str, torch.Tensor | None],
                     residual: torch.Tensor | None, layer_scale: torch.Tensor | None) -> None:
    """The checks the row-wise norm wrappers share (rms_norm, layer_norm)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{kernel}: x must be a tensor [..., N]")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{kernel}: unsupported dtype {x.dtype}; expected one of {_SUPPORTED_DTYPES}")
    n = x.shape[-1]
    vectors = dict(params, layer_scale=layer_scale)
    for name, p in vectors.items():
        if p is None:
            continue
        if p.dim() != 1 or p.shape[0] != n:
            raise ValueError(f"{kernel}: {name} must have shape [{n}], got {tuple(p.shape)}")
        if p.device != x.device or p.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"{kernel}: {name} must be a float tensor on {x.device}, got {p.dtype} on {p.device}")
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"{kernel}: residual must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), got "
                             f"({tuple(residual.shape)}, {residual.dtype}, {residual.device})")
    elif layer_scale is not None:
        raise ValueError(f"{kernel}: layer_scale scales the residual branch; pass a residual with it")


def row_block(n: int, block_n: int | None) -> tuple[int, int, bool, int]:
    """(ROWS, BLOCK_N, ONE_BLOCK, num_warps) for rows of n elements. block_n (a power of two) forces the slice
    width (the tests use it to run the looped path on small rows)."""
    if block_n is not None:
        if block_n <= 0 or block_n & (block_n - 1):
            raise ValueError(f"block_n must be a positive power of two, got {block_n}")
        one_block = block_n >= n
    else:
        one_block = n <= _MAX_REGISTER_BLOCK
        block_n = triton.next_power_of_2(n) if one_block else _LOOP_BLOCK
    # Rows narrower than 2048 share a program (ViT-300M's 1024: 2 rows), so a program moves at least ~2048 values.
    rows = max(1, min(_MAX_ROWS, _MIN_VALUES // block_n)) if one_block else 1
    # About 8 values per thread (a 16-byte vector of 16-bit values): 2048 -> 8 warps, 4096 and 8192 -> 16.
    num_warps = max(1, min(16, rows * block_n // 256))
    return rows, block_n, one_block, num_warps


def residual_target(kernel: str, x: torch.Tensor, residual_out: torch.Tensor | None) -> torch.Tensor:
    """Where the new residual h goes: `residual_out` (viewable as [rows, N] with a unit last stride), or a new
    contiguous tensor."""
    if residual_out is None:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if residual_out.shape != x.shape or residual_out.dtype != x.dtype or residual_out.device != x.device:
        raise ValueError(f"{kernel}: residual_out must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), got "
                         f"({tuple(residual_out.shape)}, {residual_out.dtype}, {residual_out.device})")
    n = x.shape[-1]
    try:
        rows = residual_out.view(-1, n)
    except RuntimeError as exc:
        raise ValueError(f"{kernel}: residual_out must be viewable as [rows, {n}]") from exc
    if n > 1 and rows.stride(1) != 1:
        raise ValueError(f"{kernel}: residual_out's last dim must be contiguous")
    return residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             layer_scale: torch.Tensor | None = None, *, residual_out: torch.Tensor | None = None,
             block_n: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x [..., N] -> out [..., N]; with `residual`, of h = residual + x (* layer_scale) -> (out, h).

    residual_out: where h goes (`residual` itself updates the stream in place); by default a new tensor.
    block_n: see `row_block`.
    """
    check_row_inputs("rms_norm", x, {"weight": weight}, residual, layer_scale)
    n = x.shape[-1]
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    h = residual_target("rms_norm", x, residual_out) if residual is not None else None
    rows = out.numel() // n if n else 0
    if rows == 0:
        return out if h is None else (out, h)
    x2, out2 = as_rows(x), out.view(-1, n)
    r2 = as_rows(residual) if residual is not None else x2
    h2 = h.view(-1, n) if h is not None else out2
    scale = layer_scale.contiguous() if layer_scale is not None else weight  # never read without HAS_SCALE
    per_program, block, one_block, num_warps = row_block(n, block_n)
    _rms_norm_kernel[(triton.cdiv(rows, per_program),)](
        x2, r2, scale, weight.contiguous(), out2, h2,
        x2.stride(0), r2.stride(0), out2.stride(0), h2.stride(0), rows, n, float(eps),
        HAS_RESIDUAL=residual is not None, HAS_SCALE=layer_scale is not None,
        ROWS=per_program, BLOCK_N=block, ONE_BLOCK=one_block, num_warps=num_warps,
    )
    return out if h is None else (out, h)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 layer_scale: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference, the model's own op order: (residual + x * layer_scale), then `models.layers.RMSNorm`."""
    h = x
    if residual is not None:
        h = residual + (x * layer_scale if layer_scale is not None else x)
    h32 = h.to(torch.float32)
    out = weight * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return out if residual is None else (out, h)
