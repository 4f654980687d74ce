"""SwiGLU's elementwise half: silu(gate) * up, read once from the output of one gate_up GEMM.

Semantics, the torch op order of both LLMs' MLPs (InternLM2: `act(w1 x) * w3 x`, Phi-3: `up * act(gate)`):
    s   = silu(gate)   computed in float32 (gate / (1 + exp(-gate))), rounded to the activation dtype
    out = s * up       rounded to the activation dtype
  gate_up: [..., 2I]; the first I columns are the gate, the last I the up projection (Phi-3's gate_up_proj rows;
           InternLM2's w1 then w3, see `models/internlm2.FeedForward.fuse_gate_up`). Last dim contiguous, rows at
           any stride.
  out:     [..., I] contiguous, gate_up's dtype.
`silu_mul_pair(gate, up)` takes the two halves as separate [..., I] tensors (InternLM2 with int8 w1 / w3, which
stay two GEMMs).

Design: a 2-D grid (rows, cdiv(I, BLOCK)): each program reads BLOCK gate and BLOCK up values of one row and
writes BLOCK outputs. BLOCK = 1024 at 4 warps (8 values per thread: 16-byte vectors of bf16/fp16); rows on grid
axis 0 (up to 2^31 - 1), column blocks on axis 1 (16 for I = 16384, far below 65535). Rows narrower than 1024
(test models only) are packed ROWS to a program.

Full-size I: InternLM2-20B 16384, InternLM2-1.8B 8192, Phi-3-mini 8192; rows = tokens of the step. Memory
bound: rows * I * elem * (2 reads + 1 write), against torch's silu + mul (3 reads + 2 writes, 2 launches).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_BLOCK = 1024
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _silu_mul_kernel(
    gate_ptr,  # [rows, I] (row stride stride_gate, last dim contiguous)
    up_ptr,  # [rows, I] (row stride stride_up, last dim contiguous)
    out_ptr,  # [rows, I] (row stride stride_out)
    stride_gate,  # int64 strides, in elements
    stride_up,
    stride_out,
    n_rows,
    I,
    ROWS: tl.constexpr,  # rows per program (power of two; > 1 only when I < 1024: test models)
    BLOCK: tl.constexpr,  # columns per program, power of two
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS] int64
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = (rows < n_rows)[:, None] & (cols < I)[None, :]  # [ROWS, BLOCK]
    gate = tl.load(gate_ptr + rows[:, None] * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + rows[:, None] * stride_up + cols[None, :], mask=mask, other=0.0)
    # torch rounds silu's float32 result to the activation dtype before the product.
    activated = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty)
    out = activated.to(tl.float32) * up.to(tl.float32)  # exact for 16-bit inputs; rounded once below
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _check(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() < 1:
        raise ValueError(f"silu_mul: {name} must be a tensor [..., width]")
    if t.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"silu_mul: unsupported dtype {t.dtype}; expected one of {_SUPPORTED_DTYPES}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., w] -> [rows, w] view (a copy only if the leading dims cannot be flattened), unit last stride."""
    flat = t.reshape(-1, t.shape[-1])
    return flat.contiguous() if flat.shape[1] > 1 and flat.stride(1) != 1 else flat


def _launch(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor, block: int | None) -> torch.Tensor:
    # gate, up: [rows, I] with unit last stride; out: [rows, I] contiguous.
    rows, width = out.shape
    block = block or min(_BLOCK, triton.next_power_of_2(width))
    if block <= 0 or block & (block - 1):
        raise ValueError(f"silu_mul: block must be a positive power of two, got {block}")
    per_program = max(1, min(64, _BLOCK // block))  # narrow rows share a program (1 for every real model)
    grid = (triton.cdiv(rows, per_program), triton.cdiv(width, block))
    _silu_mul_kernel[grid](gate, up, out, gate.stride(0), up.stride(0), out.stride(0), rows, width,
                           ROWS=per_program, BLOCK=block, num_warps=max(1, min(4, per_program * block // 256)))
    return out


def silu_mul(gate_up: torch.Tensor, *, block: int | None = None) -> torch.Tensor:
    """gate_up [..., 2I] -> silu(gate_up[..., :I]) * gate_up[..., I:] as [..., I] (contiguous, same dtype).

    block: a power of two overriding the columns per program (tests)."""
    _check("gate_up", gate_up)
    if gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul: gate_up's last dim must be even (gate then up), got {gate_up.shape[-1]}")
    width = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], width), dtype=gate_up.dtype, device=gate_up.device)
    if out.numel() == 0:
        return out
    rows = _rows(gate_up)
    _launch(rows[:, :width], rows[:, width:], out.view(-1, width), block)
    return out


def silu_mul_pair(gate: torch.Tensor, up: torch.Tensor, *, block: int | None = None) -> torch.Tensor:
    """silu(gate) * up for two [..., I] tensors (same shape, dtype, device) -> [..., I] contiguous."""
    _check("gate", gate)
    _check("up", up)
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"silu_mul: gate and up differ: {tuple(gate.shape)} {gate.dtype} {gate.device} vs "
                         f"{tuple(up.shape)} {up.dtype} {up.device}")
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    width = gate.shape[-1]
    _launch(_rows(gate), _rows(up), out.view(-1, width), block)
    return out


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """PyTorch reference: the models' own ops on the two halves."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
