"""`internvl-engine serve`: build the engine from a checkpoint (or a preset with random weights) and run uvicorn."""
from __future__ import annotations

import argparse
import ctypes
import errno
import math
import os
import socket
import sys
from pathlib import Path
from typing import Callable

from ..config import MODEL_PRESETS
from ..preprocessing.image_io import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE
from ..preprocessing.video import VideoLimits


# uvicorn's log levels (uvicorn.config.LOG_LEVELS; not imported here: uvicorn is an optional dependency)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def int_in_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse `type=`: an integer in [low, high] (no upper bound when high is None). The error reads
    "must be an integer between 1 and 40 (got 0)", which the CLI's parser prefixes with the option's name."""
    if high is not None:
        wanted = f"an integer between {low} and {high}"
    else:
        wanted = "a positive integer" if low == 1 else f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {wanted} (got {text})")
        return value

    parse.__name__ = "integer"
    return parse


def positive_number(high: float | None = None, low: float = 0.0, low_inclusive: bool = False
                    ) -> Callable[[str], float]:
    """An argparse `type=`: a finite number above `low` (or at least `low` with low_inclusive), at most `high`."""
    if high is not None:
        wanted = f"a number in {'[' if low_inclusive else '('}{low:g}, {high:g}]"
    elif low_inclusive:
        wanted = f"a number >= {low:g}"
    else:
        wanted = "a positive number" if low == 0 else f"a number above {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if (not math.isfinite(value) or value < low or (value == low and not low_inclusive)
                or (high is not None and value > high)):
            raise argparse.ArgumentTypeError(f"must be {wanted} (got {text})")
        return value

    parse.__name__ = "number"
    return parse


def dtype_name(text: str) -> str:
    """An argparse `type=`: auto or a dtype name the loader accepts (float32, bf16, torch.float16, ...)."""
    from ..models.loader import resolve_dtype

    if text != "auto":
        try:
            resolve_dtype(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(DTYPES)} (got {text})") from None
    return text


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    positive = int_in_range(1)
    model = parser.add_argument_group("model (one of --model, --tiny, --preset)")
    model.add_argument("--model", default=None, metavar="PATH",
                       help="official checkpoint folder (config.json, *.safetensors, tokenizer files) "
                       "(default: none)")
    model.add_argument("--tiny", nargs="?", const="internvl-chat-v1-5", default=None,
                       choices=MODEL_PRESETS, metavar="PRESET",
                       help="serve a tiny generated checkpoint with random weights (tests, CPU demos); PRESET: "
                       f"{', '.join(MODEL_PRESETS)} (default: off; --tiny alone: %(const)s)")
    model.add_argument("--preset", default=None, choices=MODEL_PRESETS, metavar="PRESET",
                       help="with --random-weights: a model's real shapes with random weights (benchmarks); PRESET: "
                       "one of --tiny's (default: none)")
    model.add_argument("--random-weights", action="store_true",
                       help="confirms that --preset serves random weights (default: off)")
    model.add_argument("--quantization", metavar="METHOD", default=None, choices=["int8"],
                       help="int8: weight-only int8 Linears (quantized while loading a float checkpoint; a preset is "
                       "built int8). An int8 (bitsandbytes) checkpoint is int8 without it (default: none)")
    model.add_argument("--load-in-8bit", dest="quantization", action="store_const", const="int8",
                       help="the same as --quantization int8 (the model card's name) (default: off)")
    model.add_argument("--tokenizer", default=None, metavar="PATH",
                       help="with --preset: a folder with the tokenizer files (default: the tiny demo tokenizer)")
    model.add_argument("--served-model-name", metavar="NAME", default=None,
                       help="the name clients send as 'model' (default: the folder's or preset's name)")
    http = parser.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1",
                      help="address to listen on; 0.0.0.0 for every interface (default %(default)s)")
    http.add_argument("--port", type=int_in_range(0, 65535), default=8000,
                      help="TCP port to listen on; 0 for any free one (default %(default)s)")
    # Not %(default)s: that would print the key from the environment in --help.
    http.add_argument("--api-key", metavar="KEY", default=os.environ.get("INTERNVL_ENGINE_API_KEY"),
                      help="require 'Authorization: Bearer KEY' on /v1/ (default: $INTERNVL_ENGINE_API_KEY, else "
                      "none)")
    http.add_argument("--allowed-local-media-path", type=Path, default=None, metavar="DIR",
                      help="a folder from which file:// image URLs may be read (default: none)")
    http.add_argument("--allow-remote-images", action="store_true",
                      help="fetch http(s) image URLs; internal addresses are still refused (default: off)")
    http.add_argument("--allow-remote-private-addresses", action="store_true",
                      help="with --allow-remote-images: also fetch from private/loopback/link-local addresses (an "
                      "internal deployment's own image store; never on a public server) (default: off)")
    limits = parser.add_argument_group("limits per request (each refusal is a 400/413 naming its flag)")
    limits.add_argument("--max-request-bytes", metavar="BYTES", type=positive, default=64 << 20,
                        help="largest JSON body (default 64 MiB)")
    limits.add_argument("--body-timeout-s", metavar="SECONDS", type=positive_number(), default=60.0,
                        help="time to receive a request body (default %(default)s)")
    limits.add_argument("--max-json-depth", metavar="N", type=positive, default=32,
                        help="nesting of the JSON body (default %(default)s)")
    limits.add_argument("--max-image-bytes", metavar="BYTES", type=positive, default=32 << 20,
                        help="largest encoded image (default 32 MiB)")
    limits.add_argument("--max-image-pixels", metavar="N", type=positive, default=DEFAULT_MAX_PIXELS,
                        help="largest image in pixels, checked before decoding (default %(default)s)")
    limits.add_argument("--max-image-side", metavar="N", type=positive, default=DEFAULT_MAX_SIDE,
                        help="longest image side in pixels, checked before decoding (default %(default)s)")
    limits.add_argument("--max-image-aspect-ratio", metavar="RATIO", type=positive_number(low=1.0, low_inclusive=True),
                        default=DEFAULT_MAX_ASPECT_RATIO,
                        help="longest side / shortest side, checked before decoding (default %(default)s)")
    limits.add_argument("--max-images-per-request", metavar="N", type=positive, default=16,
                        help="images in one request (default %(default)s)")
    limits.add_argument("--max-prompt-chars", metavar="N", type=positive, default=1 << 20,
                        help="characters of all message text (default %(default)s)")
    limits.add_argument("--max-stop-strings", metavar="N", type=positive, default=16,
                        help="stop strings in one request (default %(default)s)")
    limits.add_argument("--max-stop-string-chars", metavar="N", type=positive, default=256,
                        help="characters of one stop string (default %(default)s)")
    limits.add_argument("--max-prompts-per-request", metavar="N", type=positive, default=64,
                        help="/v1/completions: prompts (choices) in one request (default %(default)s)")
    limits.add_argument("--max-videos-per-request", metavar="N", type=positive, default=VideoLimits.max_videos,
                        help="videos (video_url parts) in one request (default %(default)s)")
    limits.add_argument("--max-video-bytes", metavar="BYTES", type=positive, default=VideoLimits.max_bytes,
                        help="largest encoded video (default 128 MiB; a data URL is also held to --max-request-bytes)")
    limits.add_argument("--max-video-frames", metavar="N", type=positive, default=VideoLimits.max_frames,
                        help="frames sampled from one video: the most a request's num_frames may ask for, each at "
                        "least 256 visual tokens (default %(default)s)")
    limits.add_argument("--max-video-duration-s", metavar="SECONDS", type=positive_number(),
                        default=VideoLimits.max_duration_s,
                        help="longest video, from its header before decoding (default %(default)s)")
    limits.add_argument("--max-video-total-frames", metavar="N", type=positive, default=VideoLimits.max_total_frames,
                        help="frames in one video, all of which are read and decoded up to the last one sampled; "
                        "checked from the header and while counting, before decoding (default %(default)s)")
    limits.add_argument("--max-video-side", metavar="N", type=positive, default=VideoLimits.max_side,
                        help="longest side of a video's frames in pixels, checked before decoding "
                        "(default %(default)s)")
    limits.add_argument("--max-video-pixels", metavar="N", type=positive, default=VideoLimits.max_pixels,
                        help="pixels of one video frame, checked before decoding (default %(default)s)")
    limits.add_argument("--default-max-tokens", metavar="N", type=positive, default=4096,
                        help="max_tokens of a request that sets neither max_tokens nor max_completion_tokens; the "
                        "context left after the prompt caps it too (default %(default)s)")
    limits.add_argument("--preprocess-workers", metavar="N", type=positive, default=2,
                        help="threads decoding and tiling images, apart from the engine's (default %(default)s)")
    limits.add_argument("--max-pending-preprocess", metavar="N", type=positive, default=64,
                        help="requests waiting for or in preprocessing before 503 (default %(default)s)")
    limits.add_argument("--preprocess-timeout-s", metavar="SECONDS", type=positive_number(), default=60.0,
                        help="time to fetch, decode and tile one request's images (default %(default)s)")
    http.add_argument("--max-connections", metavar="N", type=positive, default=1024,
                      help="open connections at once: at the cap the oldest idle one is closed, and when all have a "
                      "request in flight a new one gets a 503 (default %(default)s; lowered to fit the open-file "
                      "limit)")
    http.add_argument("--header-timeout-s", metavar="SECONDS", type=positive_number(), default=10.0,
                      help="time for a connection to send a complete request head (default %(default)s)")
    http.add_argument("--body-idle-timeout-s", metavar="SECONDS", type=positive_number(), default=30.0,
                      help="longest pause while a request body is sent (default %(default)s)")
    http.add_argument("--keep-alive-timeout-s", metavar="SECONDS", type=positive, default=30,
                      help="idle time between requests on a connection (default %(default)s)")
    http.add_argument("--log-level", metavar="LEVEL", default="warning", choices=LOG_LEVELS,
                      help="uvicorn's log level: %(choices)s (default %(default)s)")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--dtype", type=dtype_name, default=None,
                        help="weights and activations: bfloat16 | float16 | float32 (default: bfloat16 on CUDA, "
                        "float32 on CPU)")
    engine.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda if torch sees a GPU, else cpu)")
    engine.add_argument("--backend", metavar="BACKEND", default="auto", choices=["auto", "torch", "triton"],
                        help="kernels: triton (CUDA only) or torch (PyTorch ops); auto: Triton kernels on CUDA, "
                        "PyTorch on CPU (default %(default)s)")
    engine.add_argument("--kv-cache-bytes", metavar="BYTES", type=positive, default=None,
                        help="bytes of the paged KV cache (default: --kv-cache-fraction of free GPU memory on CUDA; "
                        "on CPU enough for one request with --max-tiles-per-image tiles, capped by --max-model-len, "
                        "at least 256 MiB)")
    engine.add_argument("--kv-cache-fraction", metavar="FRACTION", type=positive_number(1.0), default=0.5,
                        help="on CUDA without --kv-cache-bytes: the share of free GPU memory, after loading the "
                        "model, given to the KV cache (default %(default)s)")
    engine.add_argument("--block-size", metavar="N", type=positive, default=16,
                        help="tokens per KV cache block (default %(default)s)")
    engine.add_argument("--max-num-seqs", metavar="N", type=positive, default=64,
                        help="requests running (batched) at once; more wait in the queue (default %(default)s)")
    engine.add_argument("--max-num-batched-tokens", metavar="N", type=positive, default=8192,
                        help="tokens computed in one engine step (prefill chunks and decodes) (default %(default)s)")
    engine.add_argument("--max-vit-tiles-per-step", metavar="N", type=positive, default=8,
                        help="ViT tiles encoded per step; an image larger than this is encoded over several steps "
                        "while decoding streams keep moving (default %(default)s)")
    engine.add_argument("--max-model-len", metavar="N", type=positive, default=None,
                        help="longest sequence (prompt with images + output) in tokens (default: the model's "
                        "context, clamped to what the KV cache holds)")
    engine.add_argument("--max-waiting", metavar="N", type=positive, default=1024,
                        help="queued requests before 503 (default %(default)s)")
    engine.add_argument("--max-tiles-per-image", metavar="N", type=positive, default=40,
                        help="most tiles an image may be cut into; a request's max_dynamic_patch may not ask for more "
                        "(default %(default)s)")
    engine.add_argument("--feature-cache-bytes", metavar="BYTES", type=int_in_range(0), default=1 << 30,
                        help="ViT features of recent images kept for reuse; 0: no cache (default 1 GiB)")
    engine.add_argument("--no-prefix-caching", action="store_true",
                        help="do not reuse the KV blocks of a shared prompt prefix (default: off, prefixes are "
                        "reused)")
    engine.add_argument("--tensor-parallel-size", metavar="N", type=positive, default=1,
                        help="shard the LLM over N GPUs (cuda:i .. cuda:i+N-1 from --device; N CPU processes on the "
                        "CPU) and split each step's ViT tiles over them; N must divide the LLM's KV heads "
                        "(default %(default)s)")
    engine.add_argument("--seed", metavar="N", type=int, default=0,
                        help="seed of the random weights of --tiny and --preset (default %(default)s)")
    engine.add_argument("--no-graph-capture-at-startup", action="store_true",
                        help="capture each decode batch size's CUDA graph when a step first needs it: a faster start, "
                        "a slower first step at each batch size (default: off, every batch size is captured while "
                        "the server starts)")
    engine.add_argument("--trace-dir", metavar="DIR", type=Path, default=None,
                        help="write Chrome trace events of requests and engine steps (open in ui.perfetto.dev) to "
                        "DIR/engine-trace-<pid>.json, flushed every 5 s and at exit, rotated at 16 MiB into at most "
                        "4 files (default: off)")


def build_engine(args: argparse.Namespace):
    """(AsyncLLM, served model name) from the parsed arguments."""
    from ..devices import resolve_device
    from ..engine.async_llm import AsyncLLM, PreprocessConfig
    from ..engine.llm import LLM

    chosen = [name for name, value in (("--model", args.model), ("--tiny", args.tiny), ("--preset", args.preset))
              if value]
    if len(chosen) != 1:
        raise ValueError(f"serve needs exactly one of --model, --tiny, --preset (got {', '.join(chosen) or 'none'})")
    if args.preset and not args.random_weights:
        raise ValueError("--preset serves random weights: add --random-weights (or use --model PATH)")
    device = resolve_device(args.device, "--device")
    options = dict(kv_cache_bytes=args.kv_cache_bytes, kv_cache_fraction=args.kv_cache_fraction,
                   block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                   max_num_batched_tokens=args.max_num_batched_tokens,
                   max_vit_tiles_per_step=args.max_vit_tiles_per_step, max_model_len=args.max_model_len,
                   max_waiting=args.max_waiting, max_tiles_per_image=args.max_tiles_per_image,
                   feature_cache_bytes=args.feature_cache_bytes, max_image_pixels=args.max_image_pixels,
                   max_image_side=args.max_image_side, max_image_aspect_ratio=args.max_image_aspect_ratio,
                   max_images_per_request=args.max_images_per_request, max_prompt_chars=args.max_prompt_chars,
                   enable_prefix_caching=not args.no_prefix_caching, backend=args.backend,
                   load_in_8bit=args.quantization == "int8", default_max_tokens=args.default_max_tokens,
                   capture_graphs_at_startup=not args.no_graph_capture_at_startup,
                   tensor_parallel_size=args.tensor_parallel_size)
    options.update(max_videos_per_request=args.max_videos_per_request, max_video_bytes=args.max_video_bytes,
                   max_video_frames=args.max_video_frames, max_video_duration_s=args.max_video_duration_s,
                   max_video_total_frames=args.max_video_total_frames, max_video_side=args.max_video_side,
                   max_video_pixels=args.max_video_pixels)
    if getattr(args, "trace_dir", None) is not None:
        options["trace_path"] = str(Path(args.trace_dir) / f"engine-trace-{os.getpid()}.json")
    if args.model:
        path = Path(args.model)
        llm, name = LLM(path, dtype=args.dtype, device=device, **options), path.resolve().name
    elif args.tiny:
        from ..testing.checkpoint_builder import ensure_tiny_checkpoint

        path = ensure_tiny_checkpoint(args.tiny, seed=args.seed)
        llm, name = LLM(path, dtype=args.dtype, device=device, **options), f"tiny-{args.tiny}"
    else:
        from ..testing.checkpoint_builder import ensure_tiny_tokenizer

        tokenizer = args.tokenizer or ensure_tiny_tokenizer(preset=args.preset)
        llm = LLM(None, dtype=args.dtype, device=device, preset=args.preset, seed=args.seed,
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


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listen_error(host: str, port: int, err: OSError) -> OSError:
    """One line: what could not be listened on, why, and what to do."""
    reason = err.strerror or str(err)
    if isinstance(err, socket.gaierror):
        hint = " (check --host: a name or address of this machine, e.g. 127.0.0.1 or 0.0.0.0)"
    elif err.errno == errno.EADDRINUSE:
        hint = " (is another server running? choose another --port)"
    elif err.errno == errno.EACCES:
        hint = " (ports below 1024 need privileges; choose another --port)"
    elif err.errno == errno.EADDRNOTAVAIL:
        hint = " (--host is not an address of this machine; 127.0.0.1 or 0.0.0.0 are)"
    else:
        hint = ""
    return OSError(f"cannot listen on {_address(host, port)}: {reason}{hint}")


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) as uvicorn binds one (IPv6 when the host has a ':', SO_REUSEADDR).

    It does not listen yet: until `listen_on` is called, connections are refused rather than left waiting while
    the model loads. A port in use fails here with one line (OSError): "cannot listen on HOST:PORT: ...".
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise _listen_error(host, port, err) from None
    return sock


def listen_on(sock: socket.socket, host: str, backlog: int = 2048) -> int:
    """Start listening on a socket from `bind_socket` (2048: uvicorn's default backlog); returns its port. Another
    process may have taken the port since it was bound (both with SO_REUSEADDR): the same one line then."""
    port = sock.getsockname()[1]
    try:
        sock.listen(backlog)
    except OSError as err:
        raise _listen_error(host, port, err) from None
    return port


def server_config(args: argparse.Namespace, engine, name: str):
    """The ServerConfig of the parsed flags (`serve` and each `serve-ray` replica)."""
    from .app import ServerConfig
    from .media import MediaPolicy
    from .protocol import RequestLimits

    limits = RequestLimits(engine.llm.model.config.llm.vocab_size, max_tiles=args.max_tiles_per_image,
                           max_images_per_request=args.max_images_per_request, max_prompt_chars=args.max_prompt_chars,
                           max_stop_strings=args.max_stop_strings, max_stop_string_chars=args.max_stop_string_chars,
                           max_prompts_per_request=args.max_prompts_per_request,
                           max_videos_per_request=args.max_videos_per_request, max_video_frames=args.max_video_frames)
    media = MediaPolicy(args.max_image_bytes, args.allowed_local_media_path, args.allow_remote_images,
                        allow_private_addresses=args.allow_remote_private_addresses,
                        max_video_bytes=args.max_video_bytes)
    return ServerConfig((name,), api_key=args.api_key or None, max_request_bytes=args.max_request_bytes,
                        body_timeout_s=args.body_timeout_s, max_json_depth=args.max_json_depth, media=media,
                        limits=limits)


def serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import build_app
    except ImportError as err:
        raise ValueError(f"the server needs its extra dependencies: pip install 'internvl-engine[server]' ({err})") \
            from None
    from .connections import (ConnectionLimits, check_connection_cap, install_log_filters, raise_open_file_limit,
                              uvicorn_settings)

    for flag in ("max_request_bytes", "max_image_bytes", "max_image_pixels", "max_image_side",
                 "max_image_aspect_ratio", "max_images_per_request", "max_prompt_chars", "max_stop_strings",
                 "max_stop_string_chars", "max_json_depth", "body_timeout_s", "preprocess_workers",
                 "max_pending_preprocess", "preprocess_timeout_s", "max_connections", "header_timeout_s",
                 "body_idle_timeout_s", "keep_alive_timeout_s"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.allowed_local_media_path is not None and not args.allowed_local_media_path.is_dir():
        raise ValueError(f"--allowed-local-media-path {str(args.allowed_local_media_path)!r} is not a folder")
    # The port first: one in use fails in a second, not after loading a model.
    sock = bind_socket(args.host, args.port)
    try:
        return_freed_buffers_to_the_os()
        engine, name = build_engine(args)
        config = server_config(args, engine, name)
        app = build_app(engine, config)
        open_files = raise_open_file_limit(args.max_connections + 256)
        connections = check_connection_cap(
            ConnectionLimits(args.header_timeout_s, args.max_connections, args.keep_alive_timeout_s,
                             args.body_idle_timeout_s), open_files, reserve=_open_descriptors() + 64)
        install_log_filters()  # each asyncio/uvicorn error one line, repeats at most once per 10 s
        port = listen_on(sock, args.host)
        print(f"internvl-engine: serving {name!r} on http://{_address(args.host, port)}/v1 "
              f"({engine.llm.runner.device}, {engine.llm.runner.num_blocks} KV blocks of {args.block_size} tokens, "
              f"max_model_len {engine.llm.scheduler.config.max_model_len}, "
              f"up to {connections.max_connections} connections)", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=port, log_level=args.log_level,
                                               **uvicorn_settings(connections)))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # a second Ctrl+C, or the one uvicorn re-raises after its shutdown
            pass
    finally:
        sock.close()
    if not server.started:
        print("internvl-engine: error: the server stopped before it started serving (see the messages above)",
              file=sys.stderr, flush=True)
        return 1
    return 0


def _open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64
