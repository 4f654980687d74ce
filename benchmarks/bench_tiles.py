"""What tiles cost: one image's time to first token split by stage as its tile count grows, and what encoding a
large image costs the text streams decoding beside it as the ViT tile budget per step varies.

    python3 benchmarks/bench_tiles.py                                            # CPU, tiny generated checkpoint
    python3 benchmarks/bench_tiles.py --preset internvl-chat-v1-5 --random-weights   # GPU, real shapes
    python3 benchmarks/bench_tiles.py --model /path/to/InternVL-Chat-V1-5 --image photo.jpg

Part 1 (TTFT by tiles): for each count in --tiles (default 1,2,4,6,12,24,40) one request alone on the engine, with
max_tiles = that count and a synthetic image whose aspect ratio makes exactly that grid (8x5 for 40: 3584x2240;
plus the thumbnail when there is more than one tile), or with --image, that image (the nearest count its aspect
allows; the real counts are printed). Its TTFT is split into preprocessing (tokenise, tile), queue, ViT,
prefill (the steps before the last) and first token (the last prefill step and the sampling); medians of
--repeats runs, each on a distinct image (no feature-cache or prefix-cache hit beyond the system prompt).

Part 2 (ITL by ViT budget): the study of benchmarks/vit_stall.py: --streams text streams decoding, then one
request with the --stall-tiles image arrives; per max_vit_tiles_per_step in --budgets, the streams' inter-token
latency before and while it is encoded, and its TTFT.

Writes JSON (--output, default benchmarks/results/bench_tiles.json) and two PNGs beside it: <stem>_ttft.png
(stacked bars: the TTFT split per tile count) and <stem>_itl.png (lines: stream ITL p50/p99/max while the image is
encoded, and its TTFT, per budget). Progress bars on stderr (--no-progress hides them).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_offline import synthetic  # noqa: E402
from bench_args import HelpWithDefaults, int_list_or_empty as int_list  # noqa: E402
from results_dir import default_output, prepare_output  # noqa: E402
from vit_stall import StallRow, percentile, run_study, table  # noqa: E402

TTFT_PARTS = ("preprocess_s", "queue_s", "vit_s", "prefill_s", "first_token_s")
PART_LABELS = {"preprocess_s": "preprocessing", "queue_s": "queue", "vit_s": "ViT",
               "prefill_s": "prefill (steps before the last)", "first_token_s": "last prefill step + first token"}


def grid_for(tiles: int) -> tuple[int, int]:
    """(cols, rows) with cols * rows == tiles, cols >= rows, the aspect nearest 16:9 (a landscape photo)."""
    pairs = [(tiles // rows, rows) for rows in range(1, int(tiles ** 0.5) + 1) if tiles % rows == 0]
    return min(pairs, key=lambda pair: abs(pair[0] / pair[1] - 16 / 9))


def image_for(tiles: int, seed: int, image_size: int = 448) -> Image.Image:
    """A synthetic image exactly `tiles` tiles wide x high (no resize before cropping), distinct per seed."""
    cols, rows = grid_for(tiles)
    return synthetic(cols * image_size, rows * image_size, seed)


def real_tiles(llm: Any, image: Image.Image, max_tiles: int) -> tuple[int, str]:
    """The engine's tile count for `image` at `max_tiles` (thumbnail included) and its grid."""
    from internvl_engine.preprocessing.tiling import plan_tiles

    config = llm.model.config
    plan = plan_tiles(image.width, image.height, config.min_dynamic_patch, max_tiles, config.force_image_size,
                      config.use_thumbnail)
    return plan.num_tiles, f"{plan.cols}x{plan.rows}{' + thumbnail' if plan.thumbnail else ''}"


@dataclasses.dataclass
class TileRow:
    requested_tiles: int
    grid: str
    image_size: str
    tiles: int
    prompt_tokens: int
    ttft_s: float
    preprocess_s: float
    queue_s: float
    vit_s: float
    prefill_s: float
    first_token_s: float
    steps: int
    runs: list[dict[str, float]]


def measure_ttft(llm: Any, image: Image.Image, max_tiles: int, tag: str) -> dict[str, float]:
    """One request alone, to its first token: the TTFT and its parts (seconds)."""
    from internvl_engine import SamplingParams

    start = time.perf_counter()
    request_id = llm.add_request({"prompt": f"[{tag}] <image>\nDescribe this image in detail.", "images": [image],
                                  "max_tiles": max_tiles}, SamplingParams(max_tokens=1, temperature=0.0))
    preprocess = time.perf_counter() - start
    if not isinstance(request_id, str):
        raise RuntimeError(f"the request was refused: {request_id.error}")
    prompt_tokens = llm._requests[request_id].num_prompt_tokens
    vit = prefill = first_token = 0.0
    steps, output = 0, None
    while output is None:
        vit_before, step_start = llm.stats["vit_s"], time.perf_counter()
        finished = {o.request_id: o for o in llm.step()}
        elapsed = time.perf_counter() - step_start
        step_vit = llm.stats["vit_s"] - vit_before
        steps += 1
        vit += step_vit
        output = finished.get(request_id)
        if output is None:
            prefill += elapsed - step_vit
        else:
            first_token = elapsed - step_vit
    if output.error:
        raise RuntimeError(f"the request failed: {output.error}")
    ttft = output.metrics.time_to_first_token
    queue = max(ttft - preprocess - vit - prefill - first_token, 0.0)  # between add_request and the first step
    return {"ttft_s": ttft, "preprocess_s": preprocess, "queue_s": queue, "vit_s": vit, "prefill_s": prefill,
            "first_token_s": first_token, "steps": steps, "prompt_tokens": prompt_tokens}


def ttft_by_tiles(llm: Any, counts: list[int], repeats: int, image_path: str | None, seed: int,
                  progress: bool) -> list[TileRow]:
    rows = []
    fixed = Image.open(image_path).convert("RGB") if image_path else None
    measure_ttft(llm, image_for(1, seed=seed * 1000 + 999), 1, "warm-up")  # first-call costs out of the numbers
    bar = tqdm(total=len(counts) * repeats, desc="TTFT by tiles", unit="run", disable=not progress)
    for index, count in enumerate(counts):
        runs = []
        for repeat in range(repeats):
            if fixed is not None:  # distinct content per run: no feature-cache hit
                image = fixed.copy()
                image.putpixel((0, 0), (repeat * 37 % 256, index * 11 % 256, 7))
            else:
                image = image_for(count, seed=seed * 1000 + index * 10 + repeat)
            runs.append(measure_ttft(llm, image, count, f"tiles {count} run {repeat}"))
            bar.update()
        tiles, grid = real_tiles(llm, image, count)
        median = {key: statistics.median(run[key] for run in runs) for key in ("ttft_s",) + TTFT_PARTS}
        rows.append(TileRow(count, grid, f"{image.width}x{image.height}", tiles, int(runs[0]["prompt_tokens"]),
                            median["ttft_s"], median["preprocess_s"], median["queue_s"], median["vit_s"],
                            median["prefill_s"], median["first_token_s"], int(runs[0]["steps"]), runs))
    bar.close()
    return rows


def stall_summary(row: StallRow) -> dict[str, Any]:
    summary = dataclasses.asdict(row)
    summary.update(itl_before_p50_s=percentile(row.itl_before, 0.5), itl_during_p50_s=percentile(row.itl_during, 0.5),
                   itl_during_p99_s=percentile(row.itl_during, 0.99),
                   itl_during_max_s=max(row.itl_during) if row.itl_during else float("nan"))
    return summary


def tiles_table(rows: list[TileRow]) -> str:
    lines = ["| max_tiles | grid | tiles | prompt tokens | TTFT ms | preprocess | queue | ViT | prefill | first token |"
             " steps |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms = [f"{value * 1e3:.1f}" for value in (r.ttft_s, r.preprocess_s, r.queue_s, r.vit_s, r.prefill_s,
                                                 r.first_token_s)]
        lines.append(f"| {r.requested_tiles} | {r.grid} | {r.tiles} | {r.prompt_tokens} | {' | '.join(ms)} | "
                     f"{r.steps} |")
    return "\n".join(lines)


def plot(tile_rows: list[TileRow], stall_rows: list[StallRow], stem: Path) -> list[str]:
    """<stem>_ttft.png (stacked bars) and <stem>_itl.png (lines); [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    if tile_rows:
        figure, axes = plt.subplots(figsize=(8, 4.5))
        labels = [str(r.tiles) for r in tile_rows]
        bottom = [0.0] * len(tile_rows)
        for part in TTFT_PARTS:
            values = [getattr(r, part) * 1e3 for r in tile_rows]
            axes.bar(labels, values, bottom=bottom, label=PART_LABELS[part])
            bottom = [b + v for b, v in zip(bottom, values)]
        axes.set(xlabel="tiles (thumbnail included)", ylabel="ms", title="time to first token of one image, by stage")
        axes.legend()
        figure.tight_layout()
        path = f"{stem}_ttft.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    if stall_rows:
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        budgets = [r.budget for r in stall_rows]
        for label, q in (("p50", 0.5), ("p99", 0.99)):
            left.plot(budgets, [percentile(r.itl_during, q) * 1e3 for r in stall_rows], marker="o",
                      label=f"{label} while encoding")
        left.plot(budgets, [(max(r.itl_during) if r.itl_during else float("nan")) * 1e3 for r in stall_rows],
                  marker="o", label="max while encoding")
        left.plot(budgets, [percentile(r.itl_before, 0.5) * 1e3 for r in stall_rows], marker="o", linestyle="--",
                  label="p50 before")
        left.set(xscale="log", xlabel="max_vit_tiles_per_step", ylabel="ms",
                 title="text streams' inter-token latency")
        left.set_xticks(budgets, [str(b) for b in budgets])
        left.minorticks_off()
        left.legend()
        right.plot(budgets, [r.ttft_s * 1e3 for r in stall_rows], marker="o", label="TTFT")
        right.plot(budgets, [r.vit_s * 1e3 for r in stall_rows], marker="o", label="of which ViT")
        right.set(xscale="log", xlabel="max_vit_tiles_per_step", ylabel="ms",
                  title=f"the {stall_rows[0].tiles}-tile request")
        right.set_xticks(budgets, [str(b) for b in budgets])
        right.minorticks_off()
        right.legend()
        figure.tight_layout()
        path = f"{stem}_itl.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written


def build_parser() -> argparse.ArgumentParser:
    from internvl_engine.config import MODEL_PRESETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=HelpWithDefaults)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the tiny demo checkpoint)")
    parser.add_argument("--preset", default=None, choices=MODEL_PRESETS)
    parser.add_argument("--random-weights", action="store_true", help="with --preset: real shapes, random weights")
    parser.add_argument("--tokenizer", default=None, help="with --preset: a folder with tokenizer files")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--tiles", type=int_list, default=[1, 2, 4, 6, 12, 24, 40],
                        help="max_tiles of part 1; '' skips it")
    parser.add_argument("--image", default=None, help="part 1 on this image instead of synthetic exact grids")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tile count (medians reported)")
    parser.add_argument("--budgets", type=int_list, default=[1, 2, 4, 8, 16, 48],
                        help="max_vit_tiles_per_step values of part 2; '' skips it")
    parser.add_argument("--streams", type=int, default=8, help="decoding text streams in part 2")
    parser.add_argument("--stall-tiles", type=int, default=40, help="max_tiles of part 2's image (exact grid)")
    parser.add_argument("--warm-steps", type=int, default=16, help="part 2: decode steps before the image arrives")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-vit-tiles-per-step", type=int, default=8, help="part 1's ViT budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=default_output("bench_tiles.json"),
                        help="JSON file; the PNGs go beside it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return parser


def build_llm(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    from internvl_engine import LLM

    options = dict(max_num_batched_tokens=args.max_num_batched_tokens,
                   max_vit_tiles_per_step=args.max_vit_tiles_per_step,
                   max_tiles_per_image=max(args.tiles + [args.stall_tiles, 1]), max_num_seqs=max(64, args.streams + 1))
    if args.preset:
        if not args.random_weights:
            parser.error("--preset needs --random-weights (or pass --model with a real checkpoint)")
        from internvl_engine.testing.checkpoint_builder import ensure_tiny_tokenizer

        return LLM(None, dtype=args.dtype, device=args.device, preset=args.preset,
                   tokenizer=args.tokenizer or ensure_tiny_tokenizer(preset=args.preset),
                   progress=not args.no_progress, **options)
    from internvl_engine.testing.checkpoint_builder import ensure_tiny_checkpoint

    return LLM(args.model or ensure_tiny_checkpoint("internvl-chat-v1-5", seed=0), dtype=args.dtype,
               device=args.device, progress=not args.no_progress, **options)


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.streams < 1 or args.stall_tiles < 1:
        parser.error("--repeats, --streams and --stall-tiles must be positive")
    output = prepare_output(args.output)
    started = time.perf_counter()
    llm = build_llm(args, parser)
    device = llm.runner.device
    print(f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"dtype {llm.model.dtype}, load {time.perf_counter() - started:.1f} s", flush=True)
    progress = not args.no_progress
    tile_rows = ttft_by_tiles(llm, args.tiles, args.repeats, args.image, args.seed, progress) if args.tiles else []
    if tile_rows:
        print("TTFT by tiles (requested max_tiles -> real tiles: " +
              ", ".join(f"{r.requested_tiles} -> {r.tiles} ({r.grid})" for r in tile_rows) + ")")
        print(tiles_table(tile_rows))
    stall_rows: list[StallRow] = []
    if args.budgets:
        stall_image = (lambda index: image_for(args.stall_tiles, seed=args.seed * 1000 + 500 + index))
        print(f"ITL by ViT budget: {args.streams} text streams, then one image of "
              f"{real_tiles(llm, stall_image(0), args.stall_tiles)[0]} tiles")
        stall_rows = run_study(llm, args.budgets, stall_image, args.stall_tiles, num_streams=args.streams,
                               warm_steps=args.warm_steps, progress=progress)
        print(table(stall_rows))
    document = {
        "meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
                 "device": str(device), "device_name": torch.cuda.get_device_name(device)
                 if device.type == "cuda" else platform.processor() or platform.machine(),
                 "dtype": str(llm.model.dtype), "torch": torch.__version__,
                 "model": args.model or (f"{args.preset} (random weights)" if args.preset else "tiny demo checkpoint"),
                 "max_vit_tiles_per_step": args.max_vit_tiles_per_step, "repeats": args.repeats,
                 "streams": args.streams},
        "ttft_by_tiles": [dataclasses.asdict(row) for row in tile_rows],
        "itl_by_vit_budget": [stall_summary(row) for row in stall_rows],
    }
    output.write_text(json.dumps(document, indent=1))
    pictures = plot(tile_rows, stall_rows, output.with_suffix(""))
    print(f"results: {output}" + "".join(f"\nplot: {path}" for path in pictures) +
          ("" if pictures else "\nplots: matplotlib not installed (pip install 'internvl-engine[bench]')"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
