"""Host cost of one decode step: `schedule()` + `build_batch()` + `update()` (CPU only, no model).

256 running sequences with 1K-4K tokens of context (one image each, as InternVL prompts carry) decode one
token per step. What is timed is everything the engine does on the host between two forward passes except
the tensor copies: the schedule, the flat batch metadata (token ids, positions, slot mapping, block tables)
and the bookkeeping after sampling. At a 12.9 ms decode floor, 1 ms of host work would already cost ~8%.

    python benchmarks/bench_scheduler.py [--num-seqs 256] [--steps 1000] [--block-size 16] [--no-progress]

tqdm bars on stderr follow the prefill and the timed steps (updated outside the timed part of a step).
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from pathlib import Path

from tqdm.auto import tqdm

if __package__ in (None, ""):  # run as a script from a checkout that is not pip-installed
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from internvl_engine.engine.batch_builder import build_batch  # noqa: E402
from internvl_engine.engine.block_manager import BlockManager  # noqa: E402
from internvl_engine.engine.request import ImageSpan, Request  # noqa: E402
from internvl_engine.engine.scheduler import Scheduler, SchedulerConfig  # noqa: E402

IMAGE_TOKEN = 92546  # <IMG_CONTEXT> in InternLM2's vocabulary


def build(args: argparse.Namespace, progress: bool = False) -> tuple[Scheduler, list[Request]]:
    rng = random.Random(args.seed)
    # Prompts are drawn so that every context stays within [min_context, max_context] for the whole run.
    if args.max_context - args.steps <= args.min_context:
        raise SystemExit("--max-context - --steps must exceed --min-context")
    max_context = args.max_context + 64
    num_blocks = args.num_seqs * (-(-max_context // args.block_size))
    config = SchedulerConfig(max_num_seqs=args.num_seqs, max_num_batched_tokens=65536, max_vit_tiles_per_step=10_000,
                             max_model_len=max_context + 1, max_waiting=args.num_seqs, block_size=args.block_size)
    held: set[str] = set()
    scheduler = Scheduler(config, BlockManager(num_blocks, args.block_size),
                          lambda request, image, first: image.num_tiles - first if image.content_hash in held else 0)
    requests = []
    for index in range(args.num_seqs):
        length = rng.randrange(args.min_context, args.max_context - args.steps + 1)
        tiles = rng.randrange(1, 4)  # 256 tokens per tile
        prompt = [rng.randrange(1000, 90000) for _ in range(length)]
        prompt[16:16 + 256 * tiles] = [IMAGE_TOKEN] * (256 * tiles)
        image = ImageSpan(16, 256 * tiles, tiles, f"image-{index}")
        request = Request(f"request-{index}", prompt[:length], max_context - length, images=[image])
        scheduler.add_request(request)
        requests.append(request)
    with tqdm(total=len(requests), desc="prefill", unit="seq", disable=not progress) as bar:
        while True:  # prefill, until every request is decoding
            prefilled = sum(request.num_computed_tokens >= request.num_tokens - 1 for request in requests)
            bar.update(prefilled - bar.n)
            if prefilled == len(requests):
                break
            output = scheduler.schedule()
            held.update(tile_slice.image.content_hash for tile_slice in output.tiles_to_encode)
            features = {c.request.request_id: {image.content_hash: range(image.num_tokens)
                                               for image in c.request.images}
                        for c in output.chunks}  # stand-ins: the prefill only needs something to slice
            batch = build_batch(output.chunks, args.block_size, features)
            scheduler.update(output, {request_id: 13 for request_id in batch.logit_request_ids}, set())
    return scheduler, requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--min-context", type=int, default=1024)
    parser.add_argument("--max-context", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    args = parser.parse_args()

    scheduler, requests = build(args, progress=not args.no_progress)
    assert scheduler.num_running == args.num_seqs
    stop_token_ids = {2, 92542}  # </s>, <|im_end|>
    totals, schedules, prepares, updates = [], [], [], []
    for step in tqdm(range(args.steps), desc="decode steps", unit="step", disable=args.no_progress):
        token = 1000 + step % 50_000
        start = time.perf_counter_ns()
        output = scheduler.schedule()
        scheduled = time.perf_counter_ns()
        batch = build_batch(output.chunks, args.block_size)
        prepared = time.perf_counter_ns()
        sampled = {request_id: token for request_id in batch.logit_request_ids}
        scheduler.update(output, sampled, stop_token_ids)
        done = time.perf_counter_ns()
        assert len(output.chunks) == args.num_seqs and output.num_batched_tokens == args.num_seqs
        totals.append((done - start) / 1000)
        schedules.append((scheduled - start) / 1000)
        prepares.append((prepared - scheduled) / 1000)
        updates.append((done - prepared) / 1000)

    contexts = [request.num_tokens for request in requests]
    totals.sort()
    print(f"python {platform.python_version()} on {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; {args.num_seqs} decoding sequences, contexts "
          f"{min(contexts) - args.steps}-{max(contexts)} tokens, block size {args.block_size}, {args.steps} steps")
    print(f"per step (µs): mean {statistics.mean(totals):.0f}  median {statistics.median(totals):.0f}  "
          f"p99 {totals[int(0.99 * (len(totals) - 1))]:.0f}  max {totals[-1]:.0f}")
    print(f"  schedule {statistics.mean(schedules):.0f}  build_batch {statistics.mean(prepares):.0f}  "
          f"update {statistics.mean(updates):.0f}  (means, µs)")


if __name__ == "__main__":
    main()
