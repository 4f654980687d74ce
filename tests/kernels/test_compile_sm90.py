"""Every Triton kernel compiled ahead of time for sm_90 (H100) at its full-size launch: it builds, and does not spill.

Why: CI has no GPU, so the other kernel tests run under Triton's interpreter, which checks the arithmetic but none
of what the GPU compiler does: layouts, tl.dot operand types, shared memory for the software pipeline, register
allocation. This test is the check that the kernels are valid GPU code at the real shapes: it runs the real
compiler (Triton -> TTGIR -> LLVM -> PTX -> ptxas, for sm_90a) on the launches the Python wrappers make for the
full-size models, and asserts that each cubin builds, fits an H100 (shared memory, register file) and keeps
everything in registers (no spill stores, no stack frame).

How:
* The kernel modules must be imported WITHOUT TRITON_INTERPRET (tests/conftest.py sets it when there is no CUDA,
  and it turns every @triton.jit into an interpreter object), so all the work runs in one subprocess whose
  environment drops it. The subprocess writes a JSON summary that the tests parse.
* The shapes are full size but cost no memory: the wrappers are called with `meta` tensors and their
  `kernel[grid](...)` launch is intercepted, so the dtypes, strides, constexprs (block sizes), num_warps and
  num_stages are exactly those the wrapper passes on a GPU. `meta` is not "cpu", so vit_attention takes its CUDA
  defaults (checked against `_default_config(..., cuda)`); tile_norm's block shape is asked for a CUDA device.
* Each launch is specialised as Triton's JIT does it (its own binder: ints equal to 1 become constexprs, ints and
  pointers divisible by 16 get tt.divisibility), then `triton.compile(..., target=GPUTarget("cuda", 90, 32))`.
  This uses the JIT internals of Triton 3.9 (`create_function_from_signature`, `JITFunction._pack_args`).
* Registers and spills come from ptxas's `-v` report (Triton prints it with TRITON_DUMP_PTXAS_LOG=1; the cubin
  metadata has no register count until a driver loads it). TRITON_ALWAYS_COMPILE=1 and a private cache directory
  make sure ptxas really runs.
* No GPU is needed, and a present one is not used: the target is always sm_90.

One representative configuration per kernel path and dtype (not every combination); identical specialisations
(e.g. the w8a16 decode shapes whose sizes are all multiples of 16) are compiled once.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]

# Full-size launches (shapes from each kernel module's docstring). `kernels`: the entry kernels the configuration
# must launch (so both passes of paged_decode and tile_norm are really compiled).
CONFIGS = [
    # InternViT-6B (seq 1025, 25 heads, head_dim 128) and InternViT-300M (16 heads, head_dim 64), 41 tiles.
    dict(id="vit_attention-6B-bf16", build="vit_attention", params=dict(dtype="bf16", heads=25, head_dim=128),
         kernels=["_vit_attention_kernel"]),
    dict(id="vit_attention-6B-fp16", build="vit_attention", params=dict(dtype="fp16", heads=25, head_dim=128),
         kernels=["_vit_attention_kernel"]),
    dict(id="vit_attention-300M-bf16", build="vit_attention", params=dict(dtype="bf16", heads=16, head_dim=64),
         kernels=["_vit_attention_kernel"]),
    dict(id="vit_attention-300M-fp16", build="vit_attention", params=dict(dtype="fp16", heads=16, head_dim=64),
         kernels=["_vit_attention_kernel"]),
    # InternLM2-20B decode: 48 q heads / 8 KV heads, head_dim 128, 16-token pages (GQA: the tl.dot path).
    # One long sequence -> 32 splits (split pass with scratch + reduce pass); 64 sequences -> one split (the split
    # pass writes `out` itself).
    dict(id="paged_decode-gqa-bf16-splits", build="paged_decode",
         params=dict(dtype="bf16", batch=1, q_heads=48, kv_heads=8, head_dim=128, block_size=16, context=8192),
         kernels=["_paged_decode_split_kernel", "_paged_decode_reduce_kernel"]),
    dict(id="paged_decode-gqa-fp16-single-split", build="paged_decode",
         params=dict(dtype="fp16", batch=64, q_heads=48, kv_heads=8, head_dim=128, block_size=16, context=2048),
         kernels=["_paged_decode_split_kernel"]),
    # Phi-3-mini (Mini-InternVL-4B): MHA, 32 heads of 96 -> the broadcast (no tl.dot) path, with splits.
    dict(id="paged_decode-mha-bf16-splits", build="paged_decode",
         params=dict(dtype="bf16", batch=8, q_heads=32, kv_heads=32, head_dim=96, block_size=16, context=4096),
         kernels=["_paged_decode_split_kernel", "_paged_decode_reduce_kernel"]),
    # The same with a binding sliding window (Phi-3-mini-4k's 2047 tokens over a 4096-token table): the HAS_WINDOW
    # paths of both passes.
    dict(id="paged_decode-mha-bf16-splits-window", build="paged_decode",
         params=dict(dtype="bf16", batch=8, q_heads=32, kv_heads=32, head_dim=96, block_size=16, context=4096,
                     window=2047), kernels=["_paged_decode_split_kernel", "_paged_decode_reduce_kernel"]),
    # As the CUDA-graph decode step launches it: a 4-sequence bucket over a full-width table (32K-token
    # max_model_len, Mini-2B's 16 / 8 heads), splits sized on the device from each context.
    dict(id="paged_decode-gqa-bf16-graph-bucket", build="paged_decode",
         params=dict(dtype="bf16", batch=4, q_heads=16, kv_heads=8, head_dim=128, block_size=16, context=32768),
         kernels=["_paged_decode_split_kernel", "_paged_decode_reduce_kernel"]),
    # Paged prefill, as the engine calls it (q and out transposed views of [heads, T, head_dim], 16-token pages):
    # InternLM2-20B (48 q / 8 KV heads, head_dim 128: GQA 6 packed into 128-row tiles), a 2048-token chunk over an
    # 8192-token context, bf16 and fp16; four short chunks (BLOCK_M fitted down to 16 rows); Mini-2B (16 / 8 heads);
    # Phi-3-mini MHA (32 / 32 heads, head_dim 96 padded to 128); fp32 (32 x 32 tiles: IEEE dots are FMA loops).
    dict(id="paged_prefill-20B-bf16", build="paged_prefill",
         params=dict(dtype="bf16", chunks=1, chunk=2048, context=8192, q_heads=48, kv_heads=8, head_dim=128,
                     block_size=16), kernels=["_paged_prefill_kernel"]),
    dict(id="paged_prefill-20B-fp16", build="paged_prefill",
         params=dict(dtype="fp16", chunks=1, chunk=2048, context=8192, q_heads=48, kv_heads=8, head_dim=128,
                     block_size=16), kernels=["_paged_prefill_kernel"]),
    dict(id="paged_prefill-20B-bf16-short-chunks", build="paged_prefill",
         params=dict(dtype="bf16", chunks=4, chunk=2, context=4096, q_heads=48, kv_heads=8, head_dim=128,
                     block_size=16), kernels=["_paged_prefill_kernel"]),
    dict(id="paged_prefill-2B-bf16", build="paged_prefill",
         params=dict(dtype="bf16", chunks=1, chunk=2048, context=8192, q_heads=16, kv_heads=8, head_dim=128,
                     block_size=16), kernels=["_paged_prefill_kernel"]),
    dict(id="paged_prefill-phi3-mha-d96-bf16", build="paged_prefill",
         params=dict(dtype="bf16", chunks=1, chunk=2048, context=8192, q_heads=32, kv_heads=32, head_dim=96,
                     block_size=16), kernels=["_paged_prefill_kernel"]),
    # With a binding sliding window (2047 tokens over an 8192-token table): the HAS_WINDOW path's three key loops
    # (window edge, unmasked, diagonal), for Phi-3 and for the heaviest tile (GQA 6 packed, 128 x 64, 8 warps).
    dict(id="paged_prefill-phi3-mha-d96-bf16-window", build="paged_prefill",
         params=dict(dtype="bf16", chunks=1, chunk=2048, context=8192, q_heads=32, kv_heads=32, head_dim=96,
                     block_size=16, window=2047), kernels=["_paged_prefill_kernel"]),
    dict(id="paged_prefill-20B-bf16-window", build="paged_prefill",
         params=dict(dtype="bf16", chunks=1, chunk=2048, context=8192, q_heads=48, kv_heads=8, head_dim=128,
                     block_size=16, window=2047), kernels=["_paged_prefill_kernel"]),
    dict(id="paged_prefill-2B-fp32", build="paged_prefill",
         params=dict(dtype="fp32", chunks=2, chunk=1024, context=4096, q_heads=16, kv_heads=8, head_dim=128,
                     block_size=16), kernels=["_paged_prefill_kernel"]),
    # InternViT-6B (C 3200, ps v1) and InternViT-300M (C 1024, ps v2) features, 13 tiles, bf16 LayerNorm params.
    dict(id="pixel_unshuffle-C3200-bf16", build="pixel_unshuffle", params=dict(dtype="bf16", C=3200, ps="v1"),
         kernels=["_pixel_unshuffle_layernorm_kernel"]),
    dict(id="pixel_unshuffle-C1024-bf16", build="pixel_unshuffle", params=dict(dtype="bf16", C=1024, ps="v2"),
         kernels=["_pixel_unshuffle_layernorm_kernel"]),
    # uint8 4K landscape: horizontal pass first, so the fused second pass is vertical; a tall image the other way
    # round (Pillow resizes vertically first). Each with its thumbnail (a second pair of launches).
    dict(id="tile_norm-3840x2160-fp32", build="tile_norm", params=dict(width=3840, height=2160, out="fp32"),
         kernels=["_first_pass_kernel", "_second_pass_norm_kernel"]),
    dict(id="tile_norm-1000x4000-bf16", build="tile_norm", params=dict(width=1000, height=4000, out="bf16"),
         kernels=["_first_pass_kernel", "_second_pass_norm_kernel"]),
    # Weight-only int8 GEMM (bitsandbytes int8 checkpoints), K -> N. InternLM2-20B decode (M 1 and 8: the GEMV /
    # split-K path, 64-column blocks short of the 132 x 4 CTA slots, so K is split and the reduce pass runs): wqkv
    # 6144 -> 8192 (4 slices), w1 6144 -> 16384 (2), w2 16384 -> 6144 (5); the LM head 6144 -> 92553 (odd N, one
    # slice: the GEMM kernel writes `out`). Prefill (M 2048: 128 x 128 tiles), a 128-token chunk (64 x 64 tiles)
    # and 32 tokens over w2 (64 x 64 tiles, split-K: the reduce pass with 16-row tiles); InternViT-6B fc1 over
    # 13 tiles (M 13325, 3200 -> 12800, with bias); the LM head at M 2048.
    *[dict(id=f"w8a16-20B-{name}-M{m}-{dtype}", build="w8a16_gemm", params=dict(dtype=dtype, M=m, K=k, N=n),
           kernels=kernels)
      for dtype in ("bf16", "fp16") for m in (1, 8)
      for name, k, n, kernels in (
          ("wqkv", 6144, 8192, ["_w8a16_gemm_kernel", "_w8a16_splitk_reduce_kernel"]),
          ("w1", 6144, 16384, ["_w8a16_gemm_kernel", "_w8a16_splitk_reduce_kernel"]),
          ("w2", 16384, 6144, ["_w8a16_gemm_kernel", "_w8a16_splitk_reduce_kernel"]),
          ("lm_head", 6144, 92553, ["_w8a16_gemm_kernel"]))],
    *[dict(id=f"w8a16-{name}-{dtype}", build="w8a16_gemm", params=dict(dtype=dtype, M=m, K=k, N=n, bias=bias),
           kernels=kernels)
      for dtype in ("bf16", "fp16")
      for name, m, k, n, bias, kernels in (
          ("20B-prefill-wqkv-M2048", 2048, 6144, 8192, False, ["_w8a16_gemm_kernel"]),
          ("20B-prefill-w2-M2048", 2048, 16384, 6144, False, ["_w8a16_gemm_kernel"]),
          ("20B-prefill-wqkv-M128", 128, 6144, 8192, False, ["_w8a16_gemm_kernel"]),
          ("20B-prefill-w2-M32", 32, 16384, 6144, False, ["_w8a16_gemm_kernel", "_w8a16_splitk_reduce_kernel"]),
          ("20B-prefill-lm_head-M2048", 2048, 6144, 92553, False, ["_w8a16_gemm_kernel"]),
          ("vit6B-fc1-13tiles", 13 * 1025, 3200, 12800, True, ["_w8a16_gemm_kernel"]))],
    # fp32 x (IEEE dots, un-swapped; not an engine path, but it must build): decode with split-K, a prefill chunk.
    dict(id="w8a16-20B-wqkv-M8-fp32", build="w8a16_gemm", params=dict(dtype="fp32", M=8, K=6144, N=8192),
         kernels=["_w8a16_gemm_kernel", "_w8a16_splitk_reduce_kernel"]),
    dict(id="w8a16-20B-prefill-wqkv-M128-fp32", build="w8a16_gemm",
         params=dict(dtype="fp32", M=128, K=6144, N=8192, bias=True), kernels=["_w8a16_gemm_kernel"]),
    # Fused residual add + RMSNorm, rows register-resident up to 8192: InternLM2-20B (6144 -> 8192-wide rows at 16
    # warps) as the attention norm of a 2048-token prefill and of one decode token, and as the ffn norm with the
    # attention residual; InternLM2-1.8B (2048) and Phi-3-mini (3072) with the residual; InternViT-6B (3200, 13
    # tiles) with the layer-scaled residual, and q_norm on the strided q view of qkv; fp32; a 12800-wide row (no
    # model has one) for the looped two-pass path.
    *[dict(id=f"rms_norm-{name}-{dtype}", build="rms_norm", params=dict(dtype=dtype, **params),
           kernels=["_rms_norm_kernel"])
      for name, dtype, params in (
          ("20B-M2048", "bf16", dict(rows=2048, n=6144)),
          ("20B-M1", "bf16", dict(rows=1, n=6144)),
          ("20B-M2048-residual", "bf16", dict(rows=2048, n=6144, residual=True)),
          ("20B-M2048-residual", "fp16", dict(rows=2048, n=6144, residual=True)),
          ("2B-M2048-residual", "bf16", dict(rows=2048, n=2048, residual=True)),
          ("phi3-M2048-residual", "bf16", dict(rows=2048, n=3072, residual=True)),
          ("vit6B-13tiles-layer-scale", "bf16", dict(rows=13 * 1025, n=3200, residual=True, scale=True)),
          ("vit6B-13tiles-qnorm-strided", "bf16", dict(rows=13 * 1025, n=3200, qkv_view=True)),
          ("2B-M2048-residual", "fp32", dict(rows=2048, n=2048, residual=True)),
          ("wide-12800-looped-layer-scale", "bf16", dict(rows=64, n=12800, residual=True, scale=True)))],
    # Fused layer-scaled residual add + LayerNorm: InternViT-300M (1024 wide: 2 rows per program), 13 tiles, with
    # ls and bias, plain (the first norm1); a 12800-wide row for the looped (Chan-merged) path.
    *[dict(id=f"layer_norm-{name}-{dtype}", build="layer_norm", params=dict(dtype=dtype, **params),
           kernels=["_layer_norm_kernel"])
      for name, dtype, params in (
          ("vit300M-13tiles-layer-scale", "bf16", dict(rows=13 * 1025, n=1024, residual=True, scale=True)),
          ("vit300M-13tiles-layer-scale", "fp16", dict(rows=13 * 1025, n=1024, residual=True, scale=True)),
          ("vit300M-13tiles", "bf16", dict(rows=13 * 1025, n=1024)),
          ("wide-12800-looped-layer-scale", "bf16", dict(rows=64, n=12800, residual=True, scale=True)))],
    # silu(gate) * up on the gate_up GEMM output: InternLM2-20B (I 16384) prefill and decode, Phi-3-mini and
    # InternLM2-1.8B (I 8192); the two-tensor form (InternLM2 with int8 w1 / w3).
    *[dict(id=f"silu_mul-{name}-{dtype}", build="silu_mul", params=dict(dtype=dtype, **params),
           kernels=["_silu_mul_kernel"])
      for name, dtype, params in (
          ("20B-M2048", "bf16", dict(rows=2048, width=16384)),
          ("20B-M1", "bf16", dict(rows=1, width=16384)),
          ("phi3-M2048", "fp16", dict(rows=2048, width=8192)),
          ("20B-M8-pair", "bf16", dict(rows=8, width=16384, pair=True)),
          ("2B-M128", "fp32", dict(rows=128, width=8192)))],
]

# Local memory (bytes of spill stores, spill loads, stack frame) a kernel may use on purpose, keyed by kernel
# name, each with a comment saying why. Everything else must stay in registers: 0.
ACCEPTED_LOCAL_BYTES: dict[str, int] = {}

H100_MAX_SHARED_BYTES = 227 * 1024  # opt-in shared memory per block on sm_90
H100_REGISTERS_PER_BLOCK = 64 * 1024  # 32-bit registers per block (and per SM)
REGISTER_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256

# Runs in the subprocess: argv[1] = configs JSON path, argv[2] = output JSON path.
_COMPILE_SCRIPT = r'''
import contextlib, importlib, inspect, io, json, pkgutil, re, sys, time, traceback

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)  # H100; Triton builds sm_90a
BACKEND = make_backend(TARGET)
META = torch.device("meta")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PTXAS_REPORT = re.compile(
    r"Function properties for (\w+)\s+(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
    r".*?Used (\d+) registers", re.S)


class _Recorder:
    """Stands in for a kernel inside its module: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.fn, args, kwargs))


@contextlib.contextmanager
def intercept(module, *names):
    calls, saved = [], {name: getattr(module, name) for name in names}
    for name, fn in saved.items():
        assert isinstance(fn, JITFunction), f"{module.__name__}.{name} is {type(fn).__name__}, not a JITFunction"
        setattr(module, name, _Recorder(fn, calls))
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def build_vit_attention(dtype, heads, head_dim, tiles=41, seq=1025):
    from internvl_engine.kernels import vit_attention as mod
    dt = DTYPES[dtype]
    width = heads * head_dim
    # As InternViT's attention makes them: strided views of the packed qkv projection.
    qkv = torch.empty(tiles, seq, 3 * width, dtype=dt, device=META).reshape(tiles, seq, 3, width)
    q, k, v = (t.reshape(tiles, seq, heads, head_dim).transpose(1, 2) for t in qkv.unbind(2))
    with intercept(mod, "_vit_attention_kernel") as calls:
        mod.vit_attention(q, k, v)
    bm, bn, warps, stages = mod._default_config(head_dim, dt, torch.device("cuda"))
    for _, _, kw in calls:
        got = (kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"])
        if got != (bm, bn, warps, stages):
            raise AssertionError(f"meta tensors did not get the CUDA config: {got} != {(bm, bn, warps, stages)}")
    return calls


def build_paged_decode(dtype, batch, q_heads, kv_heads, head_dim, block_size, context, window=None):
    from internvl_engine.kernels import paged_decode as mod
    dt = DTYPES[dtype]
    max_blocks = context // block_size
    num_blocks = batch * max_blocks
    q = torch.empty(batch, q_heads, head_dim, dtype=dt, device=META)
    k_cache = torch.empty(num_blocks, block_size, kv_heads, head_dim, dtype=dt, device=META)
    v_cache = torch.empty(num_blocks, block_size, kv_heads, head_dim, dtype=dt, device=META)
    tables = torch.empty(batch, max_blocks, dtype=torch.int32, device=META)
    lens = torch.empty(batch, dtype=torch.int32, device=META)
    # Not CUDA tensors -> the split count assumes the H100 SXM's 132 SMs (_DEFAULT_SMS); as the paged KV cache
    # calls it (validate=False: no host read of seq_lens).
    with intercept(mod, "_paged_decode_split_kernel", "_paged_decode_reduce_kernel") as calls:
        mod.paged_decode(q, k_cache, v_cache, tables, lens, validate=False, sliding_window=window)
    return calls


def build_paged_prefill(dtype, chunks, chunk, context, q_heads, kv_heads, head_dim, block_size, window=None):
    from internvl_engine.kernels import paged_prefill as mod
    dt = DTYPES[dtype]
    tokens = chunks * chunk
    max_blocks = context // block_size
    # The engine's layout: q and out are [T, heads, d] views of [heads, T, d] (the model's [1, heads, T, d]).
    q = torch.empty(q_heads, tokens, head_dim, dtype=dt, device=META).transpose(0, 1)
    out = torch.empty(q_heads, tokens, head_dim, dtype=dt, device=META).transpose(0, 1)
    k_cache = torch.empty(chunks * max_blocks, block_size, kv_heads, head_dim, dtype=dt, device=META)
    v_cache = torch.empty(chunks * max_blocks, block_size, kv_heads, head_dim, dtype=dt, device=META)
    tables = torch.empty(chunks, max_blocks, dtype=torch.int32, device=META)
    starts, lens, contexts = (torch.empty(chunks, dtype=torch.int32, device=META) for _ in range(3))
    # validate=False: no host read of the lengths (meta tensors have no data), as the engine calls it.
    with intercept(mod, "_paged_prefill_kernel") as calls:
        mod.paged_prefill(q, k_cache, v_cache, tables, starts, lens, contexts, chunk, out=out, validate=False,
                          sliding_window=window)
    return calls


def build_pixel_unshuffle(dtype, C, ps, tiles=13, seq=1025):
    from internvl_engine.kernels import pixel_unshuffle as mod
    dt = DTYPES[dtype]
    hidden = torch.empty(tiles, seq, C, dtype=dt, device=META)
    weight = torch.empty(4 * C, dtype=dt, device=META)
    bias = torch.empty(4 * C, dtype=dt, device=META)
    with intercept(mod, "_pixel_unshuffle_layernorm_kernel") as calls:
        mod.pixel_unshuffle_layernorm(hidden, weight, bias, 1e-5, ps)
    return calls


def build_tile_norm(width, height, out, size=448, max_num=12):
    from internvl_engine.preprocessing.cpu import IMAGENET_MEAN, IMAGENET_STD, normalization_lut
    from internvl_engine.preprocessing.tiling import plan_tiles
    from internvl_engine.kernels import tile_norm as mod
    dt = DTYPES[out]
    plan = plan_tiles(width, height, 1, max_num, size, True)
    image = torch.empty(height, width, 3, dtype=torch.uint8, device=META)
    # tile_norm itself refuses non-CUDA tensors; this is its body after the checks, on meta tensors, with the
    # block shape it picks for a CUDA device.
    out_t = torch.empty(plan.num_tiles, 3, size, size, dtype=dt, device=META)
    lut = normalization_lut(IMAGENET_MEAN, IMAGENET_STD).to(dt).contiguous().to(META)
    block_shape = mod._block_shape
    mod._block_shape = lambda device, rows, cols: block_shape(torch.device("cuda"), rows, cols)
    try:
        with intercept(mod, "_first_pass_kernel", "_second_pass_norm_kernel") as calls:
            mod._resize_into(image, out_t, lut, plan.cols, plan.rows, size, 0)
            if plan.thumbnail:
                mod._resize_into(image, out_t, lut, 1, 1, size, plan.num_tiles - 1)
    finally:
        mod._block_shape = block_shape
    return calls


def build_w8a16_gemm(dtype, M, K, N, bias=False):
    from internvl_engine.kernels import w8a16_gemm as mod
    dt = DTYPES[dtype]
    x = torch.empty(M, K, dtype=dt, device=META)
    weight = torch.empty(N, K, dtype=torch.int8, device=META)
    scb = torch.empty(N, dtype=torch.float32, device=META)
    b = torch.empty(N, dtype=dt, device=META) if bias else None
    # Not CUDA tensors -> the split-K choice assumes the H100 SXM's 132 SMs (_DEFAULT_SMS).
    with intercept(mod, "_w8a16_gemm_kernel", "_w8a16_splitk_reduce_kernel") as calls:
        mod.w8a16_linear(x, weight, scb, b)
    return calls


def build_rms_norm(dtype, rows, n, residual=False, scale=False, qkv_view=False):
    from internvl_engine.kernels import rms_norm as mod
    dt = DTYPES[dtype]
    if qkv_view:  # InternViT's q: [rows, n] rows of the packed [rows, 3n] qkv projection
        x = torch.empty(rows, 3 * n, dtype=dt, device=META).reshape(rows, 3, n)[:, 0]
    else:
        x = torch.empty(rows, n, dtype=dt, device=META)
    weight = torch.empty(n, dtype=dt, device=META)
    res = torch.empty(rows, n, dtype=dt, device=META) if residual else None
    ls = torch.empty(n, dtype=dt, device=META) if scale else None
    with intercept(mod, "_rms_norm_kernel") as calls:
        mod.rms_norm(x, weight, 1e-6, res, ls)
    return calls


def build_layer_norm(dtype, rows, n, residual=False, scale=False):
    from internvl_engine.kernels import layer_norm as mod
    dt = DTYPES[dtype]
    x = torch.empty(rows, n, dtype=dt, device=META)
    weight = torch.empty(n, dtype=dt, device=META)
    bias = torch.empty(n, dtype=dt, device=META)
    res = torch.empty(rows, n, dtype=dt, device=META) if residual else None
    ls = torch.empty(n, dtype=dt, device=META) if scale else None
    with intercept(mod, "_layer_norm_kernel") as calls:
        mod.layer_norm(x, weight, bias, 1e-6, res, ls)
    return calls


def build_silu_mul(dtype, rows, width, pair=False):
    from internvl_engine.kernels import silu_mul as mod
    dt = DTYPES[dtype]
    with intercept(mod, "_silu_mul_kernel") as calls:
        if pair:
            mod.silu_mul_pair(torch.empty(rows, width, dtype=dt, device=META),
                              torch.empty(rows, width, dtype=dt, device=META))
        else:
            mod.silu_mul(torch.empty(rows, 2 * width, dtype=dt, device=META))
    return calls


_compiled = {}


def compile_launch(fn, args, kwargs):
    """What JITFunction.run does before launching, for the sm_90 target instead of the current device."""
    binder = create_function_from_signature(fn.signature, fn.params, BACKEND)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(BACKEND, kwargs, bound, specialization, options)
    names = fn.arg_names
    consts = {names[path[0]]: (v if isinstance(v, (bool, int, float)) else str(v)) for path, v in constexprs.items()}
    key = repr((fn.__name__, sorted(signature.items()), sorted(consts.items()), sorted(attrs.items()), options))
    if key in _compiled:
        return _compiled[key]
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG=1 prints the ptxas -v report to stdout
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET,
                                options=options.__dict__)
    seconds = time.perf_counter() - start
    reports = [m for m in PTXAS_REPORT.finditer(log.getvalue()) if m.group(1) == kernel.name]
    if len(reports) != 1:
        raise RuntimeError(f"no single ptxas report for {kernel.name} in:\n{log.getvalue()}")
    _, stack, spill_stores, spill_loads, regs = reports[0].groups()
    record = dict(
        kernel=fn.__name__, constexprs=consts, num_warps=options.num_warps, num_stages=options.num_stages,
        n_regs=int(regs), n_spills=int(spill_stores), spill_loads=int(spill_loads), stack=int(stack),
        shared=int(kernel.metadata.shared), arch=str(kernel.metadata.arch), seconds=round(seconds, 2),
        dtypes={k: v for k, v in signature.items() if v.startswith("*")},
    )
    _compiled[key] = record
    return record


def entry_kernels():
    """module.name of every JITFunction a module in internvl_engine.kernels launches (`name[grid](...)`)."""
    import internvl_engine.kernels as pkg
    found = []
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        source = inspect.getsource(module)
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == module.__name__ \
                    and re.search(rf"\b{re.escape(name)}\[", source):
                found.append(f"{info.name}.{name}")
    return sorted(found)


def main():
    configs = json.load(open(sys.argv[1]))
    results = {"configs": {}, "entry_kernels": entry_kernels(), "triton": triton.__version__}
    for cfg in configs:
        entry = {"calls": [], "error": None}
        try:
            launches = globals()["build_" + cfg["build"]](**cfg["params"])
            for fn, args, kwargs in launches:
                record = compile_launch(fn, args, kwargs)
                record["module"] = fn.fn.__module__.rsplit(".", 1)[-1]
                if record not in entry["calls"]:  # e.g. the thumbnail's launch when it equals the grid's
                    entry["calls"].append(record)
        except Exception:
            entry["error"] = traceback.format_exc()
        results["configs"][cfg["id"]] = entry
    json.dump(results, open(sys.argv[2], "w"), indent=1)


main()
'''


def _format_table(results: dict) -> str:
    lines = [f"{'config':38} {'kernel':34} {'warps':>5} {'stages':>6} {'regs':>4} {'spill st/ld':>11} "
             f"{'stack':>5} {'shared':>7}  constexprs"]
    for cid, entry in results["configs"].items():
        if entry["error"]:
            lines.append(f"{cid:38} ERROR: {entry['error'].strip().splitlines()[-1]}")
        for c in entry["calls"]:
            lines.append(f"{cid:38} {c['kernel']:34} {c['num_warps']:5} {c['num_stages']:6} {c['n_regs']:4} "
                         f"{c['n_spills']:>5}/{c['spill_loads']:<5} {c['stack']:5} {c['shared']:7}  "
                         f"{c['constexprs']}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def compile_results(tmp_path_factory):
    """Compiles every configuration in one subprocess (one import of torch + Triton) -> (results, stderr)."""
    work = tmp_path_factory.mktemp("sm90")
    (work / "configs.json").write_text(json.dumps(CONFIGS))
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1", TRITON_CACHE_DIR=str(work / "triton_cache"))
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, str(work / "configs.json"), str(work / "results.json")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0 and (work / "results.json").exists(), (
        f"compile subprocess failed (exit {proc.returncode})\nstdout:\n{proc.stdout[-5000:]}\n"
        f"stderr:\n{proc.stderr[-20000:]}")
    results = json.loads((work / "results.json").read_text())
    print(f"\nsm_90 compilation (Triton {results['triton']}):\n{_format_table(results)}")
    return results, proc.stderr


@pytest.mark.parametrize("config", CONFIGS, ids=[c["id"] for c in CONFIGS])
def test_kernel_compiles_for_sm90_without_spills(compile_results, config):
    results, stderr = compile_results
    entry = results["configs"][config["id"]]
    context = f"\n{_format_table(results)}\nsubprocess stderr (tail):\n{stderr[-4000:]}"
    assert entry["error"] is None, f"{config['id']} failed to compile for sm_90:\n{entry['error']}{context}"
    launched = sorted({c["kernel"] for c in entry["calls"]})
    assert launched == sorted(config["kernels"]), f"{config['id']} launched {launched}, expected {config['kernels']}"
    problems = []
    for c in entry["calls"]:
        where = f"{c['kernel']} {c['constexprs']} num_warps={c['num_warps']}"
        assert c["arch"] == "sm90", f"{where}: compiled for {c['arch']}"
        allowed = ACCEPTED_LOCAL_BYTES.get(c["kernel"], 0)
        if max(c["n_spills"], c["spill_loads"], c["stack"]) > allowed:
            problems.append(f"{where}: {c['n_regs']} registers, {c['n_spills']} B spill stores, "
                            f"{c['spill_loads']} B spill loads, {c['stack']} B stack frame (allowed {allowed} B)")
        per_warp = -(-c["n_regs"] * 32 // REGISTER_ALLOC_UNIT) * REGISTER_ALLOC_UNIT
        if per_warp * c["num_warps"] > H100_REGISTERS_PER_BLOCK:
            problems.append(f"{where}: {c['n_regs']} registers x {c['num_warps']} warps exceed the register file "
                            f"(launch would fail: too many resources requested)")
        if c["shared"] > H100_MAX_SHARED_BYTES:
            problems.append(f"{where}: {c['shared']} B shared memory > {H100_MAX_SHARED_BYTES} B")
    assert not problems, f"{config['id']}:\n  " + "\n  ".join(problems) + context


def test_every_triton_kernel_is_compiled(compile_results):
    """Each kernel launched from a module of `kernels/` appears in some configuration above."""
    results, _ = compile_results
    compiled = {f"{c['module']}.{c['kernel']}" for entry in results["configs"].values() for c in entry["calls"]}
    expected = {f"{c['build']}.{k}" for c in CONFIGS for k in c["kernels"]}
    assert set(results["entry_kernels"]) == expected, (
        f"kernels in kernels/: {results['entry_kernels']}; configurations cover {sorted(expected)}")
    missing = set(results["entry_kernels"]) - compiled
    assert not missing, f"not compiled (see the per-configuration failures): {sorted(missing)}"
