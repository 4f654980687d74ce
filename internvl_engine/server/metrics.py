"""Prometheus metrics of one server (its own registry: no global state).

Counters are updated as requests finish; gauges (queue, running sequences, KV cache) are read from the
engine when /metrics is scraped.
"""
from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

from ..engine.async_llm import AsyncLLM

PREFIX = "internvl"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0,
                 2.5)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self, engine: AsyncLLM, model_name: str) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)  # process_resident_memory_bytes, cpu seconds, open fds
        self.http_responses = Counter(f"{PREFIX}_http_responses", "HTTP responses by route and status code",
                                      ["route", "status_code"], registry=registry)
        self.requests = Counter(f"{PREFIX}_requests", "Chat completion requests by outcome (stop, length, abort, "
                                "error, rejected)", ["status"], registry=registry)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests (visual tokens "
                                     "included)", registry=registry)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Generated tokens", registry=registry)
        self.refusals = Counter(f"{PREFIX}_request_refusals", "Requests refused by a work limit (the server flag's "
                                "name, e.g. max_images_per_request)", ["limit"], registry=registry)
        self.image_tiles = Counter(f"{PREFIX}_request_image_tiles", "448x448 tiles in finished requests' images",
                                   registry=registry)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=registry)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds", "Mean time per output token after the first",
                              buckets=_TPOT_BUCKETS, registry=registry)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Arrival to the last token",
                             buckets=_LATENCY_BUCKETS, registry=registry)
        registry.register(_EngineCollector(engine, model_name))

    def observe(self, output: Any) -> None:
        """Account for one finished request (its engine output)."""
        self.requests.labels(status=output.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(output.num_prompt_tokens)
        self.generation_tokens.inc(len(output.token_ids))
        self.image_tiles.inc(output.num_image_tiles)
        metrics = output.metrics
        if metrics is None:
            return
        if metrics.time_to_first_token is not None:
            self.ttft.observe(metrics.time_to_first_token)
        if metrics.time_per_output_token is not None:
            self.tpot.observe(metrics.time_per_output_token)
        if metrics.finished_time is not None:
            self.e2e.observe(metrics.finished_time - metrics.arrival_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Engine state read at scrape time."""

    def __init__(self, engine: AsyncLLM, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name

    def collect(self):
        engine, llm = self.engine, self.engine.llm
        blocks = llm.block_manager
        gauges = {
            "num_requests_waiting": ("Requests waiting to be scheduled", engine.num_waiting),
            "num_requests_running": ("Sequences running (prefill or decode)", engine.num_running),
            "num_requests_unfinished": ("Requests the server is answering", engine.num_unfinished),
            "kv_cache_usage_ratio": ("Fraction of KV blocks referenced by requests", blocks.usage),
            "kv_cache_blocks_in_use": ("KV blocks referenced by requests (free prefix-cached blocks excluded)",
                                       blocks.num_blocks - blocks.num_free_blocks),
            "kv_cache_blocks_total": ("KV blocks in the cache", blocks.num_blocks),
            "num_requests_preprocessing": ("Requests queued for or in the preprocessing pool (image decoding, tiling)",
                                           engine.num_preprocessing),
            "decode_graph_buckets_disabled": ("Decode batch-size buckets whose CUDA graph failed to capture or "
                                              "disagreed with the eager step, so they run eagerly (the log says why)",
                                              len(_disabled_buckets(llm))),
        }
        for name, (documentation, value) in gauges.items():
            family = GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family
        counters = {
            "vit_tiles_encoded": ("Tiles the vision encoder encoded (feature-cache hits excluded)",
                                  llm.stats["tiles_encoded"]),
            "engine_steps": ("Engine steps run", llm.stats["steps"]),
            "engine_step_errors": ("Engine steps whose scheduler raised (every request in flight failed)",
                                   engine.num_step_errors),
            "preemptions": ("Requests preempted (KV blocks freed, recomputed later)", llm.scheduler.num_preemptions),
        }
        for name, (documentation, value) in counters.items():
            family = CounterMetricFamily(f"{PREFIX}_{name}", documentation, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family
        family = CounterMetricFamily(f"{PREFIX}_request_errors", "Requests failed alone by an engine step, by cause "
                                     "(vit, forward, sampling; engine: the whole step failed)",
                                     labels=["model_name", "cause"])
        for cause in ("vit", "forward", "sampling", "engine"):
            family.add_metric([self.model_name, cause], llm.stats["request_errors"].get(cause, 0))
        yield family


def _disabled_buckets(llm: Any) -> dict[int, str]:
    """The engine's decode buckets left eager (none without static decode, or a runner without graphs)."""
    graphs = getattr(llm.runner, "decode_graphs", None)
    return {} if graphs is None else graphs.disabled_buckets
