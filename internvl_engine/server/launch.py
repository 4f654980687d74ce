"""`internvl-engine serve`: build the engine from a checkpoint (or a preset with random weights) and run uvicorn."""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
from pathlib import Path

from ..config import MODEL_PRESETS
from ..preprocessing.image_io import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model (one of)")
    model.add_argument("--model", default=None, help="official checkpoint folder (config.json, *.safetensors, ...)")
    model.add_argument("--tiny", nargs="?", const="internvl-chat-v1-5", default=None,
                       choices=MODEL_PRESETS,
                       help="serve a tiny generated checkpoint with random weights (tests, CPU demos)")
    model.add_argument("--preset", default=None, choices=MODEL_PRESETS,
                       help="with --random-weights: the real shapes, random weights (benchmarks)")
    model.add_argument("--random-weights", action="store_true")
    model.add_argument("--quantization", default=None, choices=["int8"],
                       help="int8: weight-only int8 Linears (quantized while loading a float checkpoint; a preset is "
                       "built int8). An int8 (bitsandbytes) checkpoint is int8 without it")
    model.add_argument("--load-in-8bit", dest="quantization", action="store_const", const="int8",
                       help="the same as --quantization int8 (the model card's name)")
    model.add_argument("--tokenizer", default=None,
                       help="with --preset: a folder with the tokenizer files (default: the tiny demo tokenizer)")
    model.add_argument("--served-model-name", default=None,
                       help="the name clients send as 'model' (default: the folder's or preset's name)")
    http = parser.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument("--api-key", default=os.environ.get("INTERNVL_ENGINE_API_KEY"),
                      help="require 'Authorization: Bearer KEY' on /v1/ (default: $INTERNVL_ENGINE_API_KEY)")
    http.add_argument("--allowed-local-media-path", type=Path, default=None,
                      help="a folder from which file:// image URLs may be read (default: none)")
    http.add_argument("--allow-remote-images", action="store_true",
                      help="fetch http(s) image URLs (off by default); internal addresses are still refused")
    http.add_argument("--allow-remote-private-addresses", action="store_true",
                      help="with --allow-remote-images: also fetch from private/loopback/link-local addresses (an "
                      "internal deployment's own image store; never on a public server)")
    limits = parser.add_argument_group("limits per request (each refusal is a 400/413 naming its flag)")
    limits.add_argument("--max-request-bytes", type=int, default=64 << 20, help="largest JSON body (default 64 MiB)")
    limits.add_argument("--body-timeout-s", type=float, default=60.0,
                        help="time to receive a request body (default %(default)s)")
    limits.add_argument("--max-json-depth", type=int, default=32, help="nesting of the JSON body (default %(default)s)")
    limits.add_argument("--max-image-bytes", type=int, default=32 << 20,
                        help="largest encoded image (default 32 MiB)")
    limits.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="largest image in pixels, checked before decoding (default %(default)s)")
    limits.add_argument("--max-image-side", type=int, default=DEFAULT_MAX_SIDE,
                        help="longest image side in pixels, checked before decoding (default %(default)s)")
    limits.add_argument("--max-image-aspect-ratio", type=float, default=DEFAULT_MAX_ASPECT_RATIO,
                        help="longest side / shortest side, checked before decoding (default %(default)s)")
    limits.add_argument("--max-images-per-request", type=int, default=16, help="(default %(default)s)")
    limits.add_argument("--max-prompt-chars", type=int, default=1 << 20,
                        help="characters of all message text (default %(default)s)")
    limits.add_argument("--max-stop-strings", type=int, default=16, help="(default %(default)s)")
    limits.add_argument("--max-stop-string-chars", type=int, default=256, help="(default %(default)s)")
    limits.add_argument("--preprocess-workers", type=int, default=2,
                        help="threads decoding and tiling images, apart from the engine's (default %(default)s)")
    limits.add_argument("--max-pending-preprocess", type=int, default=64,
                        help="requests waiting for or in preprocessing before 503 (default %(default)s)")
    limits.add_argument("--preprocess-timeout-s", type=float, default=60.0,
                        help="time to fetch, decode and tile one request's images (default %(default)s)")
    http.add_argument("--max-connections", type=int, default=1024,
                      help="open connections at once: at the cap the oldest idle one is closed, and when all have a "
                      "request in flight a new one gets a 503 (default %(default)s; lowered to fit the open-file limit)")
    http.add_argument("--header-timeout-s", type=float, default=10.0,
                      help="time for a connection to send a complete request head (default %(default)s)")
    http.add_argument("--body-idle-timeout-s", type=float, default=30.0,
                      help="longest pause while a request body is sent (default %(default)s)")
    http.add_argument("--keep-alive-timeout-s", type=int, default=30,
                      help="idle time between requests on a connection (default %(default)s)")
    http.add_argument("--log-level", default="warning")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: bf16 on CUDA, fp32 on CPU)")
    engine.add_argument("--device", default=None)
    engine.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    engine.add_argument("--kv-cache-bytes", type=int, default=None)
    engine.add_argument("--kv-cache-fraction", type=float, default=0.5)
    engine.add_argument("--block-size", type=int, default=16)
    engine.add_argument("--max-num-seqs", type=int, default=64)
    engine.add_argument("--max-num-batched-tokens", type=int, default=8192)
    engine.add_argument("--max-vit-tiles-per-step", type=int, default=8,
                        help="ViT tiles encoded per step; an image larger than this is encoded over several steps "
                        "while decoding streams keep moving (default %(default)s)")
    engine.add_argument("--max-model-len", type=int, default=None)
    engine.add_argument("--max-waiting", type=int, default=1024, help="queued requests before 503 (default 1024)")
    engine.add_argument("--max-tiles-per-image", type=int, default=40)
    engine.add_argument("--feature-cache-bytes", type=int, default=1 << 30)
    engine.add_argument("--no-prefix-caching", action="store_true")
    engine.add_argument("--seed", type=int, default=0, help="seed of random weights (--tiny, --preset)")


def build_engine(args: argparse.Namespace):
    """(AsyncLLM, served model name) from the parsed arguments."""
    from ..engine.async_llm import AsyncLLM, PreprocessConfig
    from ..engine.llm import LLM

    chosen = [name for name, value in (("--model", args.model), ("--tiny", args.tiny), ("--preset", args.preset))
              if value]
    if len(chosen) != 1:
        raise ValueError(f"serve needs exactly one of --model, --tiny, --preset (got {', '.join(chosen) or 'none'})")
    if args.preset and not args.random_weights:
        raise ValueError("--preset serves random weights: add --random-weights (or use --model PATH)")
    options = dict(kv_cache_bytes=args.kv_cache_bytes, kv_cache_fraction=args.kv_cache_fraction,
                   block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                   max_num_batched_tokens=args.max_num_batched_tokens,
                   max_vit_tiles_per_step=args.max_vit_tiles_per_step, max_model_len=args.max_model_len,
                   max_waiting=args.max_waiting, max_tiles_per_image=args.max_tiles_per_image,
                   feature_cache_bytes=args.feature_cache_bytes, max_image_pixels=args.max_image_pixels,
                   max_image_side=args.max_image_side, max_image_aspect_ratio=args.max_image_aspect_ratio,
                   max_images_per_request=args.max_images_per_request, max_prompt_chars=args.max_prompt_chars,
                   enable_prefix_caching=not args.no_prefix_caching, backend=args.backend,
                   load_in_8bit=args.quantization == "int8")
    if args.model:
        path = Path(args.model)
        llm, name = LLM(path, dtype=args.dtype, device=args.device, **options), path.resolve().name
    elif args.tiny:
        from ..testing.checkpoint_builder import ensure_tiny_checkpoint

        path = ensure_tiny_checkpoint(args.tiny, seed=args.seed)
        llm, name = LLM(path, dtype=args.dtype, device=args.device, **options), f"tiny-{args.tiny}"
    else:
        from ..testing.checkpoint_builder import ensure_tiny_tokenizer

        tokenizer = args.tokenizer or ensure_tiny_tokenizer(preset=args.preset)
        llm = LLM(None, dtype=args.dtype, device=args.device, preset=args.preset, seed=args.seed,
                  tokenizer=tokenizer, **options)
        name = f"{args.preset}-random"
    preprocess = PreprocessConfig(args.preprocess_workers, args.max_pending_preprocess, args.preprocess_timeout_s)
    return AsyncLLM(llm, preprocess), args.served_model_name or name


def return_freed_buffers_to_the_os(threshold_bytes: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold so that freed image buffers (tiles are MBs) go back to the OS.

    By default glibc raises the threshold after each large free (up to 32 MiB); later buffers of that size
    then come from per-thread heaps and stay resident when freed, so a burst of concurrent 4K images leaves
    the server hundreds of MiB larger. Setting the threshold turns that adjustment off. No-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3  # from malloc.h
    return bool(libc.mallopt(m_mmap_threshold, threshold_bytes))


def serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import ServerConfig, build_app
    except ImportError as err:
        raise ValueError(f"the server needs its extra dependencies: pip install 'internvl-engine[server]' ({err})") \
            from None
    from .connections import (ConnectionLimits, check_connection_cap, install_log_filters, raise_open_file_limit,
                              uvicorn_settings)
    from .media import MediaPolicy
    from .protocol import RequestLimits

    for flag in ("max_request_bytes", "max_image_bytes", "max_image_pixels", "max_image_side",
                 "max_image_aspect_ratio", "max_images_per_request", "max_prompt_chars", "max_stop_strings",
                 "max_stop_string_chars", "max_json_depth", "body_timeout_s", "preprocess_workers",
                 "max_pending_preprocess", "preprocess_timeout_s", "max_connections", "header_timeout_s",
                 "body_idle_timeout_s", "keep_alive_timeout_s"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.allowed_local_media_path is not None and not args.allowed_local_media_path.is_dir():
        raise ValueError(f"--allowed-local-media-path {str(args.allowed_local_media_path)!r} is not a folder")
    return_freed_buffers_to_the_os()
    engine, name = build_engine(args)
    limits = RequestLimits(engine.llm.model.config.llm.vocab_size, max_tiles=args.max_tiles_per_image,
                           max_images_per_request=args.max_images_per_request,
                           max_prompt_chars=args.max_prompt_chars, max_stop_strings=args.max_stop_strings,
                           max_stop_string_chars=args.max_stop_string_chars)
    config = ServerConfig((name,), api_key=args.api_key or None, max_request_bytes=args.max_request_bytes,
                          body_timeout_s=args.body_timeout_s, max_json_depth=args.max_json_depth,
                          media=MediaPolicy(args.max_image_bytes, args.allowed_local_media_path,
                                            args.allow_remote_images,
                                            allow_private_addresses=args.allow_remote_private_addresses),
                          limits=limits)
    app = build_app(engine, config)
    open_files = raise_open_file_limit(args.max_connections + 256)
    connections = check_connection_cap(
        ConnectionLimits(args.header_timeout_s, args.max_connections, args.keep_alive_timeout_s,
                         args.body_idle_timeout_s), open_files, reserve=_open_descriptors() + 64)
    install_log_filters()  # each asyncio/uvicorn error one line, repeats at most once per 10 s
    print(f"internvl-engine: serving {name!r} on http://{args.host}:{args.port}/v1 "
          f"({engine.llm.runner.device}, {engine.llm.runner.num_blocks} KV blocks of {args.block_size} tokens, "
          f"up to {connections.max_connections} connections)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, **uvicorn_settings(connections))
    return 0


def _open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64
