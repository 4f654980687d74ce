"""Host preprocessing benchmark: `load_image` against the seed recipe on a 3840x2160 image.

The seed recipe is the official one (PIL ``.convert('RGB')``, `dynamic_preprocess`, then per tile
torchvision ``ToTensor`` + ``Normalize`` and ``torch.stack``), re-created with PIL and torch ops because
torchvision is not a dependency (its ``Resize((448, 448))`` returns a 448x448 tile unchanged, so it is
left out). Both paths run on the same input, from an in-memory PIL image and from a PNG file, at
max_num 12 (4x2 grid + thumbnail = 9 tiles) and 40 (7x4 + thumbnail = 29 tiles); outputs are checked
for bit equality before timing.

    python benchmarks/bench_preprocess.py [--repeat N] [--workers W] [--no-progress]

While a cell is timed, a tqdm bar on stderr counts its rounds (cleared when its row is printed).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

if __package__ in (None, ""):  # run as a script from a checkout that is not pip-installed
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from internvl_engine.preprocessing import cpu as image_processor
from internvl_engine.preprocessing.cpu import IMAGENET_MEAN, IMAGENET_STD, dynamic_preprocess, load_image

WIDTH, HEIGHT = 3840, 2160


def synthetic_image(width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    """Deterministic RGB test card: gradients, a checkerboard and a noise band (so PNG cannot
    compress it to nothing and the resize sees real edges)."""
    y, x = np.mgrid[0:height, 0:width]
    red = (x * 255 // (width - 1)).astype(np.uint8)
    green = (y * 255 // (height - 1)).astype(np.uint8)
    blue = np.where(((x // 64) + (y // 64)) % 2 == 0, 220, 40).astype(np.uint8)
    pixels = np.stack([red, green, blue], axis=-1)  # [H, W, 3]
    band = slice(height // 3, height // 3 + 256)
    pixels[band] = np.random.default_rng(0).integers(0, 256, pixels[band].shape, dtype=np.uint8)
    return Image.fromarray(pixels)


def seed_load_image(image_file: str | Path | Image.Image, input_size: int = 448, max_num: int = 12) -> torch.Tensor:
    """The official load_image with torchvision's transforms spelled out in torch: [tiles, 3, S, S]."""
    source = image_file if isinstance(image_file, Image.Image) else Image.open(image_file)
    image = source.convert("RGB")
    tiles = dynamic_preprocess(image, image_size=input_size, use_thumbnail=True, max_num=max_num)
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, dtype=torch.float32).view(-1, 1, 1)
    pixel_values = []
    for tile in tiles:
        # ToTensor: HWC uint8 copy -> CHW contiguous -> float32 / 255
        chw = torch.from_numpy(np.array(tile, np.uint8, copy=True)).view(tile.height, tile.width, 3)
        chw = chw.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        # Normalize (not in place): clone, then (x - mean) / std
        pixel_values.append(chw.clone().sub_(mean).div_(std))
    return torch.stack(pixel_values)


def interleaved_medians_ms(functions: dict[str, Callable[[], object]], repeat: int, progress: bool = False,
                           desc: str = "rounds") -> dict[str, float]:
    """Median wall time of each function in milliseconds, after two warm-up rounds (the first calls
    of a new size page-fault their fresh buffers in, which takes seconds on some VMs). The functions
    take turns in every round, so a slow spell of a shared machine hits all of them alike.
    progress: a transient tqdm bar on stderr over the rounds (warm-up included), updated between rounds."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    with tqdm(total=2 + repeat, desc=desc, unit="round", leave=False, disable=not progress) as bar:
        for _ in range(2):
            for function in functions.values():
                function()
            bar.update(1)
        for _ in range(repeat):
            for name, function in functions.items():
                start = time.perf_counter()
                function()
                times[name].append(time.perf_counter() - start)
            bar.update(1)
    return {name: statistics.median(samples) * 1e3 for name, samples in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9, help="timed rounds per cell (median reported)")
    parser.add_argument("--workers", type=int, default=None, help="load_image threads (default: up to 4 CPUs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    args = parser.parse_args()

    image = synthetic_image()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    backend = "C++ (_C)" if image_processor._C is not None else "NumPy twin (_C not built)"
    print(f"{platform.processor() or platform.machine()}, {cpus} CPUs available, torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads, normalize pass: {backend}, repeat {args.repeat}")
    print(f"image {WIDTH}x{HEIGHT} RGB; times are medians in ms\n")
    threads = args.workers or image_processor._default_workers()
    engine_label = f"engine {threads} threads"
    header = f"{'source':<10} {'max_num':>7} {'tiles':>5} {'seed':>8} {'engine 1 thread':>16} " \
             f"{engine_label:>17} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as folder:
        png = Path(folder) / "uhd3840x2160.png"
        image.save(png)
        for source_name, source in (("PIL image", image), ("PNG file", png)):
            for max_num in (12, 40):
                expected = seed_load_image(source, max_num=max_num)
                for workers in (1, args.workers):
                    got = load_image(source, max_num=max_num, workers=workers)
                    if not torch.equal(got, expected):
                        raise SystemExit(f"MISMATCH: {source_name} max_num={max_num} workers={workers}")
                ms = interleaved_medians_ms({
                    "seed": lambda: seed_load_image(source, max_num=max_num),
                    "single": lambda: load_image(source, max_num=max_num, workers=1),
                    "engine": lambda: load_image(source, max_num=max_num, workers=args.workers),
                }, args.repeat, progress=not args.no_progress, desc=f"{source_name}, max_num {max_num}")
                seed, single, engine = ms["seed"], ms["single"], ms["engine"]
                print(f"{source_name:<10} {max_num:>7} {expected.shape[0]:>5} {seed:>8.1f} {single:>16.1f} "
                      f"{engine:>17.1f} {seed / engine:>7.2f}x")
    print("\noutputs bit-identical to the seed recipe in every cell")


if __name__ == "__main__":
    main()
