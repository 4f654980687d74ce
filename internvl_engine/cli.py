"""`internvl-engine demo | chat | serve | serve-ray`: one chat turn about an image through the engine (tiles, token
counts, stage times), or the OpenAI-compatible HTTP server (serve-ray: its replicas under Ray Serve).

Errors end the command with one line on stderr, `internvl-engine: error: <message>`: exit status 2 for a bad
command line, 1 for anything else (a missing file, a corrupt image, a device this machine lacks, a port in use).
`--traceback` (or INTERNVL_ENGINE_DEBUG=1) prints the full Python traceback as well.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
import time
import traceback
from pathlib import Path

import torch
from PIL import Image

from .config import MODEL_PRESETS
from .devices import resolve_device

DEBUG_ENV = "INTERNVL_ENGINE_DEBUG"  # set to 1: errors print their full traceback (as --traceback)


def _demo_image(width: int = 1280, height: int = 720) -> Image.Image:
    """A deterministic synthetic picture (gradients and a checkerboard), so the demo needs no download."""
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    red = (x * 255 // max(width - 1, 1)).to(torch.uint8)
    green = (y * 255 // max(height - 1, 1)).to(torch.uint8)
    blue = torch.where(((x // 64) + (y // 64)) % 2 == 0, 220, 40).to(torch.uint8)
    return Image.fromarray(torch.stack([red, green, blue], dim=-1).numpy(), mode="RGB")


def _device(name: str | None) -> torch.device:
    """--device checked against this torch build and the visible GPUs (DeviceError, one line); None: cuda if
    available, else cpu."""
    return resolve_device(name, "--device")


def run_turn(model_path: Path, image: Image.Image | str | None, question: str, max_tiles: int | None,
             max_new_tokens: int, dtype: str, device: torch.device, out=None) -> str:
    """Load, then one greedy chat turn through the engine, printing what each stage did and how long it took."""
    from .engine.llm import LLM
    from .engine.sampling_params import SamplingParams

    out = out if out is not None else sys.stdout
    start = time.perf_counter()
    llm = LLM(model_path, dtype=None if dtype == "auto" else dtype, device=device)
    load_seconds = time.perf_counter() - start
    model, cfg = llm.model, llm.model.config
    print(f"model: {model_path}  ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{model.dtype}, {device})", file=out)
    max_num = max_tiles if max_tiles is not None else cfg.max_dynamic_patch
    request = {"prompt": question, "images": [image] if image is not None else [], "max_tiles": max_num}
    result = llm.generate([request], SamplingParams(max_tokens=max_new_tokens, temperature=0.0))[0]
    if result.error is not None:
        raise ValueError(result.error)
    if image is not None:
        print(f"image: {result.num_image_tiles} tiles of {cfg.image_size}x{cfg.image_size} (max_num {max_num}), "
              f"{result.num_image_tiles * model.num_image_token} visual tokens", file=out)
    print(f"prompt: {result.num_prompt_tokens} tokens", file=out)
    print(f"generated: {len(result.token_ids)} tokens", file=out)
    stats = llm.stats
    timings = {"load checkpoint + KV cache": load_seconds, "preprocess (tiling)": stats["preprocess_s"],
               "vision encoder + projector": stats["vit_s"], "LLM prefill": stats["prefill_step_s"],
               "LLM decode": stats["decode_step_s"]}
    for stage, seconds in timings.items():
        print(f"  {stage:<28s} {seconds * 1000:9.1f} ms", file=out)
    if result.metrics.time_per_output_token is not None:
        print(f"  {'time per output token':<28s} {result.metrics.time_per_output_token * 1000:9.1f} ms", file=out)
    print(f"question: {question}", file=out)
    print(f"response: {result.text}", file=out)
    return result.text


def _demo(args: argparse.Namespace) -> int:
    from .testing.checkpoint_builder import ensure_tiny_checkpoint

    device = _device(args.device)  # before building anything
    start = time.perf_counter()
    path = Path(args.model) if args.model else ensure_tiny_checkpoint(args.preset, seed=args.seed)
    print(f"checkpoint ready in {(time.perf_counter() - start) * 1000:.0f} ms: {path}")
    if not args.model:
        print("NOTE: this tiny checkpoint has RANDOM weights: the response is gibberish by design; it shows the "
              "pipeline (official layout, tiling, tokens, stage times), not a model's quality.")
    image = args.image or _demo_image()
    run_turn(path, image, args.question, args.max_tiles, args.max_new_tokens, args.dtype, device)
    return 0


def _chat(args: argparse.Namespace) -> int:
    device = _device(args.device)
    run_turn(Path(args.model), args.image, args.question, args.max_tiles, args.max_new_tokens, args.dtype, device)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit status 2), like the command's other errors:
    `internvl-engine: error: --max-tiles must be an integer between 1 and 40 (got 0); see 'internvl-engine demo
    --help'`."""

    def error(self, message: str):  # type: ignore[override]
        # "argument --max-tiles: must be ..." (the `type=` checks of launch.py) -> "--max-tiles must be ..."
        match = re.match(r"argument ([^:]+): (must .*)", message, re.S)
        if match:
            message = f"{match.group(1).split('/')[0]} {match.group(2)}"
        message = " ".join(message.split())
        self.exit(2, f"internvl-engine: error: {message}; see '{self.prog} --help'\n")


class _Formatter(argparse.HelpFormatter):
    """Help wrapped without breaking names at their hyphens (--kv-cache-fraction, mini-internvl-chat-2b-v1-5)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)


class _TopFormatter(argparse.RawDescriptionHelpFormatter, _Formatter):
    """The top-level help: its description and epilog as written, options as `_Formatter` wraps them."""


_TRACEBACK_HELP = f"on an error, also print the full Python traceback (or set {DEBUG_ENV}=1) (default: off)"


def build_parser() -> argparse.ArgumentParser:
    from .engine.llm import EngineConfig
    from .server.launch import add_serve_arguments, dtype_name, int_in_range, serve
    from .server.ray_serve import add_ray_arguments, serve_ray

    max_tiles = EngineConfig.max_tiles_per_image
    parser = _Parser(prog="internvl-engine", formatter_class=_TopFormatter,
                     description="InternVL 1.5 (InternVL-Chat-V1.5, Mini-InternVL-Chat-2B/4B-V1.5) through the "
                     "engine:\ntry the pipeline (demo), chat about an image (chat), or serve an OpenAI-compatible "
                     "API (serve;\nserve-ray: engine replicas under Ray Serve).",
                     epilog="'internvl-engine COMMAND --help' lists a command's options and their defaults.\n"
                     "Errors are one line on stderr, exit status 2 for a bad command line and 1 otherwise;\n"
                     f"--traceback (or {DEBUG_ENV}=1) prints the full traceback too.")
    parser.add_argument("--traceback", action="store_true", help=_TRACEBACK_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,chat,serve,serve-ray}", title="commands")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--max-tiles", type=int_in_range(1, max_tiles), default=None, metavar="N",
                        help=f"most 448x448 tiles an image is cut into, 1 to {max_tiles} (default: the "
                        "checkpoint's max_dynamic_patch, from its config.json)")
    common.add_argument("--max-new-tokens", type=int_in_range(1), default=32, metavar="N",
                        help="most tokens to generate (greedy decoding) (default %(default)s)")
    common.add_argument("--dtype", type=dtype_name, default="auto",
                        help="float32 | bfloat16 | float16 | auto (default: auto, bfloat16 on CUDA, float32 on CPU)")
    common.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda if torch sees a GPU, else cpu)")
    common.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS, help=_TRACEBACK_HELP)

    demo = sub.add_parser(
        "demo", parents=[common], formatter_class=_Formatter,
        help="chat about a generated image with a tiny random checkpoint (no download)",
        description="Build (once, cached in $INTERNVL_ENGINE_CACHE or ~/.cache/internvl_engine) a tiny checkpoint in "
        "the official layout with RANDOM weights, and run one chat turn about a generated picture through the "
        "engine, printing the tiles, token counts and the time of each stage. No download and no GPU needed; the "
        "response is gibberish by design.")
    demo.add_argument("--preset", default="internvl-chat-v1-5", choices=MODEL_PRESETS, metavar="PRESET",
                      help="the model whose layout the tiny checkpoint has, shrunk: %(choices)s "
                      "(default %(default)s)")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed of the tiny checkpoint's random weights (default %(default)s)")
    demo.add_argument("--model", default=None, metavar="PATH",
                      help="run this checkpoint folder instead of the tiny one (default: none)")
    demo.add_argument("--image", default=None, metavar="FILE",
                      help="an image file instead of the generated picture (default: a generated 1280x720 picture)")
    demo.add_argument("question", nargs="?", default="Describe this image in detail.",
                      help="what to ask about the image (default: %(default)r)")
    demo.set_defaults(func=_demo)

    chat = sub.add_parser(
        "chat", parents=[common], formatter_class=_Formatter, help="one chat turn with a real checkpoint",
        description="Load an official InternVL 1.5 checkpoint and run one chat turn (greedy) about an image, or a "
        "text-only turn, printing the tiles, token counts, the time of each stage and the response.")
    chat.add_argument("--model", required=True, metavar="PATH",
                      help="official checkpoint folder (config.json, *.safetensors, tokenizer files) (required)")
    chat.add_argument("--image", default=None, metavar="FILE",
                      help="image file to ask about (default: none, a text-only turn)")
    chat.add_argument("question", help="what to ask (required)")
    chat.set_defaults(func=_chat)

    server = sub.add_parser(
        "serve", formatter_class=_Formatter, help="an OpenAI-compatible HTTP server (continuous batching)",
        description="Serve a checkpoint (--model), a tiny random one (--tiny) or a preset's shapes with random "
        "weights (--preset --random-weights) over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, "
        "/health, /metrics) with continuous batching. Every refused request gets a 4xx naming the flag to raise.")
    add_serve_arguments(server)
    server.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS, help=_TRACEBACK_HELP)
    server.set_defaults(func=serve)

    ray_server = sub.add_parser(
        "serve-ray", formatter_class=_Formatter,
        help="the same API from N engine replicas on a Ray cluster (Ray Serve), routed by image",
        description="Serve the OpenAI-compatible API of 'serve' from --num-replicas engine replicas under Ray Serve "
        "(pip install 'internvl-engine[ray]'): one ingress routes each request by the hash of its first image (else "
        "of its text's start), so a repeated image reaches the replica that cached its features and prefix; Ray "
        "Serve checks the replicas' health and restarts them. Each response names its replica in the "
        "x-internvl-replica header. Starts a local Ray cluster unless --ray-address is given; for Kubernetes, point "
        "a KubeRay RayService at internvl_engine.server.ray_serve:app_builder (deploy/kuberay-rayservice.yaml).")
    add_ray_arguments(ray_server)
    ray_server.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS, help=_TRACEBACK_HELP)
    ray_server.set_defaults(func=serve_ray)
    return parser


def _one_line(err: BaseException) -> str:
    text = " | ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.traceback or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    try:
        return args.func(args)
    except (ValueError, OSError) as err:  # DeviceError and ImageLoadError are ValueErrors
        if debug:
            traceback.print_exc()
        print(f"internvl-engine: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("internvl-engine: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
