"""Full-size benchmarks of the four Triton kernels against PyTorch (needs a CUDA GPU).

    python3 benchmarks/bench_kernels.py            # all kernels, full InternVL-Chat-V1.5 shapes
    python3 benchmarks/bench_kernels.py --only decode
    python3 benchmarks/bench_kernels.py --smoke    # tiny shapes on the CPU interpreter: checks the script only

Prints TFLOP/s (ViT attention) or GB/s (the memory-bound kernels) for the Triton kernel, each torch SDPA
backend that runs, and the kernel's PyTorch reference; plus the measured device-to-device copy bandwidth that
the paged-decode target (>= 80% of it at batch >= 8, context >= 4K) is stated against, and tile normalisation
of a 3840x2160 image (40 tiles) against the official CPU recipe. Every kernel's output is checked against its
reference before it is timed. Record results in benchmarks/RESULTS.md with device, command and date.
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
    vit: tuple[int, int, int, int] = (41, 25, 1025, 128)  # tiles, heads, seq, head_dim
    decode_heads: tuple[int, int, int, int] = (48, 8, 128, 16)  # q heads, kv heads, head_dim, block size
    decode_batches: tuple[int, ...] = (1, 8, 32)
    decode_contexts: tuple[int, ...] = (1024, 4096, 16384)
    unshuffle: tuple[int, int, int] = (41, 1025, 3200)  # tiles, seq, width
    image: tuple[int, int, int] = (3840, 2160, 40)  # width, height, max_num
    copy_bytes: int = 2**30


SMOKE = Shapes(device="cpu", vit=(1, 2, 65, 16), decode_heads=(6, 2, 16, 16), decode_batches=(1, 2),
               decode_contexts=(64,), unshuffle=(1, 17, 8), image=(200, 120, 4), copy_bytes=2**20)


def cuda_time_ms(fn: Callable[[], object], repeat: int = 20, warmup: int = 3) -> float:
    """Median of CUDA-event timings of `fn` (after warm-up, which also triggers Triton compilation);
    wall-clock on CPU (--smoke), where the numbers mean nothing."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(max(1, repeat // 10)):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def row(name: str, ms: float, amount: float, unit: str) -> None:
    rate = amount / (ms * 1e-3) / (1e12 if unit == "TFLOP/s" else 1e9)
    print(f"  {name:<34s} {ms:9.3f} ms {rate:9.1f} {unit}")


def bench_vit_attention(dtype: torch.dtype, shapes: Shapes) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from internvl_engine.kernels.vit_attention import vit_attention, vit_attention_ref

    tiles, heads, seq, dim = shapes.vit
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
            if batch * context <= 32 * 4096:
                expected = paged_decode_ref(q.float(), k_cache.float(), v_cache.float(), tables, lens)
                err = (paged_decode(q, k_cache, v_cache, tables, lens).float() - expected).abs().max().item()
            else:
                err = float("nan")
            ms = cuda_time_ms(lambda: paged_decode(q, k_cache, v_cache, tables, lens))
            rate = moved / (ms * 1e-3) / 1e9
            ref_ms = cuda_time_ms(lambda: paged_decode_ref(q, k_cache, v_cache, tables, lens), repeat=5)
            print(f"  batch {batch:3d} context {context:6d}: triton {ms:8.3f} ms {rate:7.0f} GB/s "
                  f"({rate / peak:5.1%} of copy)  torch ref {ref_ms:8.3f} ms  max err {err:.1e}")


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
    from bench_preprocess import seed_load_image, synthetic_image

    from internvl_engine.preprocessing.cpu import open_rgb_image, plan_tiles
    from internvl_engine.kernels.tile_norm import tile_norm

    width, height, max_num = shapes.image
    image = synthetic_image(width, height)
    rgb = open_rgb_image(image)
    plan = plan_tiles(rgb.width, rgb.height, 1, max_num, 448, True)
    pixels = torch.from_numpy(np.asarray(rgb).copy()).to(shapes.device)
    expected = seed_load_image(image, max_num=max_num)
    got = tile_norm(pixels, plan, 448)
    print(f"tile normalisation: {width}x{height} -> {plan.num_tiles} tiles; bit-identical to the official "
          f"recipe: {torch.equal(got.cpu(), expected)}")
    gpu_ms = cuda_time_ms(lambda: tile_norm(pixels, plan, 448))
    start = time.perf_counter()
    for _ in range(3):
        seed_load_image(image, max_num=40)
    cpu_ms = (time.perf_counter() - start) / 3 * 1000
    print(f"  triton tile_norm {gpu_ms:8.3f} ms   official CPU recipe {cpu_ms:8.1f} ms   "
          f"speedup {cpu_ms / gpu_ms:6.0f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["vit", "decode", "unshuffle", "tile"], default=None)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter (no timings)")
    args = parser.parse_args(argv)
    if args.smoke:
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
               "unshuffle": lambda: bench_pixel_unshuffle(dtype, shapes), "tile": lambda: bench_tile_norm(shapes)}
    for name, bench in benches.items():
        if args.only in (None, name):
            bench()
    return 0


if __name__ == "__main__":
    sys.exit(main())
