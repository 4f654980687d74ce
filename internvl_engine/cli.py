"""`internvl-engine demo | chat | serve`: one chat turn about an image through the engine (tiles, token counts,
stage times), or the OpenAI-compatible HTTP server."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from .config import MODEL_PRESETS


def _demo_image(width: int = 1280, height: int = 720) -> Image.Image:
    """A deterministic synthetic picture (gradients and a checkerboard), so the demo needs no download."""
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    red = (x * 255 // max(width - 1, 1)).to(torch.uint8)
    green = (y * 255 // max(height - 1, 1)).to(torch.uint8)
    blue = torch.where(((x // 64) + (y // 64)) % 2 == 0, 220, 40).to(torch.uint8)
    return Image.fromarray(torch.stack([red, green, blue], dim=-1).numpy(), mode="RGB")


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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

    start = time.perf_counter()
    path = Path(args.model) if args.model else ensure_tiny_checkpoint(args.preset, seed=args.seed)
    print(f"checkpoint ready in {(time.perf_counter() - start) * 1000:.0f} ms: {path}")
    if not args.model:
        print("NOTE: this tiny checkpoint has RANDOM weights: the response is gibberish by design; it shows the "
              "pipeline (official layout, tiling, tokens, stage times), not a model's quality.")
    image = args.image or _demo_image()
    run_turn(path, image, args.question, args.max_tiles, args.max_new_tokens, args.dtype, _device(args.device))
    return 0


def _chat(args: argparse.Namespace) -> int:
    run_turn(Path(args.model), args.image, args.question, args.max_tiles, args.max_new_tokens, args.dtype,
             _device(args.device))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="internvl-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--max-tiles", type=int, default=None, help="max tiles per image (default: config's)")
    common.add_argument("--max-new-tokens", type=int, default=32)
    common.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 (default: float32 on CPU)")
    common.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")

    demo = sub.add_parser("demo", parents=[common], help="chat about a generated image with a tiny random checkpoint")
    demo.add_argument("--preset", default="internvl-chat-v1-5",
                      choices=MODEL_PRESETS)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--model", default=None, help="use this checkpoint folder instead of the tiny one")
    demo.add_argument("--image", default=None, help="an image file instead of the generated picture")
    demo.add_argument("question", nargs="?", default="Describe this image in detail.")
    demo.set_defaults(func=_demo)

    chat = sub.add_parser("chat", parents=[common], help="one chat turn with a real checkpoint")
    chat.add_argument("--model", required=True, help="official checkpoint folder (config.json, *.safetensors, ...)")
    chat.add_argument("--image", default=None, help="image file (omit for a text-only turn)")
    chat.add_argument("question")
    chat.set_defaults(func=_chat)
    from .server.launch import add_serve_arguments, serve

    server = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching)")
    add_serve_arguments(server)
    server.set_defaults(func=serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"internvl-engine: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
