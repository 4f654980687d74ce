"""`LLM`: continuous batching over a paged KV cache for tile-heavy InternVL requests.

Each step is schedule -> execute -> update. The scheduler (plain Python) grants a token budget and a separate
ViT tile budget; the engine encodes the granted images (batched along the tile axis, cached by content hash),
runs one flattened forward for all scheduled chunks (decodes and prefill chunks together), samples each
finished position with that request's own parameters, and hands the tokens back to the scheduler.

Every generation in this package goes through here: `model.chat`/`batch_chat` (compat/) and the HTTP server
submit requests to an `LLM` too.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..devices import resolve_device
from ..models.internvl_chat import InternVLChatModel
from ..models.loader import load_model, resolve_dtype
from ..preprocessing.image_io import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, ImageLimits
from ..preprocessing.video import VideoLimits
from ..text.templates import IMG_CONTEXT_TOKEN, get_template
from ..text.llama_tokenizer import Tokenizer, load_tokenizer
from ..worker.model_runner import ModelRunner
from ..worker.sampler import RowSampling, sample_batch
from .batch_builder import build_batch
from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer
from .errors import PromptTooLongError
from .feature_cache import FeatureCache
from .input_processor import InputLimits, process_request
from .isolation import describe, run_isolating
from .output_processor import final_output, hits_stop_string, partial_output
from .outputs import RequestMetrics, RequestOutput
from .request import FinishReason, ImageSpan, Request
from .request_state import PreparedRequest, RequestState, make_generator
from .sampling_params import SamplingParams
from .scheduler import ScheduledChunk, Scheduler, SchedulerConfig, TileSlice
from .trace import DISABLED, Tracer, trace_step
from .vision_work import VisionWork

logger = logging.getLogger(__name__)

CPU_KV_TEXT_TOKENS = 8192  # text and output tokens the default CPU KV cache leaves beside a max-tile image


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    # None: kv_cache_fraction of free device memory on CUDA; elsewhere one max-tile request (default_cpu_kv_cache_bytes)
    kv_cache_bytes: int | None = None
    kv_cache_fraction: float = 0.5
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    max_vit_tiles_per_step: int = 8  # see SchedulerConfig: ≤ 120 ms of ViT per step on an H100
    max_model_len: int | None = None
    max_waiting: int = 4096
    max_tiles_per_image: int = 40
    feature_cache_bytes: int = 1 << 30
    # Work one request may ask for, refused before it is done (None: no limit); see input_processor.InputLimits.
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS
    max_image_side: int | None = DEFAULT_MAX_SIDE
    max_image_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO
    max_images_per_request: int | None = 16
    max_prompt_chars: int | None = 1 << 20
    # Videos (preprocessing/video.py): bytes, size, duration and frames of one video, frames sampled, videos per request
    max_video_bytes: int | None = VideoLimits.max_bytes
    max_video_duration_s: float | None = VideoLimits.max_duration_s
    max_video_total_frames: int | None = VideoLimits.max_total_frames
    max_video_side: int | None = VideoLimits.max_side
    max_video_pixels: int | None = VideoLimits.max_pixels
    max_video_frames: int | None = VideoLimits.max_frames
    max_videos_per_request: int | None = VideoLimits.max_videos
    enable_prefix_caching: bool = True
    backend: str = "auto"
    static_decode: bool | None = None  # decode steps on static buffers + CUDA graphs; None: on CUDA only
    # Capture every batch bucket's CUDA graph while the engine starts (a tqdm bar); False: each bucket when a step
    # first needs it (a faster start, a slower first step at each batch size). Only with CUDA graphs.
    capture_graphs_at_startup: bool = True
    # Images tiled on the model's device (uint8 upload + kernels.tile_norm) instead of by the preprocessing workers;
    # the same pixels and cache keys either way. None: on with CUDA and the triton backend (see engine/vision_work.py)
    device_preprocessing: bool | None = None
    # max_tokens of a request whose SamplingParams.max_tokens is None (within the context left); None: no cap
    default_max_tokens: int | None = None
    # Chrome trace events of requests and steps (engine/trace.py) to this JSON file, rotated past trace_max_file_bytes
    # into at most trace_max_files files; events wait in a ring of trace_max_events between flushes. None: off.
    trace_path: str | None = None
    trace_max_events: int = 100_000
    trace_max_file_bytes: int = 16 << 20
    trace_max_files: int = 4
    # Ranks of the LLM's tensor parallelism (worker/tensor_parallel_runner.py): N > 1 shards the LLM over N devices
    # (cuda:i .. cuda:i+N-1 from the engine's device, or N CPU processes over gloo) and splits each step's ViT tiles
    # over them; it must divide the LLM's attention and KV heads.
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1):
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}")
        if self.default_max_tokens is not None and not (isinstance(self.default_max_tokens, int)
                                                        and self.default_max_tokens >= 1):
            raise ValueError(f"default_max_tokens must be a positive integer or None, got {self.default_max_tokens!r}")
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction!r}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be positive or None, got {self.kv_cache_bytes!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2 (a prompt token and an output), got "
                             f"{self.max_model_len!r}")


class LLM:
    """`LLM(model_path, dtype=..., device=..., **engine options)`; `generate(requests, sampling_params)`."""

    def __init__(self, model_path: str | Path | None, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None, preset: str | None = None, seed: int = 0,
                 tokenizer: str | Path | Tokenizer | None = None, load_in_8bit: bool = False,
                 progress: bool | None = None, **options: Any) -> None:
        """model_path: an official checkpoint folder; or None with `preset` for the real shapes with random weights
        built on the device (benchmarks), and `tokenizer`, a folder with the tokenizer files to use with them.
        load_in_8bit: int8 Linears (weight-only compute, models/int8.py): a float checkpoint is quantized while it
        loads, a preset is built with int8 weights; an int8 checkpoint is int8 either way.
        progress: tqdm bars while the weights load or are drawn (None: loading shows one for large checkpoints)."""
        config = EngineConfig(**options)
        device = resolve_device(device)  # a bad name, or CUDA where there is none: one line saying what to do
        target = resolve_dtype(dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
        if config.tensor_parallel_size > 1:  # this process is rank 0: it loads its own shard only
            from ..worker.tensor_parallel_runner import load_driver_shard

            if model_path is None and (preset is None or tokenizer is None):
                raise ValueError("LLM needs a checkpoint path, or preset=... with tokenizer=... for random weights")
            model = load_driver_shard(model_path, preset, target, device, seed, load_in_8bit, progress,
                                      config.tensor_parallel_size)
            tokenizer = tokenizer if tokenizer is not None else model_path
        elif preset is not None:
            from ..models.presets import build_random_model

            if tokenizer is None:
                raise ValueError(f"preset={preset!r} has random weights and no tokenizer: pass tokenizer=PATH, a folder "
                                 "with tokenizer.model and the InternVL added tokens (a real checkpoint's, or "
                                 "internvl_engine.testing's tiny one)")
            model = build_random_model(preset, target, device, seed, int8=load_in_8bit, progress=progress is not False)
        elif model_path is None:
            raise ValueError("LLM needs a checkpoint path, or preset=... for random weights")
        else:
            model = load_model(model_path, dtype=target, device=device, load_in_8bit=load_in_8bit, progress=progress)
            tokenizer = tokenizer if tokenizer is not None else model_path
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer)  # InternLM2's or the Llama-style one (Phi-3), as the files say
        self._setup(model, tokenizer, config)

    @classmethod
    def from_model(cls, model: InternVLChatModel, tokenizer: Tokenizer, **options: Any) -> "LLM":
        """An engine over a model already loaded (and placed on its device); its backend is the model's."""
        llm = cls.__new__(cls)
        llm._setup(model, tokenizer, EngineConfig(**{"backend": model.backend, **options}))
        return llm

    def _setup(self, model: InternVLChatModel, tokenizer: Tokenizer, config: EngineConfig) -> None:
        self.config = config
        self.input_limits = InputLimits(
            ImageLimits(config.max_image_pixels, config.max_image_side, config.max_image_aspect_ratio),
            config.max_images_per_request, config.max_prompt_chars,
            VideoLimits(max_bytes=config.max_video_bytes, max_duration_s=config.max_video_duration_s,
                        max_frames=config.max_video_frames, max_total_frames=config.max_video_total_frames,
                        max_side=config.max_video_side, max_pixels=config.max_video_pixels,
                        max_videos=config.max_videos_per_request))
        self.model = model.set_backend(config.backend)
        self.tokenizer = tokenizer
        if model.img_context_token_id is None:
            model.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        self.template = get_template(model.template or "internlm2-chat")
        self.stop_token_ids = {tokenizer.convert_tokens_to_ids(self.template.stop_token), tokenizer.eos_token_id}
        wanted_len = config.max_model_len or model.config.llm.max_context_length
        kv_cache_bytes = config.kv_cache_bytes
        if kv_cache_bytes is None and model.device.type != "cuda":
            kv_cache_bytes = self.default_cpu_kv_cache_bytes(model, config, wanted_len)
        # Each running request takes a token of every step, so no more than max_num_batched_tokens ever run (the
        # model card's calls ask for 256 with any budget). The scheduler refuses the inconsistent pair; the engine
        # says so and uses the budget, which also captures no CUDA graph for a batch that cannot occur.
        max_num_seqs = min(config.max_num_seqs, config.max_num_batched_tokens)
        if max_num_seqs < config.max_num_seqs:
            logger.warning("max_num_batched_tokens (%d) is below max_num_seqs (%d): at most %d requests run at once; "
                           "raise max_num_batched_tokens (--max-num-batched-tokens) or lower max_num_seqs "
                           "(--max-num-seqs)", config.max_num_batched_tokens, config.max_num_seqs, max_num_seqs)
        runner_class = ModelRunner
        if config.tensor_parallel_size > 1:
            from ..worker.tensor_parallel_runner import TPModelRunner as runner_class
        self.runner = runner_class(model, config.block_size, kv_cache_bytes, config.kv_cache_fraction,
                                   wanted_len, max_num_seqs, config.static_decode,
                                   capture_graphs_at_startup=config.capture_graphs_at_startup)
        capacity = self.runner.num_blocks * config.block_size
        max_model_len = self._effective_max_model_len(config, wanted_len, capacity)
        model_len = model.config.llm.max_context_length
        # What to raise when a request does not fit (PromptTooLongError says it)
        if max_model_len < wanted_len:
            self._context_hint = (f"the KV cache holds {capacity} tokens: raise kv_cache_bytes (--kv-cache-bytes) "
                                  "or kv_cache_fraction (--kv-cache-fraction)")
        elif max_model_len < model_len:
            self._context_hint = f"raise max_model_len (--max-model-len), up to the model's {model_len}"
        else:
            self._context_hint = "the model's own context length"
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size,
                                          enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            max_vit_tiles_per_step=config.max_vit_tiles_per_step, max_model_len=max_model_len,
            max_waiting=config.max_waiting, block_size=config.block_size),
            self.block_manager, self._tiles_ready)
        self.feature_cache = FeatureCache(config.feature_cache_bytes)
        self.vision = VisionWork(model, self.feature_cache)
        if config.tensor_parallel_size > 1:  # a step's tiles split over the ranks (ViT data parallelism)
            self.vision.extract_feature = self.runner.extract_feature
        self._states: dict[str, RequestState] = {}
        self._requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.last_step_sampled: list[str] = []  # request ids that got a token in the last step (streaming)
        self.tracer = DISABLED if config.trace_path is None else Tracer(
            config.trace_path, config.trace_max_events, config.trace_max_file_bytes, config.trace_max_files)
        self._forward_end = 0.0  # when the last forward's logits were ready (traces only)
        # Seconds and counts by stage, for benchmarks (bench_offline.py prints their shares).
        self.stats = {"preprocess_s": 0.0, "vit_s": 0.0, "prefill_step_s": 0.0, "decode_step_s": 0.0,
                      "tiles_encoded": 0, "steps": 0, "request_errors": {}}

    @staticmethod
    def default_cpu_kv_cache_bytes(model: InternVLChatModel, config: EngineConfig, max_model_len: int) -> int:
        """The KV cache off CUDA: room for one request with an image of max_tiles_per_image tiles (+ thumbnail)
        and CPU_KV_TEXT_TOKENS of text and output, within max_model_len; never below 256 MiB."""
        tokens = (config.max_tiles_per_image + 1) * model.num_image_token + CPU_KV_TEXT_TOKENS
        blocks = -(-min(tokens, max_model_len) // config.block_size) + 1  # + the static decode's scratch block
        return max(blocks * ModelRunner.bytes_per_block(model, config.block_size), 256 << 20)

    @staticmethod
    def _effective_max_model_len(config: EngineConfig, wanted: int, capacity: int) -> int:
        """max_model_len no larger than the KV cache holds (so /v1/models and every refusal tell the truth): the
        model's context is clamped; an explicit max_model_len past it is an error naming the options."""
        if wanted <= capacity:
            return wanted
        fix = "raise kv_cache_bytes (serve: --kv-cache-bytes) or kv_cache_fraction (--kv-cache-fraction)"
        if config.max_model_len is not None:
            raise ValueError(f"max_model_len {wanted} is more than the KV cache holds ({capacity} tokens): {fix}, "
                             f"or lower max_model_len (--max-model-len)")
        logger.warning("max_model_len is %d tokens (the KV cache's capacity), below the model's context of %d: "
                       "to use more, %s", capacity, wanted, fix)
        return capacity

    @staticmethod
    def kv_cache_bytes_per_block(model: InternVLChatModel, block_size: int) -> int:
        """Bytes of one KV block of `block_size` tokens (all layers, K and V) for `model`."""
        return ModelRunner.bytes_per_block(model, block_size)

    @property
    def system_message(self) -> str:
        """The system message of prompts built from text: the model's (`model.system_message`) or its template's."""
        return self.model.system_message if self.model.system_message is not None else self.template.system_message

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
                request_id: str | None = None, deadline: float | None = None) -> PreparedRequest:
        """Validate, tokenise and tile one request without touching the scheduler (safe from any thread).

        Raises ValueError naming the problem: ImageLoadError (ImageTooLargeError) for images, InputLimitError for
        the work limits (checked before the work: the prompt's length before any image is decoded),
        PromptTooLongError when the prompt and max_tokens do not fit max_model_len. `deadline`
        (time.monotonic()) is checked between images.
        """
        request_id = request_id or str(next(self._ids))
        failure = getattr(self.runner, "failure", None)  # a tensor-parallel rank died: fail at once
        if failure is not None:
            raise RuntimeError(failure)
        params = sampling_params or SamplingParams()
        arrival = time.perf_counter()
        max_tiles = request.get("max_tiles") if isinstance(request, Mapping) else None
        if max_tiles is not None and not (isinstance(max_tiles, int) and not isinstance(max_tiles, bool)
                                          and 1 <= max_tiles <= self.config.max_tiles_per_image):
            raise ValueError(f"max_tiles must be an integer between 1 and {self.config.max_tiles_per_image}, "
                             f"got {max_tiles!r}")
        max_model_len = self.scheduler.config.max_model_len
        vocab = self.model.config.llm.vocab_size
        if params.top_k > vocab or any(i >= vocab for i in params.penalty_context_ids or ()):
            raise ValueError(f"top_k and penalty_context_ids must be within the vocabulary ({vocab} tokens)")
        outside = [token for token, _ in params.logit_bias or () if token >= vocab]
        if outside:
            raise ValueError(f"logit_bias: token id {outside[0]} is outside the vocabulary ({vocab} tokens)")

        def check_length(num_prompt: int) -> None:
            wanted = params.max_tokens if params.max_tokens is not None else 1
            if num_prompt + wanted > max_model_len:
                what = f" + max_tokens ({wanted})" if params.max_tokens is not None else " + 1 output token"
                raise PromptTooLongError(f"the prompt ({num_prompt} tokens, images included){what} exceeds the "
                                         f"context length (max_model_len {max_model_len}; {self._context_hint}); "
                                         "send fewer image tiles (max_dynamic_patch) or a smaller max_tokens")

        processed = process_request(request, self.tokenizer, self.model.config, self.template.name,
                                    self.system_message, self.input_limits, check_length, deadline,
                                    self.vision.preprocesses_on_device(self.config.device_preprocessing))
        num_prompt = len(processed.prompt_token_ids)
        check_length(num_prompt)
        if params.max_tokens is not None:
            max_tokens = params.max_tokens
        else:  # up to the context length (which the KV cache holds), and default_max_tokens
            max_tokens = max(max_model_len - num_prompt, 1)
            if self.config.default_max_tokens is not None:
                max_tokens = min(max_tokens, self.config.default_max_tokens)
        scheduled = Request(request_id, processed.prompt_token_ids, max_tokens, processed.images,
                            arrival_time=arrival, stop_token_ids=self._stops(params),
                            rope_length_offset=processed.left_padding)
        scheduled.cache_salt = self._cache_salt(scheduled)
        self.block_manager.check_fits(scheduled)
        state = RequestState(params, make_generator(params, self.runner.device), processed.pixel_values,
                             IncrementalDetokenizer(self.tokenizer), features=dict(processed.features),
                             metrics=RequestMetrics(arrival))
        self.stats["preprocess_s"] += time.perf_counter() - arrival
        if self.tracer.enabled:
            self.tracer.span(request_id, "preprocess", arrival, time.perf_counter(),
                             {"prompt_tokens": num_prompt, "images": len(scheduled.images),
                              "tiles": scheduled.num_image_tiles, "max_tokens": max_tokens})
        return PreparedRequest(scheduled, state)

    def _cache_salt(self, request: Request) -> str | None:
        """Prompt keys are rotated as the official prefill of the (padded) prompt length rotates them: past
        max_position_embeddings (InternLM2's dynamic NTK) or original_max_position_embeddings (Phi-3's su) that
        differs by length, so such a prompt shares cached blocks only with prompts rotated the same way. Output
        keys follow from their positions, so preemption still reuses a request's own."""
        variant = self.model.language_model.rotary.variant(request.rope_length(0))
        return None if variant is None else f"rope:{variant}"

    def submit(self, prepared: PreparedRequest) -> str:
        """Queue a prepared request (the engine's thread); raises ValueError or QueueFullError."""
        request_id = prepared.request_id
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.scheduler.add_request(prepared.request)
        self._requests[request_id] = prepared.request
        self._states[request_id] = prepared.state
        if self.tracer.enabled:
            self.tracer.waiting(request_id, time.perf_counter())
        return request_id

    def _stops(self, params: SamplingParams) -> frozenset[int]:
        stops = set() if params.ignore_eos else set(self.stop_token_ids)
        return frozenset(stops | set(params.stop_token_ids))

    def abort(self, request_id: str) -> None:
        request = self.scheduler.abort(request_id)
        if request is not None:
            self.vision.release(self._states.pop(request_id), self._states)
            self._requests.pop(request_id, None)
            if self.tracer.enabled:
                self.tracer.finished(request_id, time.perf_counter(),
                                     {"reason": "abort", "output_tokens": len(request.output_token_ids)})

    def _tiles_ready(self, request: Request, image: ImageSpan, first: int) -> int:
        return self.vision.tiles_ready(self._states[request.request_id], image, first)

    # ---- one step ----
    def step(self) -> list[RequestOutput]:
        """Schedule, encode images, run one forward, sample, update; returns the requests finished now.

        A failure in the ViT pass, the forward or the sampler fails only the requests that cause it (see
        `isolation.run_isolating`); every other request of the step proceeds as if they had not been there.
        """
        step_start = time.perf_counter()
        output = self.scheduler.schedule()
        now = schedule_end = time.perf_counter()
        for chunk in output.chunks:
            metrics = self._states[chunk.request.request_id].metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
                metrics.queue_time = now - metrics.arrival_time
        failed: dict[str, tuple[str, str]] = {}  # request id -> (cause, error)
        if output.tiles_to_encode:
            self._encode_isolating(output.tiles_to_encode, failed)
        if not output.chunks:
            return []
        forward_start = time.perf_counter()
        chunks = [chunk for chunk in output.chunks if chunk.request.request_id not in failed]
        features = {c.request.request_id: self.vision.features(self._states[c.request.request_id]) for c in chunks}
        sampled, errors = run_isolating(chunks, lambda part: self._forward(part, features))
        sample_end = time.perf_counter()
        starts = [chunk.request.num_computed_tokens for chunk in chunks] if self.tracer.enabled else []
        decode_only = all(c.num_new_tokens == 1 and c.request.num_computed_tokens >= c.request.num_prompt_tokens
                          for c in chunks)
        for chunk, err in errors:
            failed[chunk.request.request_id] = ("forward", describe(err))
        for request_id in [rid for rid, token in sampled.items() if token is None]:
            del sampled[request_id]
            failed[request_id] = ("sampling", "the model's logits for this request are not finite (nan or inf), "
                                  "or its sampling parameters leave no token to draw")
        finished = []
        for request_id, (cause, error) in failed.items():
            self.stats["request_errors"][cause] = self.stats["request_errors"].get(cause, 0) + 1
            logger.warning("request %s failed alone (%s): %s", request_id, cause, error)
            request = self._requests[request_id]
            self.scheduler.finish(request, FinishReason.ERROR, error)
            finished.append(request)
        self.last_step_sampled = list(sampled)
        done = {request.request_id for request in finished}
        updated = self.scheduler.update(output, sampled, self.stop_token_ids)
        finished += updated
        done.update(request.request_id for request in updated)
        for request_id in sampled:  # stop strings, on each request's incrementally decoded text
            request = self._requests[request_id]
            if request_id not in done and hits_stop_string(request, self._states[request_id]):
                self.scheduler.finish(request, FinishReason.STOP)
                finished.append(request)
        now = time.perf_counter()
        self.stats["decode_step_s" if decode_only else "prefill_step_s"] += now - forward_start
        self.stats["steps"] += 1
        for request_id in sampled:
            metrics = self._states[request_id].metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
                metrics.time_to_first_token = now - metrics.arrival_time
        if self.tracer.enabled:
            trace_step(self.tracer, output, chunks, starts, sampled, failed,
                       (step_start, schedule_end, forward_start, self._forward_end, sample_end, now),
                       self.scheduler.num_running, self.scheduler.num_waiting, self.block_manager.num_free_blocks)
        return [self._finish(request) for request in finished]

    def _forward(self, chunks: Sequence[ScheduledChunk], features: Mapping[str, Any]) -> dict[str, int | None]:
        """One forward over `chunks` and the sampling of those that complete their sequence."""
        meta = build_batch(chunks, self.config.block_size, features)
        logits = self.runner.execute(meta)
        if self.tracer.enabled:  # the forward's own time in the trace: wait for the device before sampling
            if logits.is_cuda:
                torch.cuda.synchronize(logits.device)
            self._forward_end = time.perf_counter()
        return self._sample([self._requests[rid] for rid in meta.logit_request_ids], logits)

    def fail_all(self, error: str) -> list[RequestOutput]:
        """Ends every unfinished request with `error` (the scheduler itself raised), freeing its blocks."""
        requests = list(self.scheduler.running) + list(self.scheduler.waiting)
        for request in requests:
            self.scheduler.finish(request, FinishReason.ERROR, error)
        self.stats["request_errors"]["engine"] = self.stats["request_errors"].get("engine", 0) + len(requests)
        return [self._finish(request) for request in requests]

    def _encode_isolating(self, slices: Sequence[TileSlice], failed: dict[str, tuple[str, str]]) -> None:
        """The step's tile slices in one ViT batch, narrowed down to the slices that fail on their own when it
        raises: every request holding a failed image content fails."""
        def encode(part: Sequence[TileSlice]) -> dict[str, None]:
            elapsed = self.vision.encode(part, self._states)
            self.stats["vit_s"] += elapsed
            self.stats["tiles_encoded"] += sum(tile_slice.num_tiles for tile_slice in part)
            for tile_slice in part:
                self._states[tile_slice.request.request_id].metrics.vit_time += elapsed
            return {}

        for tile_slice, err in run_isolating(list(slices), encode)[1]:
            key = tile_slice.image.content_hash
            for request_id, state in self._states.items():
                if key in state.pixel_values:
                    failed.setdefault(request_id, ("vit", f"encoding its image failed: {describe(err)}"))

    def _sample(self, requests: Sequence[Request], logits: torch.Tensor) -> dict[str, int | None]:
        """logits [len(requests), vocab] float32 -> each request's next token (None: its row cannot be sampled),
        with its own parameters."""
        if not requests:
            return {}
        rows = []
        for request in requests:
            state = self._states[request.request_id]
            params = state.params
            penalized: Sequence[int] = ()
            if params.repetition_penalty != 1.0:
                context = request.prompt_token_ids if params.penalty_context_ids is None else params.penalty_context_ids
                penalized = list(context) + request.output_token_ids
            # A given generator is the model card's stream (batch_chat's rows share it): drawn by torch.multinomial
            # itself, as transformers draws; the other rows take the sync-free batched draw.
            rows.append(RowSampling(params.temperature, params.top_k, params.top_p, params.repetition_penalty,
                                    penalized, state.generator, params.logit_bias or (),
                                    official_draw=params.generator is not None))
        tokens = sample_batch(logits, rows)
        for index, request in enumerate(requests):  # after the draw: a retried batch must not record them twice
            state = self._states[request.request_id]
            if state.params.return_logits:
                state.logits.append(logits[index].to("cpu", copy=True))
        return {request.request_id: token for request, token in zip(requests, tokens)}

    def snapshot(self, request_id: str) -> RequestOutput:
        """A running request's output so far (finished=False), for streaming."""
        return partial_output(self._requests[request_id], self._states[request_id])

    def _finish(self, request: Request) -> RequestOutput:
        self._requests.pop(request.request_id, None)
        state = self._states.pop(request.request_id)
        self.vision.release(state, self._states)
        output = final_output(request, state, self.tokenizer, self.template.stop_token)
        if self.tracer.enabled:
            self.tracer.finished(request.request_id, time.perf_counter(),
                                 {"reason": output.finish_reason, "output_tokens": len(output.token_ids),
                                  "error": output.error})
        return output

    def close(self) -> None:
        """Write what the trace holds (if tracing) and stop its writer; stop tensor-parallel workers, if any."""
        self.tracer.close()
        close_runner = getattr(self.runner, "close", None)
        if close_runner is not None:
            close_runner()

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
        with tqdm(total=len(order), initial=len(results), desc="requests", unit="req", disable=not show) as bar:
            while self.scheduler.has_unfinished():
                done = self.step()
                for finished in done:
                    results[finished.request_id] = finished
                bar.update(len(done))
        return [results[request_id] for request_id in order]
