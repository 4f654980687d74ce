"""Offline throughput of the continuous-batching engine on seeded synthetic requests.

    python3 benchmarks/bench_offline.py                                   # CPU, tiny generated checkpoint
    python3 benchmarks/bench_offline.py --preset internvl-chat-v1-5 --random-weights --num-requests 64
    python3 benchmarks/bench_offline.py --model /path/to/InternVL-Chat-V1-5 --image-sizes 3840x2160 --max-tiles 40
    python3 benchmarks/bench_offline.py --preset internvl-chat-v1-5 --random-weights --vit-budgets 4,8,16,48

Reports requests/s, output tokens/s, TTFT and TPOT percentiles, ViT tiles/s, and the share of engine time
spent in preprocessing, ViT, prefill steps and decode-only steps. The ViT share is device time on CUDA (the engine
synchronises around each ViT pass); with device preprocessing (--device-preprocessing, default: on with CUDA and
Triton) images are tiled on the GPU inside that pass, so the tiling moves from the preprocessing share to the ViT's. With --vit-budgets, instead, the 4K-image
study (benchmarks/vit_stall.py): one 3840x2160 request (41 tiles) arriving beside 8 decoding text streams, its
TTFT split into preprocessing, queue, ViT and prefill + first token, and the streams' inter-token latency while
it is encoded, per ViT tile budget; a Markdown table and a PNG (benchmarks/results/vit_stall.png unless --plot
says otherwise). Progress bars go to stderr (--no-progress hides them). Record GPU results in RESULTS.md.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_dir import default_output, prepare_output  # noqa: E402


def synthetic(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic gradient + checkerboard picture (distinct per seed, so no two requests share features)."""
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    red = ((x * 255) // max(width - 1, 1) + seed * 37) % 256
    green = ((y * 255) // max(height - 1, 1) + seed * 11) % 256
    blue = torch.where(((x // 32) + (y // 32) + seed) % 2 == 0, 220, 40)
    return Image.fromarray(torch.stack([red, green, blue], -1).to(torch.uint8).numpy(), mode="RGB")


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return f"mean {statistics.mean(ordered) * 1e3:8.1f}  p50 {pick(0.5) * 1e3:8.1f}  p99 {pick(0.99) * 1e3:8.1f} ms"


def build_parser() -> argparse.ArgumentParser:
    from internvl_engine.config import MODEL_PRESETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the tiny demo checkpoint)")
    parser.add_argument("--preset", default=None, choices=MODEL_PRESETS)
    parser.add_argument("--random-weights", action="store_true", help="with --preset: real shapes, random weights")
    parser.add_argument("--quantization", default=None, choices=["int8"],
                        help="int8: weight-only int8 Linears (a preset built int8, a float checkpoint quantized)")
    parser.add_argument("--tokenizer", default=None,
                        help="with --preset: a folder with tokenizer files (default: the tiny demo tokenizer)")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--image-sizes", default="1280x720,640x480", help="comma list WxH; '' for text only")
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--max-tiles", type=int, default=6)
    parser.add_argument("--output-len", default="8,32", help="min,max output tokens (uniform)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-vit-tiles-per-step", type=int, default=8)
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="shard the LLM over N GPUs (N CPU processes on the CPU); the ViT splits its tiles")
    parser.add_argument("--device-preprocessing", default="auto", choices=["auto", "on", "off"],
                        help="tile images on the device (uint8 upload + tile_norm) or in the preprocessing workers; "
                             "auto: on with CUDA and the triton backend")
    parser.add_argument("--vit-budgets", default=None,
                        help="comma list of ViT tiles per step: run the 4K-image study instead (e.g. 4,8,16,48)")
    parser.add_argument("--streams", type=int, default=8, help="decoding text streams beside the 4K request")
    parser.add_argument("--plot", default=default_output("vit_stall.png"),
                        help="the study's PNG (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    from internvl_engine import LLM, SamplingParams

    parser = build_parser()
    args = parser.parse_args(argv)

    options = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                   max_vit_tiles_per_step=args.max_vit_tiles_per_step, load_in_8bit=args.quantization == "int8",
                   tensor_parallel_size=args.tensor_parallel_size,
                   device_preprocessing={"auto": None, "on": True, "off": False}[args.device_preprocessing])
    start = time.perf_counter()
    if args.preset:
        if not args.random_weights:
            parser.error("--preset needs --random-weights (or pass --model with a real checkpoint)")
        from internvl_engine.testing.checkpoint_builder import ensure_tiny_tokenizer

        llm = LLM(None, dtype=args.dtype, device=args.device, preset=args.preset,
                  tokenizer=args.tokenizer or ensure_tiny_tokenizer(preset=args.preset),
                  progress=not args.no_progress, **options)
    else:
        from internvl_engine.testing.checkpoint_builder import ensure_tiny_checkpoint

        llm = LLM(args.model or ensure_tiny_checkpoint("internvl-chat-v1-5", seed=0), dtype=args.dtype,
                  device=args.device, progress=not args.no_progress, **options)
    load_seconds = time.perf_counter() - start
    if args.vit_budgets:
        return vit_study(llm, args, load_seconds)

    rng = random.Random(args.seed)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.image_sizes.split(",") if s]
    low, high = (int(v) for v in args.output_len.split(","))
    requests, params = [], []
    for i in tqdm(range(args.num_requests), desc="synthetic images", unit="req", disable=args.no_progress or not sizes):
        images = [synthetic(*rng.choice(sizes), seed=args.seed * 1000 + i * 10 + j)
                  for j in range(args.images_per_request)] if sizes else []
        tags = "".join(f"Image-{j + 1}: <image>\n" for j in range(len(images)))
        requests.append({"prompt": f"{tags}Describe request {i} in detail.", "images": images,
                         "max_tiles": args.max_tiles})
        params.append(SamplingParams(max_tokens=rng.randint(low, high), temperature=0.0, ignore_eos=True))

    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=not args.no_progress)
    elapsed = time.perf_counter() - start
    failed = [o for o in outputs if o.error]
    done = [o for o in outputs if not o.error]
    out_tokens = sum(len(o.token_ids) for o in done)
    stats = llm.stats
    on_device = llm.vision.preprocesses_on_device(llm.config.device_preprocessing)
    print(f"device {llm.runner.device}, dtype {llm.model.dtype}, load {load_seconds:.1f} s, "
          f"KV blocks {llm.runner.num_blocks} x {llm.config.block_size} tokens, images tiled "
          f"{'on the device' if on_device else 'by the preprocessing workers'}")
    print(f"requests {len(done)} ok / {len(failed)} failed in {elapsed:.2f} s: {len(done) / elapsed:.2f} req/s, "
          f"{out_tokens / elapsed:.1f} output tok/s, {stats['tiles_encoded'] / elapsed:.1f} ViT tiles/s")
    print(f"TTFT  {percentiles([o.metrics.time_to_first_token for o in done])}")
    print(f"TPOT  {percentiles([o.metrics.time_per_output_token for o in done if o.metrics.time_per_output_token])}")
    total = sum(stats[k] for k in ("preprocess_s", "vit_s", "prefill_step_s", "decode_step_s")) or 1.0
    print("time shares: " + ", ".join(f"{k[:-2]} {stats[k] / total:5.1%}"
                                       for k in ("preprocess_s", "vit_s", "prefill_step_s", "decode_step_s")))
    for o in failed[:5]:
        print(f"  failed {o.request_id}: {o.error}")
    return 0 if not failed else 1


def vit_study(llm, args: argparse.Namespace, load_seconds: float) -> int:
    from vit_stall import plot, run_study, table

    budgets = [int(value) for value in args.vit_budgets.split(",")]
    print(f"device {llm.runner.device}, dtype {llm.model.dtype}, load {load_seconds:.1f} s; one 3840x2160 request "
          f"(max {args.max_tiles} tiles) beside {args.streams} decoding streams")
    rows = run_study(llm, budgets, lambda index: synthetic(3840, 2160, seed=args.seed * 1000 + index),
                     args.max_tiles, num_streams=args.streams, progress=not args.no_progress)
    print(table(rows))
    saved = plot(rows, str(prepare_output(args.plot)))
    print(f"plot: {saved}" if saved else "plot: matplotlib not installed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
