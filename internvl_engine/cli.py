"""`internvl-engine demo | chat | serve`: one chat turn about an image (tiles, token counts, stage times), or the
OpenAI-compatible HTTP server."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image


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
    """Load, preprocess, encode, prefill and decode once, printing what each stage did and how long it took."""
    from .generation import generate
    from .hf_compat import AutoModel, AutoTokenizer
    from .image_processor import load_image
    from .prompt import get_template, prepare_chat_query
    from .sampler import GenerationConfig

    out = out if out is not None else sys.stdout
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    timings: dict[str, float] = {}
    start = time.perf_counter()
    model = AutoModel.from_pretrained(model_path, torch_dtype=dtype, device=device)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    timings["load checkpoint"] = time.perf_counter() - start
    cfg = model.config
    print(f"model: {model_path}  ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{model.dtype}, {device})", file=out)

    pixel_values = None
    num_patches: list[int] = []
    if image is not None:
        start = time.perf_counter()
        max_num = max_tiles if max_tiles is not None else cfg.max_dynamic_patch
        pixel_values = load_image(image, input_size=cfg.image_size, max_num=max_num,
                                  use_thumbnail=cfg.use_thumbnail)
        timings["preprocess (tiling)"] = time.perf_counter() - start
        num_patches = [pixel_values.shape[0]]
        print(f"image: {pixel_values.shape[0]} tiles of {cfg.image_size}x{cfg.image_size} (max_num {max_num}), "
              f"{pixel_values.shape[0] * model.num_image_token} visual tokens", file=out)

    template = get_template(model.template or "internlm2-chat")
    query, _ = prepare_chat_query(template.name, question, None, num_patches,
                                  system_message=model._system_message(), num_image_token=model.num_image_token)
    inputs = tokenizer(query, return_tensors="pt")
    print(f"prompt: {inputs['input_ids'].shape[1]} tokens", file=out)

    with torch.inference_mode():
        start = time.perf_counter()
        vit_embeds = model.extract_feature(pixel_values) if pixel_values is not None else None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings["vision encoder + projector"] = time.perf_counter() - start
        embeds = model.embed_inputs(inputs["input_ids"], vit_embeds)
        stop = {tokenizer.convert_tokens_to_ids(template.stop_token), tokenizer.eos_token_id}
        result = generate(model, embeds, inputs["attention_mask"], GenerationConfig(max_new_tokens=max_new_tokens),
                          stop, tokenizer.pad_token_id, tokenizer.bos_token_id)
    timings["LLM prefill"] = result.prefill_seconds
    timings["LLM decode"] = result.decode_seconds
    ids = result.sequences[0]
    response = tokenizer.decode(ids, skip_special_tokens=True).split(template.stop_token)[0].strip()
    print(f"generated: {len(ids)} tokens", file=out)
    for stage, seconds in timings.items():
        print(f"  {stage:<28s} {seconds * 1000:9.1f} ms", file=out)
    if len(ids) > 1:
        print(f"  {'time per output token':<28s} {result.decode_seconds / (len(ids) - 1) * 1000:9.1f} ms", file=out)
    print(f"question: {question}", file=out)
    print(f"response: {response}", file=out)
    return response


def _demo(args: argparse.Namespace) -> int:
    from .checkpoint_builder import ensure_tiny_checkpoint

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
                      choices=["internvl-chat-v1-5", "mini-internvl-chat-2b-v1-5"])
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
