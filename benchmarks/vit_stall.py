"""The 4K-image study of `bench_offline.py --vit-budgets 4,8,16,48`: what one 41-tile request costs itself (TTFT
split into preprocessing, queueing, ViT and prefill + first token) and what it costs the decoding streams beside
it (their inter-token latency while it is encoded), for each ViT tile budget per step.

Per budget, on one engine (the budget is the scheduler's `max_vit_tiles_per_step`, set between runs): N text
streams are started and brought to decoding, then the 4K request arrives; steps run until its first token. The
streams' inter-token latencies are taken from the wall time after each step in which they got a token:
"before" over the steps preceding the arrival, "during" from the arrival to the 4K request's first token.
Images are distinct per run (no feature-cache hit) and prompts too (no prefix-cache hit).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

from PIL import Image
from tqdm.auto import tqdm


@dataclasses.dataclass
class StallRow:
    budget: int
    tiles: int
    ttft_s: float
    preprocess_s: float
    queue_s: float
    vit_s: float
    prefill_s: float  # prefill and the first token: TTFT minus the rest
    vit_steps: int
    itl_before: list[float]
    itl_during: list[float]


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values` by rank; nan when empty."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run_budget(llm: Any, budget: int, image: Image.Image, max_tiles: int, num_streams: int, warm_steps: int,
               tag: str) -> StallRow:
    from internvl_engine import SamplingParams

    llm.scheduler.config = dataclasses.replace(llm.scheduler.config, max_vit_tiles_per_step=budget)
    long_story = SamplingParams(max_tokens=min(4096, llm.scheduler.config.max_model_len // 2), temperature=0.0,
                                ignore_eos=True)
    streams = [llm.add_request(f"[{tag}] Stream {i}: tell me a long story.", long_story) for i in range(num_streams)]
    last_token_time: dict[str, float] = {}

    def step(itl: list[float]) -> dict[str, Any]:
        """One engine step; the streams that got a token add their inter-token latency to `itl`."""
        counts = {rid: len(llm._requests[rid].output_token_ids) for rid in streams if rid in llm._requests}
        finished = {output.request_id: output for output in llm.step()}
        now = time.perf_counter()
        for rid, count in counts.items():
            if rid in llm._requests and len(llm._requests[rid].output_token_ids) > count:
                if rid in last_token_time:
                    itl.append(now - last_token_time[rid])
                last_token_time[rid] = now
        return finished

    while any(not llm._requests[rid].output_token_ids for rid in streams):  # every stream decoding
        step([])
    before: list[float] = []
    for _ in range(warm_steps):
        step(before)
    start = time.perf_counter()
    request_id = llm.add_request({"prompt": f"[{tag}] <image>\nDescribe this image in detail.", "images": [image],
                                  "max_tiles": max_tiles}, SamplingParams(max_tokens=1, temperature=0.0))
    preprocess = time.perf_counter() - start
    if not isinstance(request_id, str):
        raise RuntimeError(f"the 4K request was refused: {request_id.error}")
    tiles = llm._requests[request_id].num_image_tiles
    during: list[float] = []
    vit_steps, output = 0, None
    while output is None:
        encoded = llm.stats["tiles_encoded"]
        output = step(during).get(request_id)
        vit_steps += llm.stats["tiles_encoded"] > encoded
    for rid in streams:
        llm.abort(rid)
    metrics = output.metrics
    queue = max((metrics.queue_time or 0.0) - preprocess, 0.0)  # arrival is taken when preprocessing starts
    prefill = metrics.time_to_first_token - preprocess - queue - metrics.vit_time
    return StallRow(budget, tiles, metrics.time_to_first_token, preprocess, queue, metrics.vit_time, prefill,
                    vit_steps, before, during)


def run_study(llm: Any, budgets: list[int], make_image: Callable[[int], Image.Image], max_tiles: int,
              num_streams: int = 8, warm_steps: int = 16, progress: bool = False) -> list[StallRow]:
    """One row per budget, in order; progress: a tqdm bar on stderr over the budgets."""
    rows = []
    for index, budget in enumerate(tqdm(budgets, desc="ViT budgets", unit="budget", disable=not progress)):
        rows.append(run_budget(llm, budget, make_image(index), max_tiles, num_streams, warm_steps, f"run {index}"))
    return rows


def table(rows: list[StallRow]) -> str:
    lines = ["| ViT tiles/step | tiles | TTFT ms | preprocess | queue | ViT | prefill + 1st token | ViT steps | "
             "stream ITL before p50 | during p50 | during p99 | during max |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
        lines.append(f"| {r.budget} | {r.tiles} | {ms(r.ttft_s)} | {ms(r.preprocess_s)} | {ms(r.queue_s)} | "
                     f"{ms(r.vit_s)} | {ms(r.prefill_s)} | {r.vit_steps} | "
                     f"{ms(statistics.median(r.itl_before)) if r.itl_before else 'n/a'} | "
                     f"{ms(percentile(r.itl_during, 0.5))} | {ms(percentile(r.itl_during, 0.99))} | "
                     f"{ms(max(r.itl_during)) if r.itl_during else 'n/a'} |")
    return "\n".join(lines)


def plot(rows: list[StallRow], path: str) -> str | None:
    """TTFT split (stacked bars) and the streams' ITL while the image is encoded, per budget, written to `path`
    (its folder must exist; bench_offline passes benchmarks/results/vit_stall.png by default); None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [str(r.budget) for r in rows]
    bottom = [0.0] * len(rows)
    for name in ("preprocess_s", "queue_s", "vit_s", "prefill_s"):
        values = [getattr(r, name) * 1e3 for r in rows]
        left.bar(labels, values, bottom=bottom, label=name[:-2])
        bottom = [b + v for b, v in zip(bottom, values)]
    left.set(xlabel="ViT tiles per step", ylabel="ms", title=f"TTFT of one {rows[0].tiles}-tile request")
    left.legend()
    right.boxplot([[v * 1e3 for v in r.itl_during] or [float("nan")] for r in rows], whis=(1, 99))
    right.set_xticks(range(1, len(rows) + 1), labels)
    right.set(xlabel="ViT tiles per step", ylabel="ms", title="stream inter-token latency while it is encoded")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path
