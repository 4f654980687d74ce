"""Non-causal (bidirectional) attention for the InternViT encoder: a flash-attention forward in Triton.

`vit_attention(q, k, v, scale=None)` computes softmax(q @ k^T * scale) @ v per (tile, head) with
  q, k, v: [tiles, heads, seq, head_dim], fp16 / bf16 / fp32, any strides. The model produces them as
           `qkv.reshape(tiles, seq, 3, width).unbind(2)` then `.reshape(tiles, seq, heads, head_dim).transpose(1, 2)`
           of the packed qkv projection [tiles, seq, 3 * heads * head_dim]; the kernel reads those strided views
           directly (all four strides of each tensor), so no `.contiguous()` copy is ever made.
  out:     [tiles, heads, seq, head_dim] view of a contiguous [tiles, seq, heads, head_dim] buffer, dtype of q.
           Hence the caller's `out.transpose(1, 2).reshape(tiles, seq, heads * head_dim)` is free (a view).
  scale:   defaults to head_dim ** -0.5.

Algorithm: one program owns BLOCK_M query rows of one (tile, head) and streams over all keys in BLOCK_N
blocks with the online softmax (running row max m_i, running denominator l_i, fp32 accumulator), using exp2
with log2(e) folded into the scale. S = QK^T and P never touch memory; the output is normalised once at the end
and stored in the input dtype. Keys are split into full blocks (no masks in the hot loop) and one masked tail
block; query rows past `seq` are masked at load/store. fp32 inputs use IEEE dots (not TF32) so fp32 stays
fp32-accurate; fp16/bf16 inputs use tensor-core dots with P cast to the input dtype (as flash-attention does).
Grid: (cdiv(seq, BLOCK_M), tiles * heads); axis 0 varies fastest, so the programs sharing one head's K/V run
together and K/V are re-read from L2. tiles*heads above CUDA's grid-y limit is split into several launches.

Full-size shapes (one launch per encoder layer; a 4K image has 41 tiles, batches of requests add more):
  InternViT-6B (InternVL-Chat-V1.5):    seq 1025 (class token + 32x32 patches), heads 25, head_dim 128
  InternViT-300M (Mini-InternVL-*-1.5): seq 1025, heads 16, head_dim 64
FLOPs per call = 4 * tiles * heads * seq^2 * head_dim (two matmuls, 2 FLOPs per multiply-add; exp not counted).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_GRID_Y = 65535  # CUDA limit on gridDim.y


@triton.jit
def _attend_key_block(acc, l_i, m_i, q, k_base, v_base, start_n, seq,
                      stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                      offs_n, offs_d,
                      MASK_N: tl.constexpr, DOT_IEEE: tl.constexpr):
    # acc: [BLOCK_M, HEAD_DIM] fp32; l_i, m_i: [BLOCK_M] fp32; q: [BLOCK_M, HEAD_DIM] input dtype.
    n_idx = start_n + offs_n  # [BLOCK_N] key positions
    n_off = n_idx.to(tl.int64)
    # K is loaded already transposed, [HEAD_DIM, BLOCK_N], so S = q @ kT needs no tl.trans.
    k_ptrs = k_base + offs_d[:, None] * stride_kd + n_off[None, :] * stride_kn
    v_ptrs = v_base + n_off[:, None] * stride_vn + offs_d[None, :] * stride_vd  # [BLOCK_N, HEAD_DIM]
    if MASK_N:
        n_valid = n_idx < seq
        k = tl.load(k_ptrs, mask=n_valid[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=n_valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if DOT_IEEE:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    s = s * qk_scale  # [BLOCK_M, BLOCK_N] fp32, log2 domain (scale * log2(e))
    if MASK_N:
        s = tl.where(n_valid[None, :], s, float("-inf"))
    # The tail block always holds >= 1 valid key, so m_new is finite and exp2(-inf - m_new) = 0.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max (0 on the first block)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DOT_IEEE:
        acc = tl.dot(p, v, acc=acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc=acc)
    return acc, l_i, m_new


@triton.jit
def _vit_attention_kernel(
    Q,  # [tiles, heads, seq, HEAD_DIM], strided
    K,  # [tiles, heads, seq, HEAD_DIM], strided
    V,  # [tiles, heads, seq, HEAD_DIM], strided
    O,  # [tiles, heads, seq, HEAD_DIM] view of a contiguous [tiles, seq, heads, HEAD_DIM] buffer
    seq, heads, qk_scale,
    stride_qt, stride_qh, stride_qs, stride_qd,
    stride_kt, stride_kh, stride_ks, stride_kd,
    stride_vt, stride_vh, stride_vs, stride_vd,
    stride_ot, stride_oh, stride_os, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # int64: tile * stride_t can exceed 2^31 for big batches
    tile = pid_bh // heads
    head = pid_bh % heads
    q_base = Q + tile * stride_qt + head * stride_qh
    k_base = K + tile * stride_kt + head * stride_kh
    v_base = V + tile * stride_vt + head * stride_vh
    o_base = O + tile * stride_ot + head * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query positions
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < seq
    m_off = offs_m.to(tl.int64)
    # Padded query rows load zeros: their scores are 0, so they stay finite and are dropped at the store.
    q = tl.load(q_base + m_off[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=m_valid[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    n_full = (seq // BLOCK_N) * BLOCK_N  # keys [0, n_full) come in whole blocks: no masks in the hot loop
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attend_key_block(acc, l_i, m_i, q, k_base, v_base, start_n, seq,
                                          stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
                                          offs_n, offs_d, MASK_N=False, DOT_IEEE=DOT_IEEE)
    if n_full < seq:  # ragged tail, e.g. the 1025th key (seq 1025 = 16 * 64 + 1)
        acc, l_i, m_i = _attend_key_block(acc, l_i, m_i, q, k_base, v_base, n_full, seq,
                                          stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
                                          offs_n, offs_d, MASK_N=True, DOT_IEEE=DOT_IEEE)

    out = acc / l_i[:, None]
    tl.store(o_base + m_off[:, None] * stride_os + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=m_valid[:, None])


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _default_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for an H100; fp32 tiles are twice as big in shared memory.

    On CPU tensors (Triton's interpreter) each program is a few numpy calls whatever its size, so few large
    blocks run ~10x faster than the GPU tiling; the arithmetic is the same online softmax."""
    if device.type == "cpu":
        return 512, 512, 4, 1
    if dtype == torch.float32 or head_dim > 128:
        return 64, 32, 4, 2
    if head_dim <= 64:
        return 128, 64, 4, 3
    return 128, 64, 8, 3


def vit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *,
                  block_m: int | None = None, block_n: int | None = None,
                  num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """softmax(q @ k^T * scale) @ v, non-causal, for q, k, v [tiles, heads, seq, head_dim] (any strides).

    Returns a [tiles, heads, seq, head_dim] tensor in q's dtype whose memory is a contiguous
    [tiles, seq, heads, head_dim] buffer, so `out.transpose(1, 2).reshape(tiles, seq, heads * head_dim)` is a view.
    block_m / block_n / num_warps / num_stages override the per-head_dim defaults (powers of two >= 16 for blocks).
    """
    return _vit_attention(q, k, v, scale, block_m, block_n, num_warps, num_stages, _MAX_GRID_Y)


def _vit_attention(q, k, v, scale, block_m, block_n, num_warps, num_stages, max_grid_y):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"vit_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"vit_attention: {name} must be [tiles, heads, seq, head_dim], got shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"vit_attention: q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"vit_attention: unsupported dtype {q.dtype}; expected one of {_SUPPORTED_DTYPES}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"vit_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"vit_attention: q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    tiles, heads, seq, head_dim = q.shape
    if not _is_pow2(head_dim) or head_dim < 16:
        raise ValueError(f"vit_attention: head_dim must be a power of two >= 16, got {head_dim}")
    if heads > max_grid_y:
        raise ValueError(f"vit_attention: at most {max_grid_y} heads supported, got {heads}")
    if scale is None:
        scale = head_dim ** -0.5
    scale = float(scale)

    d_bm, d_bn, d_warps, d_stages = _default_config(head_dim, q.dtype, q.device)
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk is not None and (not _is_pow2(blk) or blk < 16):
            raise ValueError(f"vit_attention: {name} must be a power of two >= 16, got {blk}")
    # Short sequences (tests, tiny models) get blocks no larger than needed; tl.dot wants every dim >= 16.
    seq_blk = max(16, triton.next_power_of_2(max(seq, 1)))
    bm = block_m if block_m is not None else min(d_bm, seq_blk)
    bn = block_n if block_n is not None else min(d_bn, seq_blk)
    warps = num_warps if num_warps is not None else d_warps
    stages = num_stages if num_stages is not None else d_stages

    # Output memory in [tiles, seq, heads, head_dim] order, handed back as the [tiles, heads, seq, head_dim] view.
    out = torch.empty((tiles, seq, heads, head_dim), dtype=q.dtype, device=q.device).transpose(1, 2)
    if out.numel() == 0:
        return out

    tiles_per_launch = max(1, max_grid_y // heads)
    for t0 in range(0, tiles, tiles_per_launch):
        t1 = min(tiles, t0 + tiles_per_launch)
        qc, kc, vc, oc = q[t0:t1], k[t0:t1], v[t0:t1], out[t0:t1]  # views: same strides, shifted base
        grid = (triton.cdiv(seq, bm), (t1 - t0) * heads)
        _vit_attention_kernel[grid](
            qc, kc, vc, oc, seq, heads, scale * _LOG2E,
            *qc.stride(), *kc.stride(), *vc.stride(), *oc.stride(),
            HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, DOT_IEEE=q.dtype == torch.float32,
            num_warps=warps, num_stages=stages,
        )
    return out


def vit_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """PyTorch reference: scaled_dot_product_attention in the inputs' dtype, [tiles, heads, seq, head_dim] values."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
