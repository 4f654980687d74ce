"""`internvl-engine serve`: build the engine from a checkpoint (or a preset with random weights) and run uvicorn."""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
from pathlib import Path

from ..preprocessing.image_io import DEFAULT_MAX_PIXELS


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model (one of)")
    model.add_argument("--model", default=None, help="official checkpoint folder (config.json, *.safetensors, ...)")
    model.add_argument("--tiny", nargs="?", const="internvl-chat-v1-5", default=None,
                       choices=["internvl-chat-v1-5", "mini-internvl-chat-2b-v1-5"],
                       help="serve a tiny generated checkpoint with random weights (tests, CPU demos)")
    model.add_argument("--preset", default=None, choices=["internvl-chat-v1-5", "mini-internvl-chat-2b-v1-5"],
                       help="with --random-weights: the real shapes, random weights (benchmarks)")
    model.add_argument("--random-weights", action="store_true")
    model.add_argument("--tokenizer", default=None,
                       help="with --preset: a folder with the tokenizer files (default: the tiny demo tokenizer)")
    model.add_argument("--served-model-name", default=None,
                       help="the name clients send as 'model' (default: the folder's or preset's name)")
    http = parser.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument("--api-key", default=os.environ.get("INTERNVL_ENGINE_API_KEY"),
                      help="require 'Authorization: Bearer KEY' on /v1/ (default: $INTERNVL_ENGINE_API_KEY)")
    http.add_argument("--max-request-bytes", type=int, default=64 << 20, help="largest JSON body (default 64 MiB)")
    http.add_argument("--max-image-bytes", type=int, default=32 << 20, help="largest encoded image (default 32 MiB)")
    http.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                      help=f"largest image in pixels, checked before decoding (default {DEFAULT_MAX_PIXELS})")
    http.add_argument("--allowed-local-media-path", type=Path, default=None,
                      help="a folder from which file:// image URLs may be read (default: none)")
    http.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (off by default)")
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
    engine.add_argument("--max-vit-tiles-per-step", type=int, default=48)
    engine.add_argument("--max-model-len", type=int, default=None)
    engine.add_argument("--max-waiting", type=int, default=1024, help="queued requests before 503 (default 1024)")
    engine.add_argument("--max-tiles-per-image", type=int, default=40)
    engine.add_argument("--feature-cache-bytes", type=int, default=1 << 30)
    engine.add_argument("--no-prefix-caching", action="store_true")
    engine.add_argument("--seed", type=int, default=0, help="seed of random weights (--tiny, --preset)")


def build_engine(args: argparse.Namespace):
    """(AsyncLLM, served model name) from the parsed arguments."""
    from ..engine.async_llm import AsyncLLM
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
                   enable_prefix_caching=not args.no_prefix_caching, backend=args.backend)
    if args.model:
        path = Path(args.model)
        llm, name = LLM(path, dtype=args.dtype, device=args.device, **options), path.resolve().name
    elif args.tiny:
        from ..testing.checkpoint_builder import ensure_tiny_checkpoint

        path = ensure_tiny_checkpoint(args.tiny, seed=args.seed)
        llm, name = LLM(path, dtype=args.dtype, device=args.device, **options), f"tiny-{args.tiny}"
    else:
        from ..testing.checkpoint_builder import ensure_tiny_tokenizer

        tokenizer = args.tokenizer or ensure_tiny_tokenizer()
        llm = LLM(None, dtype=args.dtype, device=args.device, preset=args.preset, seed=args.seed,
                  tokenizer=tokenizer, **options)
        name = f"{args.preset}-random"
    return AsyncLLM(llm), args.served_model_name or name


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
    from .media import MediaPolicy

    for flag in ("max_request_bytes", "max_image_bytes", "max_image_pixels"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive")
    if args.allowed_local_media_path is not None and not args.allowed_local_media_path.is_dir():
        raise ValueError(f"--allowed-local-media-path {str(args.allowed_local_media_path)!r} is not a folder")
    return_freed_buffers_to_the_os()
    engine, name = build_engine(args)
    config = ServerConfig((name,), api_key=args.api_key or None, max_request_bytes=args.max_request_bytes,
                          media=MediaPolicy(args.max_image_bytes, args.allowed_local_media_path,
                                            args.allow_remote_images))
    app = build_app(engine, config)
    print(f"internvl-engine: serving {name!r} on http://{args.host}:{args.port}/v1 "
          f"({engine.llm.runner.device}, {engine.llm.runner.num_blocks} KV blocks of {args.block_size} tokens)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=30)
    return 0
