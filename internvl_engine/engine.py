"""`LLM`: continuous batching over a paged KV cache for tile-heavy InternVL requests.

Each step is schedule -> execute -> update. The scheduler (plain Python) grants a token budget and a separate
ViT tile budget; the engine encodes the granted images (batched along the tile axis, cached by content hash),
runs one flattened forward for all scheduled chunks (decodes and prefill chunks together), samples each
finished position with that request's own parameters, and hands the tokens back to the scheduler.
"""
from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer, find_stop, truncate_at_stop
from .engine_inputs import process_request
from .feature_cache import FeatureCache
from .hf_compat import AutoModel, AutoTokenizer, PromptTooLongError
from .image_processor import DEFAULT_MAX_PIXELS
from .model_runner import ModelRunner
from .prompt import get_template
from .request import FinishReason, ImageSpan, Request
from .sampling_params import SamplingParams, make_generator, sample_batch
from .scheduler import Scheduler, SchedulerConfig


@dataclass
class RequestMetrics:
    arrival_time: float
    queue_time: float | None = None  # arrival -> first scheduled
    vit_time: float = 0.0  # seconds of ViT steps that encoded this request's images
    time_to_first_token: float | None = None
    time_per_output_token: float | None = None
    finished_time: float | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    metrics: RequestMetrics | None = None
    finished: bool = True
    num_image_tiles: int = 0  # tiles of all the request's images (256 visual tokens each)


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_bytes: int | None = None  # None: kv_cache_fraction of free device memory (CUDA) or 1 GiB (CPU)
    kv_cache_fraction: float = 0.5
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    max_vit_tiles_per_step: int = 48
    max_model_len: int | None = None
    max_waiting: int = 4096
    max_tiles_per_image: int = 40
    feature_cache_bytes: int = 1 << 30
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS
    enable_prefix_caching: bool = True
    backend: str = "auto"
    static_decode: bool | None = None  # decode steps on static buffers + CUDA graphs; None: on CUDA only


@dataclass
class _Live:
    """Engine-side state of one request beside the scheduler's `Request`."""

    params: SamplingParams
    generator: torch.Generator | None
    pixel_values: dict[str, torch.Tensor]
    detokenizer: IncrementalDetokenizer
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.perf_counter()))


@dataclass
class PreparedRequest:
    """A validated, tokenised request with its tiles: what `LLM.prepare` builds and `LLM.submit` queues."""

    request: Request
    live: _Live

    @property
    def request_id(self) -> str:
        return self.request.request_id


class LLM:
    """`LLM(model_path, dtype=..., device=..., **engine options)`; `generate(requests, sampling_params)`."""

    def __init__(self, model_path: str | Path | None, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None, preset: str | None = None, seed: int = 0,
                 **options: Any) -> None:
        """model_path: an official checkpoint folder; or None with `preset` for the real shapes with random
        weights built on the device (benchmarks; the tokenizer is then the tiny demo one)."""
        self.config = EngineConfig(**options)
        device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if preset is not None:
            from .checkpoint_builder import ensure_tiny_checkpoint
            from .loader import find_token_id, resolve_dtype
            from .presets import build_random_model

            tokenizer_path = ensure_tiny_checkpoint("internvl-chat-v1-5", seed=0)
            self.model = build_random_model(preset, resolve_dtype(dtype), device, seed)
            self.model.img_context_token_id = find_token_id(tokenizer_path, "<IMG_CONTEXT>")
            self.model.set_backend(self.config.backend)
        elif model_path is None:
            raise ValueError("LLM needs a checkpoint path, or preset=... for random weights")
        else:
            self.model = AutoModel.from_pretrained(model_path, torch_dtype=dtype, device=device,
                                                   backend=self.config.backend)
            tokenizer_path = model_path
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.template = get_template(self.model.template or "internlm2-chat")
        self.stop_token_ids = {self.tokenizer.convert_tokens_to_ids(self.template.stop_token),
                               self.tokenizer.eos_token_id}
        max_model_len = self.config.max_model_len or self.model.max_context_length
        self.runner = ModelRunner(self.model, self.config.block_size, self.config.kv_cache_bytes,
                                  self.config.kv_cache_fraction, max_model_len, self.config.max_num_seqs,
                                  self.config.static_decode)
        self.block_manager = BlockManager(self.runner.num_blocks, self.config.block_size,
                                          enable_prefix_caching=self.config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=self.config.max_num_seqs, max_num_batched_tokens=self.config.max_num_batched_tokens,
            max_vit_tiles_per_step=self.config.max_vit_tiles_per_step, max_model_len=max_model_len,
            max_waiting=self.config.max_waiting, block_size=self.config.block_size),
            self.block_manager, self._needs_encoding)
        self.feature_cache = FeatureCache(self.config.feature_cache_bytes)
        self._live: dict[str, _Live] = {}
        self._requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.last_step_sampled: list[str] = []  # request ids that got a token in the last step (streaming)
        # Seconds and counts by stage, for benchmarks (bench_offline.py prints their shares).
        self.stats = {"preprocess_s": 0.0, "vit_s": 0.0, "prefill_step_s": 0.0, "decode_step_s": 0.0,
                      "tiles_encoded": 0, "steps": 0}

    # ---- requests in ----
    def add_request(self, request: Mapping[str, Any] | str, sampling_params: SamplingParams | None = None,
                    request_id: str | None = None) -> str | RequestOutput:
        """Queue one request; returns its id, or a finished RequestOutput with an error if it is invalid."""
        request_id = request_id or str(next(self._ids))
        try:
            return self.submit(self.prepare(request, sampling_params, request_id))
        except (ValueError, OSError, RuntimeError) as err:
            return RequestOutput(request_id, "", [], FinishReason.ERROR.value, error=str(err),
                                 metrics=RequestMetrics(time.perf_counter()))

    def prepare(self, request: Mapping[str, Any] | str, sampling_params: SamplingParams | None = None,
                request_id: str | None = None) -> PreparedRequest:
        """Validate, tokenise and tile one request without touching the scheduler (safe from any thread).

        Raises ValueError naming the problem: ImageLoadError (ImageTooLargeError) for images,
        PromptTooLongError when the prompt and max_tokens do not fit max_model_len.
        """
        request_id = request_id or str(next(self._ids))
        params = sampling_params or SamplingParams()
        arrival = time.perf_counter()
        max_tiles = request.get("max_tiles") if isinstance(request, Mapping) else None
        if max_tiles is not None and not (isinstance(max_tiles, int) and not isinstance(max_tiles, bool)
                                          and 1 <= max_tiles <= self.config.max_tiles_per_image):
            raise ValueError(f"max_tiles must be an integer between 1 and {self.config.max_tiles_per_image}, "
                             f"got {max_tiles!r}")
        processed = process_request(request, self.tokenizer, self.model.config, self.template.name,
                                    self.model._system_message(), self.config.max_image_pixels)
        num_prompt, max_model_len = len(processed.prompt_token_ids), self.scheduler.config.max_model_len
        if params.max_tokens is not None:
            max_tokens = params.max_tokens
        else:  # up to the context length, or to what the whole KV cache can hold
            capacity = self.block_manager.num_blocks * self.block_manager.block_size + 1
            max_tokens = min(max_model_len, capacity) - num_prompt
        if num_prompt + max(max_tokens, 1) > max_model_len:
            wanted = f" + max_tokens ({max_tokens})" if params.max_tokens is not None else " + 1 output token"
            raise PromptTooLongError(f"the prompt ({num_prompt} tokens, images included){wanted} exceeds the "
                                     f"context length (max_model_len {max_model_len})")
        state = Request(request_id, processed.prompt_token_ids, max_tokens, processed.images, arrival_time=arrival,
                        stop_token_ids=self._stops(params))
        self.block_manager.check_fits(state)
        live = _Live(params, make_generator(params, self.runner.device), processed.pixel_values,
                     IncrementalDetokenizer(self.tokenizer), metrics=RequestMetrics(arrival))
        self.stats["preprocess_s"] += time.perf_counter() - arrival
        return PreparedRequest(state, live)

    def submit(self, prepared: PreparedRequest) -> str:
        """Queue a prepared request (the engine's thread); raises ValueError or QueueFullError."""
        request_id = prepared.request_id
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.scheduler.add_request(prepared.request)
        self._requests[request_id] = prepared.request
        self._live[request_id] = prepared.live
        return request_id

    def _stops(self, params: SamplingParams) -> frozenset[int]:
        stops = set() if params.ignore_eos else set(self.stop_token_ids)
        return frozenset(stops | set(params.stop_token_ids))

    def abort(self, request_id: str) -> None:
        request = self.scheduler.abort(request_id)
        if request is not None:
            self._live.pop(request_id, None)
            self._requests.pop(request_id, None)

    def _needs_encoding(self, request: Request, image: ImageSpan) -> bool:
        live = self._live[request.request_id]
        if image.content_hash in live.features:
            return False
        cached = self.feature_cache.get(image.content_hash)
        if cached is not None:
            live.features[image.content_hash] = cached
            return False
        return True

    # ---- one step ----
    def step(self) -> list[RequestOutput]:
        """Schedule, encode images, run one forward, sample, update; returns the requests finished now."""
        output = self.scheduler.schedule()
        now = time.perf_counter()
        for chunk in output.chunks:
            metrics = self._live[chunk.request.request_id].metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
                metrics.queue_time = now - metrics.arrival_time
        if output.images_to_encode:
            self._encode(output.images_to_encode)
        if not output.chunks:
            return []
        forward_start = time.perf_counter()
        features = {c.request.request_id: self._live[c.request.request_id].features for c in output.chunks}
        sampled_ids, logits = self.runner.execute(output, features)
        sampled = self._sample([self._requests[rid] for rid in sampled_ids], logits)
        self.last_step_sampled = list(sampled)
        finished = self.scheduler.update(output, sampled, self.stop_token_ids)
        finished += self._stop_strings(sampled, finished)
        now = time.perf_counter()
        decode_only = all(c.num_new_tokens == 1 for c in output.chunks)
        self.stats["decode_step_s" if decode_only else "prefill_step_s"] += now - forward_start
        self.stats["steps"] += 1
        for request_id in sampled_ids:
            metrics = self._live[request_id].metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
                metrics.time_to_first_token = now - metrics.arrival_time
        return [self._finish(request) for request in finished]

    def _stop_strings(self, sampled: Mapping[str, int], finished: Sequence[Request]) -> list[Request]:
        """Ends the sampled requests whose text now contains one of their stop strings."""
        done = {request.request_id for request in finished}
        stopped = []
        for request_id in sampled:
            live = self._live[request_id]
            if not live.params.stop or request_id in done:
                continue
            request = self._requests[request_id]
            start = len(live.detokenizer.text)
            new_text = live.detokenizer.update(request.output_token_ids)
            longest = max(len(stop) for stop in live.params.stop)
            if new_text and find_stop(live.detokenizer.text, live.params.stop, max(start - longest + 1, 0)) >= 0:
                self.scheduler.finish(request, FinishReason.STOP)
                stopped.append(request)
        return stopped

    def fail_all(self, error: str) -> list[RequestOutput]:
        """Ends every unfinished request with `error` (a step raised), freeing its blocks."""
        requests = list(self.scheduler.running) + list(self.scheduler.waiting)
        for request in requests:
            self.scheduler.finish(request, FinishReason.ERROR, error)
        return [self._finish(request) for request in requests]

    def _encode(self, images: Sequence[tuple[Request, ImageSpan]]) -> None:
        """All granted images in one ViT batch along the tile axis; features cached by content hash."""
        start = time.perf_counter()
        unique: dict[str, torch.Tensor] = {}
        for request, image in images:
            unique.setdefault(image.content_hash, self._live[request.request_id].pixel_values[image.content_hash])
        pixel_values = torch.cat(list(unique.values()))
        with torch.inference_mode():
            features = self.model.extract_feature(pixel_values)  # [tiles, 256, hidden]
        offset = 0
        for key, pixels in unique.items():
            tiles = pixels.shape[0]
            encoded = features[offset: offset + tiles].reshape(-1, features.shape[-1])
            offset += tiles
            self.feature_cache.put(key, encoded)
            for request, image in images:
                if image.content_hash == key:
                    live = self._live[request.request_id]
                    live.features[key] = encoded  # pinned until the request finishes (survives preemption)
                    live.pixel_values.pop(key, None)  # the tiles are no longer needed
        elapsed = time.perf_counter() - start
        self.stats["vit_s"] += elapsed
        self.stats["tiles_encoded"] += pixel_values.shape[0]
        for request, _ in images:
            self._live[request.request_id].metrics.vit_time += elapsed

    def _sample(self, requests: Sequence[Request], logits: torch.Tensor) -> dict[str, int]:
        if not requests:
            return {}
        params = [self._live[r.request_id].params for r in requests]
        histories = [r.all_token_ids if p.repetition_penalty != 1.0 else [] for r, p in zip(requests, params)]
        generators = [self._live[r.request_id].generator for r in requests]
        tokens = sample_batch(logits, params, histories, generators)
        return {r.request_id: token for r, token in zip(requests, tokens)}

    def snapshot(self, request_id: str) -> RequestOutput:
        """A running request's output so far (finished=False), for streaming."""
        request, live = self._requests[request_id], self._live[request_id]
        live.detokenizer.update(request.output_token_ids)
        return RequestOutput(request_id, live.detokenizer.text, list(request.output_token_ids), None,
                             num_prompt_tokens=request.num_prompt_tokens, metrics=live.metrics, finished=False,
                             num_image_tiles=request.num_image_tiles)

    def _finish(self, request: Request) -> RequestOutput:
        live = self._live.pop(request.request_id)
        self._requests.pop(request.request_id, None)
        metrics = live.metrics
        metrics.finished_time = time.perf_counter()
        outputs = len(request.output_token_ids)
        if outputs > 1 and metrics.first_token_time is not None:
            metrics.time_per_output_token = (metrics.finished_time - metrics.first_token_time) / (outputs - 1)
        decodable = [t for t in request.output_token_ids if t < len(self.tokenizer)]  # random-weight presets
        text = self.tokenizer.decode(decodable, skip_special_tokens=True)
        text, stopped = truncate_at_stop(text.split(self.template.stop_token)[0], live.params.stop)
        reason = FinishReason.STOP if stopped else request.finish_reason
        return RequestOutput(request.request_id, text.strip(), list(request.output_token_ids),
                             reason.value if reason else None, error=request.error,
                             num_prompt_tokens=request.num_prompt_tokens, num_cached_tokens=request.num_cached_tokens,
                             num_preemptions=request.num_preemptions, metrics=metrics,
                             num_image_tiles=request.num_image_tiles)

    # ---- offline API ----
    def generate(self, requests: Iterable[Mapping[str, Any] | str],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Run every request to completion; outputs in input order (errors included, in place)."""
        requests = list(requests)
        if isinstance(sampling_params, Sequence) and not isinstance(sampling_params, SamplingParams):
            if len(sampling_params) != len(requests):
                raise ValueError(f"{len(sampling_params)} sampling params for {len(requests)} requests")
            per_request = list(sampling_params)
        else:
            per_request = [sampling_params or SamplingParams()] * len(requests)
        results: dict[str, RequestOutput] = {}
        order = []
        for request, params in zip(requests, per_request):
            handle = self.add_request(request, params)
            if isinstance(handle, RequestOutput):
                results[handle.request_id] = handle
                order.append(handle.request_id)
            else:
                order.append(handle)
        show = use_tqdm if use_tqdm is not None else len(requests) >= 16
        while self.scheduler.has_unfinished():
            for finished in self.step():
                results[finished.request_id] = finished
            if show:
                sys.stderr.write(f"\rrequests finished: {len(results)}/{len(order)}")
        if show:
            sys.stderr.write("\n")
        return [results[request_id] for request_id in order]
