"""Full-size benchmarks of the Triton kernels against PyTorch (needs a CUDA GPU).

    python3 benchmarks/bench_kernels.py            # all kernels, full InternVL-Chat-V1.5 shapes
    python3 benchmarks/bench_kernels.py --only decode
    python3 benchmarks/bench_kernels.py --only w8a16   # int8 weight-only GEMM vs bf16 cuBLAS
    python3 benchmarks/bench_kernels.py --smoke    # tiny shapes on the CPU interpreter: checks the script only

Prints TFLOP/s (ViT attention at head_dim 128 for InternViT-6B and 64 for InternViT-300M, paged prefill) or GB/s
(the memory-bound kernels) for the Triton kernel, each torch SDPA backend that runs, and the kernel's PyTorch
reference; plus the measured device-to-device copy bandwidth that the paged-decode target (>= 80% of it at
batch >= 8, context >= 4K) is stated against (paged decode is timed with validate=False, as the engine calls it:
the seq_lens check is a host sync, run once before timing), paged prefill against flash-attn
(`pip install -e ".[gpu]"`; skipped with a note when it is not installed), and tile normalisation of a 3840x2160
image (40 tiles) with and without the upload of the uint8 image, against the official CPU recipe and the CPU path
with its float32 upload; the W8A16 int8 GEMM (bitsandbytes int8 checkpoints) in ms and GB/s against a cuBLAS
matmul on the dequantised 16-bit weight and against dequantise-then-matmul (its reference), with its speedup over
the 16-bit matmul (target: >= 1.6x at M <= 8 on an H100). Every kernel's output is checked against its reference before it is timed. Record results in
benchmarks/RESULTS.md with device, command and date.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


@dataclass(frozen=True)
class Shapes:
    """Benchmark sizes: full InternVL-Chat-V1.5 by default, tiny for --smoke."""

    device: str = "cuda"
    # (tiles, heads, seq, head_dim): InternViT-6B (V1.5) and InternViT-300M (Mini-InternVL 2B / 4B)
    vit: tuple[tuple[int, int, int, int], ...] = ((41, 25, 1025, 128), (41, 16, 1025, 64))
    decode_heads: tuple[int, int, int, int] = (48, 8, 128, 16)  # q heads, kv heads, head_dim, block size
    decode_batches: tuple[int, ...] = (1, 8, 32)
    decode_contexts: tuple[int, ...] = (1024, 4096, 16384)
    prefill_heads: tuple[int, int, int, int] = (48, 8, 128, 16)  # q heads, kv heads, head_dim, block size
    # (new tokens per chunk, cached prefix per chunk): 8K new tokens per step either way.
    prefill_cases: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = (
        ((8192,), (0,)), ((2048,) * 4, (2048,) * 4))
    unshuffle: tuple[int, int, int] = (41, 1025, 3200)  # tiles, seq, width
    image: tuple[int, int, int] = (3840, 2160, 40)  # width, height, max_num
    copy_bytes: int = 2**30
    # (name, K, N) of InternVL-Chat-V1.5's linear layers (InternLM2-20B, InternViT-6B's MLP), and the M rows.
    w8a16_shapes: tuple[tuple[str, int, int], ...] = (
        ("20B wqkv", 6144, 8192), ("20B wo", 6144, 6144), ("20B w1", 6144, 16384), ("20B w2", 16384, 6144),
        ("20B lm_head", 6144, 92553), ("ViT-6B fc1", 3200, 12800), ("ViT-6B fc2", 12800, 3200))
    w8a16_ms: tuple[int, ...] = (1, 2, 4, 8, 16, 128, 2048)
    l2_flush_bytes: int = 2**28  # > the H100's / H200's 50 MB L2: flush size, and the w8a16 weight copies' total


SMOKE = Shapes(device="cpu", vit=((1, 2, 65, 16), (1, 3, 33, 32)), decode_heads=(6, 2, 16, 16),
               decode_batches=(1, 2), decode_contexts=(64,), prefill_heads=(6, 2, 16, 16),
               prefill_cases=(((40,), (0,)), ((24,) * 2, (19,) * 2)), unshuffle=(1, 17, 8), image=(200, 120, 4),
               copy_bytes=2**20, w8a16_shapes=(("tiny", 100, 61), ("tiny-wide", 257, 40)), w8a16_ms=(1, 3, 20),
               l2_flush_bytes=2**13)


def cuda_time_ms(fn: Callable[[], object], repeat: int = 20, warmup: int = 3,
                 before: Callable[[], object] | None = None) -> float:
    """Median of CUDA-event timings of `fn` (after warm-up, which also triggers Triton compilation);
    wall-clock on CPU (--smoke), where the numbers mean nothing. `before` runs ahead of each timed call, outside
    the timing (e.g. an L2 flush)."""
    for _ in range(warmup if torch.cuda.is_available() else 1):  # CPU: the interpreter has nothing to warm
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(max(1, repeat // 10)):
            if before is not None:
                before()
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def row(name: str, ms: float, amount: float, unit: str, note: str = "") -> None:
    rate = amount / (ms * 1e-3) / (1e12 if unit == "TFLOP/s" else 1e9)
    print(f"  {name:<34s} {ms:9.3f} ms {rate:9.1f} {unit}{'  ' + note if note else ''}")


def bench_vit_attention(dtype: torch.dtype, shapes: Shapes) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from internvl_engine.kernels.vit_attention import vit_attention, vit_attention_ref

    for tiles, heads, seq, dim in shapes.vit:
        print(f"ViT attention: {tiles} tiles x {heads} heads x {seq} x {dim}, {dtype}")
        qkv = torch.randn(tiles, seq, 3 * heads * dim, device=shapes.device, dtype=dtype)
        # The model's layout: views of the packed qkv projection, [tiles, heads, seq, dim].
        q, k, v = (t.reshape(tiles, seq, heads, dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        flops = 4 * tiles * heads * seq * seq * dim
        expected = vit_attention_ref(q.float(), k.float(), v.float())
        err = (vit_attention(q, k, v).float() - expected).abs().max().item()
        print(f"  max abs error vs fp32 reference: {err:.2e}")
        row("triton vit_attention", cuda_time_ms(lambda: vit_attention(q, k, v)), flops, "TFLOP/s")
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH):
            try:
                with sdpa_kernel([backend]):
                    ms = cuda_time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
                row(f"torch SDPA {backend.name.lower()}", ms, flops, "TFLOP/s")
            except RuntimeError as exc:
                print(f"  torch SDPA {backend.name.lower():<22s} unavailable: {str(exc).splitlines()[0][:60]}")


def copy_bandwidth_gbs(shapes: Shapes) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second) on a 1 GiB buffer."""
    src = torch.empty(shapes.copy_bytes, dtype=torch.uint8, device=shapes.device)
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def bench_paged_decode(dtype: torch.dtype, shapes: Shapes) -> None:
    from internvl_engine.kernels.paged_decode import paged_decode, paged_decode_ref

    q_heads, kv_heads, dim, block_size = shapes.decode_heads
    device = shapes.device
    peak = copy_bandwidth_gbs(shapes)
    print(f"paged decode: {q_heads} query / {kv_heads} KV heads, head_dim {dim}, block {block_size}, {dtype}; "
          f"measured copy bandwidth {peak:.0f} GB/s")
    for batch in shapes.decode_batches:
        for context in shapes.decode_contexts:
            blocks_per_seq = context // block_size
            num_blocks = batch * blocks_per_seq
            k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, device=device, dtype=dtype)
            v_cache = torch.randn_like(k_cache)
            tables = torch.randperm(num_blocks, device=device, dtype=torch.int32).view(batch, blocks_per_seq)
            lens = torch.full((batch,), context, dtype=torch.int32, device=device)
            q = torch.randn(batch, q_heads, dim, device=device, dtype=dtype)
            moved = 2 * batch * context * kv_heads * dim * k_cache.element_size()
            checked = paged_decode(q, k_cache, v_cache, tables, lens, validate=True)  # the seq_lens check, once
            if batch * context <= 32 * 4096:
                expected = paged_decode_ref(q.float(), k_cache.float(), v_cache.float(), tables, lens)
                err = (checked.float() - expected).abs().max().item()
            else:
                err = float("nan")
            # Timed as the engine calls it: validate=False, since the check reads seq_lens on the host (a sync
            # per call that would time the host round trip, not the kernel).
            ms = cuda_time_ms(lambda: paged_decode(q, k_cache, v_cache, tables, lens, validate=False))
            rate = moved / (ms * 1e-3) / 1e9
            ref_ms = cuda_time_ms(lambda: paged_decode_ref(q, k_cache, v_cache, tables, lens), repeat=5)
            print(f"  batch {batch:3d} context {context:6d}: triton {ms:8.3f} ms {rate:7.0f} GB/s "
                  f"({rate / peak:5.1%} of copy)  torch ref {ref_ms:8.3f} ms  max err {err:.1e}")


def causal_flops(query_lens: list[int], contexts: list[int], heads: int, head_dim: int) -> float:
    """Causal attention FLOPs = 4 * heads * head_dim * P, P = the (query, key) pairs attended: query j of a chunk
    of n new tokens over a context of L tokens (prefix L - n) attends the L - n + j + 1 keys up to itself, so a
    chunk adds n * (L - n) + n * (n + 1) / 2. Two matmuls (Q.K^T and P.V) of 2 FLOPs per multiply-add; exp,
    masking and the masked halves of diagonal tiles are not counted (as flash-attention counts causal FLOPs)."""
    pairs = sum(n * (length - n) + n * (n + 1) // 2 for n, length in zip(query_lens, contexts))
    return 4.0 * heads * head_dim * pairs


def bench_paged_prefill(dtype: torch.dtype, shapes: Shapes) -> None:
    """paged_prefill vs dense fused attention: torch SDPA on contiguous 4-D tensors (K/V gathered and their heads
    repeated beforehand, untimed; `is_causal` without a prefix, the lower-right causal bias with one) and, when
    installed, flash-attn's varlen kernel on packed contiguous K/V and its paged `flash_attn_with_kvcache`."""
    import torch.nn.functional as F

    from internvl_engine.kernels.paged_prefill import paged_prefill, paged_prefill_ref

    try:
        from torch.nn.attention.bias import causal_lower_right
    except ImportError:  # older torch: a boolean mask (SDPA picks a masked backend)
        def causal_lower_right(n: int, length: int) -> torch.Tensor:
            return torch.ones(n, length, dtype=torch.bool, device=shapes.device).tril(length - n)
    try:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
    except ImportError as exc:
        flash_attn_varlen_func = flash_attn_with_kvcache = None
        missing = f"flash-attn is not importable ({str(exc).splitlines()[0][:60]}): its rows are skipped"

    q_heads, kv_heads, dim, block_size = shapes.prefill_heads
    device, group = shapes.device, q_heads // kv_heads
    print(f"paged prefill: {q_heads} query / {kv_heads} KV heads, head_dim {dim}, block {block_size}, {dtype}; "
          f"TFLOP/s of causal FLOPs (4 * heads * head_dim * attended query-key pairs)")
    if flash_attn_varlen_func is None:
        print(f"  note: {missing} (pip install -e '.[gpu]')")
    for query_lens, prefixes in shapes.prefill_cases:
        contexts = [n + p for n, p in zip(query_lens, prefixes)]
        chunks, total = len(query_lens), sum(query_lens)
        starts = [sum(query_lens[:c]) for c in range(chunks)]
        pages = [-(-length // block_size) for length in contexts]
        k_cache = torch.randn(sum(pages), block_size, kv_heads, dim, device=device, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        perm = torch.randperm(sum(pages), device=device, dtype=torch.int32)
        tables = torch.full((chunks, max(pages)), -1, dtype=torch.int32, device=device)
        for c, count in enumerate(pages):
            tables[c, :count] = perm[sum(pages[:c]): sum(pages[:c]) + count]
        q = torch.randn(q_heads, total, dim, device=device, dtype=dtype).transpose(0, 1)  # the engine's layout
        out = torch.empty(q_heads, total, dim, device=device, dtype=dtype).transpose(0, 1)
        starts_t, lens_t, ctx_t = (torch.tensor(x, dtype=torch.int32, device=device)
                                   for x in (starts, query_lens, contexts))
        args = (q, k_cache, v_cache, tables, starts_t, lens_t, ctx_t)
        flops = causal_flops(query_lens, contexts, q_heads, dim)
        expected = paged_prefill_ref(q.float(), k_cache.float(), v_cache.float(), *args[3:])
        print(f"  {chunks} x {query_lens[0]} new tokens over {prefixes[0]}-token prefixes "
              f"({total} query tokens, {flops / 1e12:.3f} TFLOP)")

        def error(result: torch.Tensor) -> str:
            return f"max err {(result.float() - expected).abs().max().item():.1e}"

        def run() -> torch.Tensor:
            return paged_prefill(*args, max(query_lens), out=out, validate=False)

        error_note = error(run())
        ms = cuda_time_ms(run)
        row("triton paged_prefill", ms, flops, "TFLOP/s", error_note)

        # Dense baselines: each chunk's context gathered into contiguous K/V (untimed).
        contiguous_k = [k_cache[tables[c, :pages[c]].long()].flatten(0, 1)[:contexts[c]] for c in range(chunks)]
        contiguous_v = [v_cache[tables[c, :pages[c]].long()].flatten(0, 1)[:contexts[c]] for c in range(chunks)]
        dense = [(q[s: s + n].transpose(0, 1)[None].contiguous(),  # [1, heads, n, d]
                  k.repeat_interleave(group, dim=1).transpose(0, 1)[None].contiguous(),  # [1, heads, L, d]
                  v.repeat_interleave(group, dim=1).transpose(0, 1)[None].contiguous(),
                  None if p == 0 else causal_lower_right(n, n + p))
                 for s, n, p, k, v in zip(starts, query_lens, prefixes, contiguous_k, contiguous_v)]

        def sdpa() -> torch.Tensor:
            outs = [F.scaled_dot_product_attention(qd, kd, vd, is_causal=mask is None, attn_mask=mask)
                    for qd, kd, vd, mask in dense]
            return torch.cat([o[0].transpose(0, 1) for o in outs])

        try:
            note = error(sdpa())
            row("torch SDPA (dense, contiguous)", cuda_time_ms(sdpa), flops, "TFLOP/s", note)
        except RuntimeError as exc:
            print(f"  torch SDPA (dense, contiguous)     unavailable: {str(exc).splitlines()[0][:60]}")
        if flash_attn_varlen_func is not None:
            bench_flash_attn(flash_attn_varlen_func, flash_attn_with_kvcache, q, contiguous_k, contiguous_v,
                             query_lens, contexts, k_cache, v_cache, tables, ctx_t, flops, ms, error)
        ref_ms = cuda_time_ms(lambda: paged_prefill_ref(*args), repeat=5, warmup=1)
        row("torch paged_prefill_ref", ref_ms, flops, "TFLOP/s")


def bench_flash_attn(varlen, with_kvcache, q, contiguous_k, contiguous_v, query_lens, contexts, k_cache, v_cache,
                     tables, ctx_t, flops, triton_ms, error) -> None:
    """flash-attn rows of the prefill benchmark, each with Triton's speed relative to it (its ms / Triton's ms):
    varlen over packed contiguous K/V, and the paged kernel on the same block table when flash-attn accepts the
    page size (FA2 wants pages of a multiple of 256 tokens; otherwise the cache is re-paged into 256-token pages,
    untimed, and the row says so)."""
    device = q.device

    def cumulative(lengths: list[int]) -> torch.Tensor:
        return torch.tensor([sum(lengths[:i]) for i in range(len(lengths) + 1)], dtype=torch.int32, device=device)

    packed_q, packed_k, packed_v = q.contiguous(), torch.cat(contiguous_k), torch.cat(contiguous_v)
    cu_q, cu_k = cumulative(query_lens), cumulative(contexts)

    def run_varlen() -> torch.Tensor:
        return varlen(packed_q, packed_k, packed_v, cu_q, cu_k, max(query_lens), max(contexts), causal=True)

    candidates = [("flash-attn varlen (contiguous K/V)", run_varlen)]
    if len(set(query_lens)) == 1:  # flash_attn_with_kvcache takes q as [batch, seqlen_q, heads, d]
        batched_q = q.contiguous().view(len(query_lens), query_lens[0], *q.shape[1:])
        page = 256
        pages = [-(-length // page) for length in contexts]
        k_pages = torch.zeros(sum(pages), page, *k_cache.shape[2:], dtype=k_cache.dtype, device=device)
        v_pages = torch.zeros_like(k_pages)
        table256 = torch.full((len(pages), max(pages)), -1, dtype=torch.int32, device=device)
        for c, (k, v) in enumerate(zip(contiguous_k, contiguous_v)):
            first = sum(pages[:c])
            k_pages.view(-1, *k_pages.shape[2:])[first * page: first * page + k.shape[0]] = k
            v_pages.view(-1, *v_pages.shape[2:])[first * page: first * page + v.shape[0]] = v
            table256[c, :pages[c]] = torch.arange(first, first + pages[c], dtype=torch.int32, device=device)

        def paged(kc, vc, table):
            return lambda: with_kvcache(batched_q, kc, vc, cache_seqlens=ctx_t, block_table=table,
                                        causal=True).flatten(0, 1)

        candidates.append((f"flash-attn kvcache ({k_cache.shape[1]}-token pages)", paged(k_cache, v_cache, tables)))
        candidates.append(("flash-attn kvcache (256-token pages)", paged(k_pages, v_pages, table256)))
    for name, fn in candidates:
        try:
            note = error(fn())
        except RuntimeError as exc:
            print(f"  {name:<34s} unavailable: {str(exc).splitlines()[0][:70]}")
            continue
        ms = cuda_time_ms(fn)
        row(name, ms, flops, "TFLOP/s", f"{note}; triton at {ms / triton_ms:.2f}x its speed")


def bench_pixel_unshuffle(dtype: torch.dtype, shapes: Shapes) -> None:
    from internvl_engine.kernels.pixel_unshuffle import pixel_unshuffle_layernorm, pixel_unshuffle_layernorm_ref

    tiles, seq, width = shapes.unshuffle
    x = torch.randn(tiles, seq, width, device=shapes.device, dtype=dtype)
    weight = torch.randn(4 * width, device=shapes.device, dtype=dtype)
    bias = torch.randn(4 * width, device=shapes.device, dtype=dtype)
    moved = tiles * (seq - 1) * width * x.element_size() * 2
    print(f"pixel unshuffle + LayerNorm: [{tiles}, {seq}, {width}] -> [{tiles}, {(seq - 1) // 4}, {4 * width}], "
          f"{dtype}")
    for name, fn in (("triton", pixel_unshuffle_layernorm), ("torch reference", pixel_unshuffle_layernorm_ref)):
        row(name, cuda_time_ms(lambda: fn(x, weight, bias, 1e-5, "v1")), moved, "GB/s")


def bench_tile_norm(shapes: Shapes) -> None:
    """tile_norm of a 3840x2160 image (40 tiles + thumbnail) to float32: the kernel alone (the image already on the
    device), then with the host-to-device upload of the uint8 image inside the timed region, as the engine pays
    it (pinned memory, the DeviceTiler's non-blocking copy on a side stream the kernel waits on) and from pageable
    memory; against the official CPU recipe and this repository's CPU path (`image_to_pixel_values`) with the
    upload of its float32 tiles, what the engine pays without device preprocessing."""
    from bench_preprocess import seed_load_image, synthetic_image

    from internvl_engine.kernels.tile_norm import tile_norm, tile_norm_bytes
    from internvl_engine.preprocessing.cpu import image_to_pixel_values, open_rgb_image, plan_tiles
    from internvl_engine.preprocessing.device import DeviceTiler, HostImage

    width, height, max_num = shapes.image
    image = synthetic_image(width, height)
    rgb = open_rgb_image(image)
    plan = plan_tiles(rgb.width, rgb.height, 1, max_num, 448, True)
    device = torch.device(shapes.device)
    pin = device.type == "cuda"
    pageable = torch.from_numpy(np.asarray(rgb).copy())  # [H, W, 3] uint8 on the host
    pinned = pageable.pin_memory() if pin else pageable
    pixels = pageable.to(device)
    expected = seed_load_image(image, max_num=max_num)
    tiler = DeviceTiler(device, torch.float32, use_triton=True)
    held = HostImage(pinned, plan, 448)
    identical = torch.equal(tile_norm(pixels, plan, 448).cpu(), expected)
    identical &= torch.equal(tiler.tiles([held])[0].cpu(), expected)
    print(f"tile normalisation: {width}x{height} -> {plan.num_tiles} tiles, float32; bit-identical to the official "
          f"recipe: {identical}")
    upload_mb = pageable.numel() / 1e6
    kernel_ms = cuda_time_ms(lambda: tile_norm(pixels, plan, 448))
    pinned_ms = cuda_time_ms(lambda: tiler.tiles([held]))
    pageable_ms = cuda_time_ms(lambda: tile_norm(pageable.to(device, non_blocking=True), plan, 448))
    row("triton tile_norm (image on device)", kernel_ms, tile_norm_bytes(height, width, plan), "GB/s")
    print(f"  + {upload_mb:.1f} MB uint8 upload, pinned (engine)  {pinned_ms:9.3f} ms")
    print(f"  + {upload_mb:.1f} MB uint8 upload, pageable       {pageable_ms:9.3f} ms")
    start = time.perf_counter()
    for _ in range(3):
        seed_load_image(image, max_num=max_num)
    official_ms = (time.perf_counter() - start) / 3 * 1000
    start = time.perf_counter()
    for _ in range(3):
        tiles = image_to_pixel_values(rgb, plan, 448)
    cpu_path_ms = (time.perf_counter() - start) / 3 * 1000
    host_tiles = tiles.pin_memory() if pin else tiles
    tiles_upload_ms = cuda_time_ms(lambda: host_tiles.to(device, non_blocking=True))
    print(f"  official CPU recipe {official_ms:8.1f} ms; CPU path (image_to_pixel_values) {cpu_path_ms:8.1f} ms "
          f"+ {tiles.numel() * 4 / 1e6:.0f} MB float32 upload (pinned) {tiles_upload_ms:7.3f} ms")
    print(f"  speedup over the official recipe: {official_ms / kernel_ms:6.0f}x kernel only, "
          f"{official_ms / pinned_ms:6.0f}x with the pinned upload")


def graph_time_ms(fns: list[Callable[[], object]], repeat: int = 20) -> float:
    """Device time per call of `fns` run back to back, timed as replays of one CUDA graph holding a pass over all
    of them: no host launch overhead, as the engine's decode graphs run the layers. Each fn runs once before the
    capture (warm-up, Triton compilation). CPU (--smoke): wall-clock per call, meaningless."""
    if not torch.cuda.is_available():
        return cuda_time_ms(lambda: [fn() for fn in fns], repeat=repeat) / len(fns)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream (cuBLAS workspaces, autotuning)
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return cuda_time_ms(graph.replay, repeat=repeat) / len(fns)


def bench_w8a16(dtype: torch.dtype, shapes: Shapes) -> None:
    """w8a16_linear vs F.linear on the dequantised weight in x's dtype (cuBLAS; the weight dequantised beforehand,
    untimed: the 16-bit checkpoint's speed) and vs w8a16_linear_ref (dequantise, then matmul, every call).
    The kernel and the matmul are timed as device time per call (`graph_time_ms`: CUDA-graph replays, as the
    engine's decode runs them) over enough distinct copies of the weight (> l2_flush_bytes in all, cycled) that
    each call reads its weight from HBM: a 50 MB int8 weight would otherwise partly stay in the 50 MB L2 between
    calls (its 16-bit copy would not), flattering the kernel. "eager" is one launch with the L2 flushed first,
    host launch overhead included. GB/s of the kernel's compulsory traffic M*K*2 + N*K + N*4 + M*N*2 (the int8
    weight once); the matmul's own GB/s counts its 2-byte weight. Speedup = matmul time / kernel time."""
    from functools import partial

    import torch.nn.functional as F

    from internvl_engine.kernels.w8a16_gemm import GEMV_MAX_M, w8a16_linear, w8a16_linear_ref

    elem = torch.empty((), dtype=dtype).element_size()
    dname = str(dtype).removeprefix("torch.")
    flush = torch.empty(shapes.l2_flush_bytes, dtype=torch.uint8, device=shapes.device)
    print(f"w8a16 weight-only int8 GEMM (bitsandbytes layout), {dname}: kernel vs matmul on the dequantised "
          f"{dname} weight (cuBLAS) and dequantise-then-matmul; device time per call from CUDA-graph replays over "
          f"weights cycled past L2; GEMV / split-K path for M <= {GEMV_MAX_M}")
    small_m_speedups = []
    for name, K, N in shapes.w8a16_shapes:
        gen = torch.Generator(device=shapes.device).manual_seed(0)
        copies = max(1, -(-shapes.l2_flush_bytes // (N * K)))
        weights = [torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8, device=shapes.device)
                   for _ in range(copies)]
        scb = torch.rand(N, generator=gen, device=shapes.device) * 0.5 + 0.01
        dense = [(w.float() * scb[:, None] / 127).to(dtype) for w in weights]  # the 16-bit weights, untimed
        weight = weights[0]
        print(f"  {name}: K {K} -> N {N} ({copies} weight copies)")
        for m in shapes.w8a16_ms:
            x = torch.randn(m, K, generator=gen, device=shapes.device).to(dtype)
            expected = w8a16_linear_ref(x, weight, scb).float()
            err = ((w8a16_linear(x, weight, scb).float() - expected).abs().max() / expected.abs().max()).item()
            ms = graph_time_ms([partial(w8a16_linear, x, w, scb) for w in weights])
            dense_ms = graph_time_ms([partial(F.linear, x, d) for d in dense])
            eager_ms = cuda_time_ms(lambda: w8a16_linear(x, weight, scb), before=flush.zero_)
            ref_ms = cuda_time_ms(lambda: w8a16_linear_ref(x, weight, scb), repeat=5, before=flush.zero_)
            moved = m * K * elem + N * K + N * 4 + m * N * elem
            dense_moved = m * K * elem + N * K * elem + m * N * elem
            speedup = dense_ms / ms
            if m <= 8:
                small_m_speedups.append(speedup)
            print(f"    M {m:5d}: triton {ms:8.4f} ms {moved / ms / 1e6:6.0f} GB/s {2 * m * N * K / ms / 1e9:6.1f} "
                  f"TFLOP/s (eager {eager_ms:7.4f} ms) | matmul {dense_ms:8.4f} ms {dense_moved / dense_ms / 1e6:6.0f} "
                  f"GB/s | dequant+matmul {ref_ms:8.4f} ms | speedup {speedup:5.2f}x over {dname}, "
                  f"{ref_ms / ms:5.2f}x over ref  rel err {err:.1e}")
    if small_m_speedups:
        geo = float(np.exp(np.mean(np.log(small_m_speedups))))
        print(f"  M <= 8: speedup over the 16-bit matmul min {min(small_m_speedups):.2f}x, geometric mean "
              f"{geo:.2f}x (target >= 1.6x on an H100)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["vit", "decode", "prefill", "unshuffle", "tile", "w8a16"], default=None)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter (no timings)")
    args = parser.parse_args(argv)
    if args.smoke:
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" and argv is None:
            # Triton reads TRITON_INTERPRET when it is imported: run this script again with it set
            print("no GPU: re-running under Triton's interpreter (TRITON_INTERPRET=1)", file=sys.stderr, flush=True)
            os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "TRITON_INTERPRET": "1"})
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke without a GPU needs TRITON_INTERPRET=1 set before Python starts")
            return 1
        shapes, dtype = SMOKE, torch.float16  # the interpreter's bf16 dots are unreliable
    elif not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (the kernels' CPU runs are interpreter tests, not benchmarks); "
              "nothing was measured. Use --smoke to check the script on the CPU.")
        return 1
    else:
        shapes, dtype = Shapes(), getattr(torch, args.dtype)
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    benches = {"vit": lambda: bench_vit_attention(dtype, shapes), "decode": lambda: bench_paged_decode(dtype, shapes),
               "prefill": lambda: bench_paged_prefill(dtype, shapes),
               "unshuffle": lambda: bench_pixel_unshuffle(dtype, shapes), "tile": lambda: bench_tile_norm(shapes),
               "w8a16": lambda: bench_w8a16(dtype, shapes)}
    for name, bench in benches.items():
        if args.only in (None, name):
            bench()
    return 0


if __name__ == "__main__":
    sys.exit(main())
