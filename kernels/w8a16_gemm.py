"""Weight-only int8 GEMM (W8A16): the linear layers of bitsandbytes-format int8 checkpoints (InternVL-Chat-V1.5-Int8).

Semantics (== `w8a16_linear_ref`). A bitsandbytes LLM.int8 checkpoint stores each quantised nn.Linear as `weight`
int8 [N, K] (row-major, one row per output feature) and `SCB` float32 [N] (the absmax of each original row), so
    W[n, k] = weight[n, k] * SCB[n] / 127        out[..., n] = sum_k x[..., k] * W[n, k] (+ bias[n])
x: [..., K] fp16 / bf16 / fp32 (any leading dims, flattened to M rows); bias: [N] in x's dtype or None;
out: [..., N], contiguous, in x's dtype. The reference (what the engine's CPU path runs) dequantises in fp32 in
exactly that order, `weight.float() * SCB[:, None] / 127`, rounds W to x's dtype and calls F.linear.
x is read through its row stride and element stride: any x whose leading dims flatten to rows without a copy (a
slice of a wider fused row, x[..., :K], is fine) is read in place; others are copied once by `reshape`. The
fast, vectorised loads need x's last dim contiguous (stride 1) and weight contiguous (checked). SCB and bias may
have any stride.

Numerics. The weight is never materialised in 16 bits in memory: each int8 tile is loaded as int8 (1 byte per
weight from HBM) and converted in registers to x's dtype inside the K loop (exact: |q| <= 128 is representable in
fp16 and bf16), multiplied on tensor cores (fp32 inputs: IEEE fp32 dots, not TF32) into an fp32 accumulator, and
the per-row scale is applied once at the end: out = acc * SCB[n] / 127 (+ bias) in fp32 (an IEEE division,
tl.div_rn: Triton's `/` would multiply by an approximate 1/127), rounded once to x's dtype. This differs from
the reference's order only by rounding (the kernel never rounds W to 16 bits, so its error against the exact
product is no larger); SCB[n] = 0 gives an exact zero row, never NaN. (torch on CUDA divides by a scalar as a
multiply by its reciprocal, so the reference itself differs by an ulp between CPU and GPU.)

Design: one GEMM kernel, `_w8a16_gemm_kernel` (a program = a BLOCK_M x BLOCK_N output tile over one slice of K),
launched along two paths picked by M:
 1. GEMV / split-K (M <= 16, decode; memory bound: the N * K int8 weight is the traffic): BLOCK_M = 16 (tl.dot's
    minimum, so M 1..16 cost the same), BLOCK_N = 64, BLOCK_K = 128. Each weight row slice is 128 contiguous
    bytes, copied global -> shared with 16-byte cp.async (LDGSTS.128) through a 4-stage software pipeline, read
    back as 8-byte LDS in the mma operand layout, converted in registers (bf16: Triton's PRMT/LOP3/HADD2 bit trick;
    fp16: one quarter-rate I2F.F16 per weight, ~12 us per 50 M weights on 132 SMs, under the HBM time) and fed to
    mma.sync (HMMA.16816) with the x tile as the A operand. When the N / 64 column blocks alone leave CTA slots
    of the GPU empty, K is cut into `split_k` slices of whole BLOCK_K tiles: each program writes its fp32 partial
    tile to a [split_k, M, N] scratch, and `_w8a16_splitk_reduce_kernel` sums the slices in slice order
    (deterministic: no atomics), scales, adds the bias and writes `out`. With one slice the GEMM kernel writes
    `out` itself (no scratch, no second launch).
 2. Tiled (M > 16: prefill, the ViT): BLOCK_M x BLOCK_N x BLOCK_K tiles, fp32 accumulator, programs ordered in
    groups of GROUP_M row blocks per column block (a weight tile is reused from L2 by GROUP_M consecutive
    programs). Computed transposed (SWAP_AB): out^T tile = W tile @ x^T tile, so on sm_90 the dequantised weight
    tile is wgmma's A operand straight from registers and the x tile its shared-memory B operand: no 16-bit copy
    of the weight is ever stored, even to shared memory, and the wgmma stays asynchronous across iterations
    (pendings = 1); the un-swapped form must write the converted tile to shared memory for wgmma and wait for
    each wgmma before overwriting it. 128 x 128 x 64 (8 warps) when the grid fills the GPU, else 64 x 64 x 128
    (4 warps, 4x the programs); split-K by the same rule when even that grid leaves slots empty (M of a few
    dozen rows). fp32 x takes the un-swapped form with IEEE dots (correct, slow; not an engine path).
Rows past M / N are never masked at load (indices taken modulo M / N: valid addresses, unmasked vector loads,
results dropped at the store); K is masked only when K is not a multiple of BLOCK_K (EVEN_K). Row offsets are
int64. Launch configurations: `_gemv_config`, `_tiled_config`, `choose_split_k` (sm_90 choices; ptxas figures
in tests/kernels/test_compile_sm90.py).

Full-size shapes (bf16 / fp16; K -> N; M = batch for decode, tokens for prefill, tiles * 1025 for the ViT):
    InternLM2-20B (InternVL-Chat-V1.5 LLM): wqkv 6144 -> 8192 (48 q + 2 * 8 KV heads of 128), wo 6144 -> 6144,
        w1 / w3 6144 -> 16384, w2 16384 -> 6144, LM head (`output`) 6144 -> 92553
    InternViT-6B: qkv 3200 -> 9600, proj 3200 -> 3200, fc1 3200 -> 12800, fc2 12800 -> 3200 (with bias)
    mlp1 projector: 12800 -> 6144, 6144 -> 6144 (with bias)
(Which of them a checkpoint quantises is its `llm_int8_skip_modules`' business; any Linear is accepted.)
Bytes moved per call (memory bound for M up to ~100; report GB/s):
    M * K * elem (x) + N * K (int8 weight) + 4 * N (SCB) + M * N * elem (out)  (+ N * elem bias)
    (+ split-K scratch: 2 * 4 * split_k * M * N bytes written and read back when split_k > 1)
FLOPs: 2 * M * N * K (compute bound for M in the hundreds and above).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DEFAULT_SMS = 132  # H100 SXM; used off-GPU (interpreter, meta tensors) where no device can be queried
GEMV_MAX_M = 16  # M up to this takes the GEMV / split-K path (BLOCK_M 16 is tl.dot's minimum: no waste below)
_MIN_SPLIT_TILES = 4  # a K slice shorter than this many BLOCK_K tiles is mostly pipeline prologue
_MAX_SPLIT_K = 16
_GROUP_M = 8


class LaunchConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    ctas_per_sm: int  # programs per SM that split-K aims to fill (at most what shared memory / registers allow)
    swap_ab: bool  # compute out^T = W x^T: the dequantised weight tile is wgmma's A operand, from registers


@triton.jit
def _scale_bias_store(acc, offs_m, offs_n, M, N, scb_ptr, bias_ptr, out_ptr, stride_scb, stride_bias, stride_om,
                      HAS_BIAS: tl.constexpr):
    # acc [BM, BN] fp32 -> out = acc * SCB / 127 (+ bias), one rounding to out's dtype; rows >= M, cols >= N dropped.
    n_ok = offs_n < N
    scb = tl.load(scb_ptr + offs_n * stride_scb, mask=n_ok, other=0.0)
    out = tl.div_rn(acc * scb[None, :], 127.0)  # IEEE division (plain `/` is a multiply by an approximate 1/127)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=n_ok, other=0.0)
        out = out + bias.to(tl.float32)[None, :]
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & n_ok[None, :])


@triton.jit
def _w8a16_gemm_kernel(
    x_ptr,  # [M, K] fp16 / bf16 / fp32, strides (stride_xm, stride_xk)
    w_ptr,  # [N, K] int8, contiguous
    scb_ptr,  # [N] fp32
    bias_ptr,  # [N] x's dtype; read only when HAS_BIAS
    out_ptr,  # [M, N] x's dtype, row stride stride_om; written only when WRITE_OUT (split_k == 1)
    part_ptr,  # [split_k, M, N] fp32 contiguous scratch (split stride stride_ps); unless WRITE_OUT
    M, N, K,
    k_per_split,  # K elements per slice: a multiple of BLOCK_K (K itself when split_k == 1)
    stride_xm, stride_xk, stride_scb, stride_bias, stride_om, stride_ps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K mask anywhere
    SWAP_AB: tl.constexpr,  # compute out^T = W x^T (the dequantised weight tile is the register A operand)
    HAS_BIAS: tl.constexpr, WRITE_OUT: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    # Grouped order: GROUP_M consecutive programs share one column block (one weight tile stream, from L2).
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    # Out-of-range rows / columns load valid rows (modulo) and are dropped at the store: no load masks on M, N.
    x_rows = (offs_m % M).to(tl.int64)
    w_rows = (offs_n % N).to(tl.int64)
    ks = k_start + offs_k
    if SWAP_AB:
        # out^T tile [BLOCK_N, BLOCK_M] = W tile [BLOCK_N, BLOCK_K] @ x^T tile [BLOCK_K, BLOCK_M]: on sm_90 the
        # converted weight tile feeds wgmma straight from registers (no shared-memory round trip for the 16-bit
        # copy, and the wgmma stays asynchronous across iterations); the x tile is its shared-memory B operand.
        x_ptrs = x_ptr + x_rows[None, :] * stride_xm + ks[:, None] * stride_xk
        w_ptrs = w_ptr + w_rows[:, None] * K + ks[None, :]
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs)
                w = tl.load(w_ptrs)
            else:
                k_ok = offs_k < K - k0
                x = tl.load(x_ptrs, mask=k_ok[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[None, :], other=0)
            acc_t = tl.dot(w.to(x.dtype), x, acc=acc_t, input_precision="ieee")
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K
        acc = tl.trans(acc_t)
    else:
        # x tile [BLOCK_M, BLOCK_K] (the A operand); weight tile loaded already transposed, [BLOCK_K, BLOCK_N].
        x_ptrs = x_ptr + x_rows[:, None] * stride_xm + ks[None, :] * stride_xk
        w_ptrs = w_ptr + w_rows[None, :] * K + ks[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs)
                w = tl.load(w_ptrs)
            else:
                k_ok = offs_k < K - k0
                x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None], other=0)
            # Dequantise in registers: int8 -> x's dtype is exact; the row scale comes once, after the loop.
            acc = tl.dot(x, w.to(x.dtype), acc=acc, input_precision="ieee")  # ieee only affects fp32 inputs
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K

    if WRITE_OUT:
        _scale_bias_store(acc, offs_m, offs_n, M, N, scb_ptr, bias_ptr, out_ptr, stride_scb, stride_bias,
                          stride_om, HAS_BIAS)
    else:
        ptrs = part_ptr + split.to(tl.int64) * stride_ps + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(ptrs, acc, mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _w8a16_splitk_reduce_kernel(
    part_ptr,  # [SPLIT_K, M, N] fp32 contiguous (split stride stride_ps)
    scb_ptr, bias_ptr, out_ptr,
    M, N,
    stride_scb, stride_bias, stride_om, stride_ps,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = part_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    # Unrolled over the slices: all loads are independent (one memory latency, not SPLIT_K), and the sum runs in
    # slice order 0, 1, ... every time (deterministic).
    acc = tl.load(ptrs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(ptrs + s * stride_ps, mask=mask, other=0.0)
    _scale_bias_store(acc, offs_m, offs_n, M, N, scb_ptr, bias_ptr, out_ptr, stride_scb, stride_bias, stride_om,
                      HAS_BIAS)


def _gemv_config(dtype: torch.dtype) -> LaunchConfig:
    """M <= 16. sm_90 (from the ptxas report, not timed here): a stage is the 64 x 128 int8 weight tile (8 KiB,
    16-byte cp.async) plus the 16 x 128 x tile (4 KiB), 3 buffers = 36 KiB of shared memory and 64-73 registers
    at 4 warps, so 6 programs would fit an SM; split-K aims at 4 per SM (ctas_per_sm), i.e. ~96 KiB of weight in
    flight per SM, several times what HBM3 latency x bandwidth needs (~25 KiB per SM). BLOCK_N 64 keeps the
    program count high (N / 64 column blocks) before any split-K; a larger BLOCK_K would only cut the number of
    programs that fit. fp32 (IEEE dots: an FMA loop over register-held operands; not an engine path) takes
    16 x 32 x 32 tiles (128 registers; 16 x 64 x 64 spills)."""
    if dtype == torch.float32:
        return LaunchConfig(16, 32, 32, 4, 3, 4, False)
    return LaunchConfig(16, 64, 128, 4, 4, 4, False)


def _tiled_config(M: int, N: int, dtype: torch.dtype, num_sms: int = _DEFAULT_SMS) -> LaunchConfig:
    """M > 16 (swapped: wgmma m64nBLOCK_Mk16 with the weight tile in registers). 128 x 128 x 64 with 8 warps (two
    warpgroups of 64 weight rows, 64 fp32 accumulators per thread; 4 x tile stages of 16 KiB + 3 weight stages of
    8 KiB) when the grid has at least one program per SM; otherwise 64 x 64 x 128 with 4 warps (2 per SM by
    shared memory), four times the programs for mid-size M (a 128-token chunk over N 8192: 256 programs, not
    64). ptxas: 121-180 registers at 8 warps (the LM head's odd N the most), 128-159 at 4 warps, 88 KiB of shared
    memory, no spills (tests/kernels/test_compile_sm90.py). fp32 (un-swapped IEEE dots, an FMA loop): 32 x 32 x 32,
    192 registers (64 x 64 x 32 spills)."""
    if dtype == torch.float32:
        return LaunchConfig(32, 32, 32, 4, 3, 4, False)
    if triton.cdiv(M, 128) * triton.cdiv(N, 128) >= num_sms:
        return LaunchConfig(128, 128, 64, 8, 4, 1, True)
    return LaunchConfig(64, 64, 128, 4, 4, 2, True)


def choose_split_k(tiles: int, K: int, block_k: int, ctas_per_sm: int, num_sms: int = _DEFAULT_SMS) -> tuple[int, int]:
    """(split_k, k_per_split): cut K into whole BLOCK_K tiles when `tiles` output tiles leave CTA slots of the GPU
    (num_sms * ctas_per_sm) empty, so that tiles * split_k fills them without a second wave; each slice keeps
    >= _MIN_SPLIT_TILES tiles, and no slice is empty. From shapes only (no device sync, CUDA-graph friendly)."""
    k_tiles = triton.cdiv(K, block_k)
    split = min((num_sms * ctas_per_sm) // max(tiles, 1), k_tiles // _MIN_SPLIT_TILES, _MAX_SPLIT_K)
    if split <= 1:
        return 1, max(K, 1)
    tiles_per_split = triton.cdiv(k_tiles, split)
    return triton.cdiv(k_tiles, tiles_per_split), tiles_per_split * block_k


def _check_inputs(x, weight, scb, bias, kernel: bool) -> None:
    for name, t in (("x", x), ("weight", weight), ("scb", scb)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"w8a16_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise ValueError(f"w8a16_linear: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"w8a16_linear: unsupported x dtype {x.dtype}; expected float16, bfloat16 or float32")
    if weight.dtype != torch.int8:
        raise ValueError(f"w8a16_linear: weight must be int8, got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"w8a16_linear: weight must be [N, K], got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"w8a16_linear: x must be [..., K={K}] for weight {tuple(weight.shape)}, "
                         f"got shape {tuple(x.shape)}")
    if scb.dtype != torch.float32:
        raise ValueError(f"w8a16_linear: scb (SCB) must be float32, got {scb.dtype}")
    if scb.shape != (N,):
        raise ValueError(f"w8a16_linear: scb must be [N={N}], got shape {tuple(scb.shape)}")
    if bias is not None:
        if bias.shape != (N,):
            raise ValueError(f"w8a16_linear: bias must be [N={N}], got shape {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise ValueError(f"w8a16_linear: bias dtype {bias.dtype} != x dtype {x.dtype}")
    tensors = [x, weight, scb] + ([bias] if bias is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"w8a16_linear: x, weight, scb and bias must be on one device, got "
                         f"{[str(t.device) for t in tensors]}")
    if kernel and not weight.is_contiguous():
        raise ValueError(f"w8a16_linear: weight must be contiguous (row-major [N, K]), got strides "
                         f"{tuple(weight.stride())}")


def w8a16_linear(x: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ (weight * SCB[:, None] / 127)^T + bias -> [..., N] in x's dtype, with the int8 weight dequantised inside
    the kernel (see the module docstring). x: [..., K] fp16 / bf16 / fp32; weight: int8 [N, K] contiguous;
    scb: float32 [N]; bias: [N] in x's dtype or None."""
    return _w8a16_linear(x, weight, scb, bias)


def _w8a16_linear(x, weight, scb, bias=None, path: str | None = None, config: LaunchConfig | None = None,
                  split_k: int | None = None, num_sms: int | None = None) -> torch.Tensor:
    """w8a16_linear with overrides (tests, tuning): path "gemv" / "tiled" (None: by M), a LaunchConfig, and
    split_k (None: `choose_split_k`; an int is clamped to the number of K tiles)."""
    _check_inputs(x, weight, scb, bias, kernel=True)
    N, K = weight.shape
    lead = x.shape[:-1]
    M = math.prod(lead)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out.reshape(*lead, N)
    x2 = x.reshape(M, K)  # a view whenever the leading dims flatten; the kernel takes both strides
    if path is None:
        path = "gemv" if M <= GEMV_MAX_M else "tiled"
    if path not in ("gemv", "tiled"):
        raise ValueError(f"path must be 'gemv', 'tiled' or None, got {path!r}")
    if num_sms is None:
        num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else _DEFAULT_SMS
    if config is None:
        config = _gemv_config(x.dtype) if path == "gemv" else _tiled_config(M, N, x.dtype, num_sms)
    if path == "gemv" and M > config.block_m:
        raise ValueError(f"the gemv path takes M <= BLOCK_M = {config.block_m} rows, got M = {M}")
    tiles = triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n)
    k_tiles = triton.cdiv(K, config.block_k)
    if split_k is None:
        split_k, k_per_split = choose_split_k(tiles, K, config.block_k, config.ctas_per_sm, num_sms)
    else:
        if split_k < 1:
            raise ValueError(f"split_k must be >= 1, got {split_k}")
        tiles_per_split = max(1, triton.cdiv(k_tiles, split_k))
        split_k = max(1, triton.cdiv(k_tiles, tiles_per_split))  # no empty slice
        k_per_split = tiles_per_split * config.block_k if split_k > 1 else max(K, 1)

    has_bias = bias is not None
    bias_arg = bias if has_bias else scb  # a dummy, never dereferenced
    stride_bias = bias.stride(0) if has_bias else 0
    write_out = split_k == 1
    if write_out:
        part = out.new_empty((1,), dtype=torch.float32)  # a dummy, never dereferenced
    else:
        part = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device)
    _w8a16_gemm_kernel[(tiles, split_k)](
        x2, weight, scb, bias_arg, out, part, M, N, K, k_per_split,
        x2.stride(0), x2.stride(1), scb.stride(0), stride_bias, out.stride(0), M * N,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=_GROUP_M,
        EVEN_K=K % config.block_k == 0, SWAP_AB=config.swap_ab,
        HAS_BIAS=has_bias, WRITE_OUT=write_out,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if not write_out:
        # [rows, cols] tiles of 2048 fp32 (16 per thread at 4 warps), rows fitted to M (decode: M <= 16).
        r_m = min(16, triton.next_power_of_2(M))
        r_n = 2048 // r_m
        _w8a16_splitk_reduce_kernel[(triton.cdiv(N, r_n), triton.cdiv(M, r_m))](
            part, scb, bias_arg, out, M, N, scb.stride(0), stride_bias, out.stride(0), M * N,
            SPLIT_K=split_k, BLOCK_M=r_m, BLOCK_N=r_n, HAS_BIAS=has_bias, num_warps=4,
        )
    return out.reshape(*lead, N)


def w8a16_linear_ref(x: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch reference (the engine's CPU path): W = weight.float() * SCB[:, None] / 127 in fp32, rounded to x's
    dtype, then F.linear(x, W, bias)."""
    _check_inputs(x, weight, scb, bias, kernel=False)
    w = weight.float() * scb[:, None] / 127
    return F.linear(x, w.to(x.dtype), bias)
