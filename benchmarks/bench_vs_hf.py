"""Side by side with HF transformers: one workload, greedy, through the official remote code and through this engine.

    python3 benchmarks/bench_vs_hf.py --model /path/to/InternVL-Chat-V1-5 --batch-sizes 1,4,8
    python3 benchmarks/bench_vs_hf.py --model CKPT --hf-code DIR      # CKPT lacks the remote code's *.py files
    python3 benchmarks/bench_vs_hf.py --workload requests.jsonl --model CKPT
    python3 benchmarks/bench_vs_hf.py --baseline engine-chat          # the harness alone: tiny checkpoint, CPU

Sides, each in its own subprocess (two copies of a 25.5B model do not fit one GPU), same device and dtype:
- baseline "hf": transformers `AutoModel.from_pretrained(path, trust_remote_code=True)`, `model.chat` one request
  at a time, then `model.batch_chat` at each of --batch-sizes (needs `pip install 'internvl-engine[hf]'`, or
  --hf-python with an interpreter that has transformers in the pinned range);
  baseline "engine-chat": the same calls on this engine's own `model.chat` / `batch_chat` (tests the harness);
- engine: `internvl_engine.AutoModel` `model.chat` one at a time, then `LLM.generate` over the whole workload
  (and with max_num_seqs = each batch size).
Greedy everywhere; chat stops at the template separator only, as the official `chat` does. Pixel values for the
chat calls are made before the timed call with `internvl_engine.load_image` (the official recipe, bit-identical)
on both sides; `LLM.generate` tiles the images itself, inside its time.

Reported per side and mode: agreement with the baseline's one-at-a-time `chat` (exact token matches, the first
diverging position where not), TTFT, TPOT, end-to-end latency, requests/s, output tokens/s (tokens before the
stop token) and peak device memory (torch.cuda.max_memory_allocated per mode on CUDA; the process's peak RSS on
CPU). TTFT on the transformers side comes from a streamer passed through `generation_config` (the time of its
first `put` after the prompt's); on the engine's from RequestOutput.metrics. Files: --output JSON (default
benchmarks/results/bench_vs_hf.json), a Markdown table and two PNGs beside it (<stem>_latency_by_tiles.png: end-to-
end latency and TTFT of one request at a time by its tile count; <stem>_throughput_by_batch.png: output tokens/s
and requests/s by batch size). Progress bars on stderr (--no-progress hides them).

Workload JSONL, one request per line ('#' lines and blank lines skipped), keys:
  {"id": "a", "image": "photo.jpg" | "synthetic": "4k" | "1080p" | "720p" | "WxH", "question": "...",
   "max_num": 12, "max_new_tokens": 64, "seed": 0}
(image paths are relative to the file; no image key: a text-only request. In a batch with images, the official
batch_chat gives a text-only row an empty image (`<img></img>`), so that row differs from its own chat.)
"""
from __future__ import annotations

import abc
import argparse
import dataclasses
import hashlib
import inspect
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))
from bench_args import HelpWithDefaults, int_list  # noqa: E402
from results_dir import RESULTS_DIR, default_output, prepare_output  # noqa: E402

SYNTHETIC_SIZES = {"4k": (3840, 2160), "1080p": (1920, 1080), "720p": (1280, 720)}
KEYS = {"id", "image", "synthetic", "question", "max_num", "max_new_tokens", "seed"}
SCRATCH_MARKER = ".bench_vs_hf_scratch"
DEFAULT_WORKLOAD = [
    {"id": "4k-12", "synthetic": "4k", "question": "Describe this image in detail.", "max_num": 12},
    {"id": "1080p-6", "synthetic": "1080p", "question": "What stands out in this picture?", "max_num": 6},
    {"id": "720p-6", "synthetic": "720p", "question": "What colours do you see?", "max_num": 6},
    {"id": "4k-40", "synthetic": "4k", "question": "Describe every part of this image.", "max_num": 40},
    {"id": "1080p-12", "synthetic": "1080p", "question": "Write a caption for this image.", "max_num": 12},
    {"id": "720p-1", "synthetic": "720p", "question": "Is this a photo or a drawing?", "max_num": 1},
    {"id": "4k-6", "synthetic": "4k", "question": "What is in the top left corner?", "max_num": 6},
    {"id": "1080p-24", "synthetic": "1080p", "question": "List the objects in this image.", "max_num": 24},
]


class BenchError(Exception):
    """A problem to report in one line (bad workload, missing remote code, a side that failed)."""


# ---- the workload -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Item:
    id: str
    question: str
    max_num: int = 12
    max_new_tokens: int = 64
    image: str | None = None  # a path
    size: tuple[int, int] | None = None  # a synthetic image's width, height
    seed: int = 0


def parse_item(entry: Any, where: str, base: Path, index: int) -> Item:
    if not isinstance(entry, dict):
        raise BenchError(f"{where}: a request must be a JSON object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - KEYS)
    if unknown:
        raise BenchError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(KEYS))})")
    question = entry.get("question")
    if not isinstance(question, str) or not question.strip():
        raise BenchError(f"{where}: 'question' must be a non-empty string")
    numbers = {}
    for key, default, high in (("max_num", 12, 40), ("max_new_tokens", 64, None), ("seed", index, None)):
        value = entry.get(key, default)
        low = 0 if key == "seed" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (high and value > high):
            span = f"between {low} and {high}" if high else f">= {low}"
            raise BenchError(f"{where}: '{key}' must be an integer {span}, got {value!r}")
        numbers[key] = value
    if "image" in entry and "synthetic" in entry:
        raise BenchError(f"{where}: give 'image' or 'synthetic', not both")
    image = size = None
    if "image" in entry:
        if not isinstance(entry["image"], str) or not entry["image"]:
            raise BenchError(f"{where}: 'image' must be a file path")
        path = (base / entry["image"]).expanduser()
        if not path.is_file():
            raise BenchError(f"{where}: image {str(path)!r} does not exist")
        image = str(path.resolve())
    elif "synthetic" in entry:
        size = synthetic_size(entry["synthetic"], where)
    request_id = entry.get("id", str(index))
    if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
        raise BenchError(f"{where}: 'id' must be a string")
    return Item(str(request_id), question, numbers["max_num"], numbers["max_new_tokens"], image, size,
                numbers["seed"])


def synthetic_size(spec: Any, where: str) -> tuple[int, int]:
    if isinstance(spec, str) and spec.lower() in SYNTHETIC_SIZES:
        return SYNTHETIC_SIZES[spec.lower()]
    if isinstance(spec, str) and spec.count("x") == 1:
        width, _, height = spec.partition("x")
        if width.isdigit() and height.isdigit() and 0 < int(width) <= 16384 and 0 < int(height) <= 16384:
            return int(width), int(height)
    raise BenchError(f"{where}: 'synthetic' must be one of {', '.join(SYNTHETIC_SIZES)} or WxH (up to 16384), "
                     f"got {spec!r}")


def load_workload(path: str | None) -> list[Item]:
    """The requests of a JSONL file (or the built-in default); BenchError names the file and line of a problem."""
    if path is None:
        return [parse_item(entry, f"default workload #{i + 1}", REPO, i) for i, entry in enumerate(DEFAULT_WORKLOAD)]
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BenchError(f"{path}: cannot read the workload ({err.strerror if isinstance(err, OSError) else err})") \
            from None
    items: list[Item] = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise BenchError(f"{path}:{number}: not JSON ({err.msg} at column {err.colno})") from None
        items.append(parse_item(entry, f"{path}:{number}", file.resolve().parent, len(items)))
    if not items:
        raise BenchError(f"{path}: the workload has no requests")
    duplicates = sorted({item.id for item in items if [i.id for i in items].count(item.id) > 1})
    if duplicates:
        raise BenchError(f"{path}: duplicate request id(s) {', '.join(duplicates)}")
    return items


# ---- remote code ------------------------------------------------------------------------------------------------
def remote_code_modules(checkpoint: Path) -> set[str]:
    """The modules config.json's and tokenizer_config.json's auto_map name (e.g. modeling_internvl_chat)."""
    modules = set()
    for name in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((checkpoint / name).read_text()).get("auto_map", {})
        except (OSError, ValueError):
            continue
        for value in auto_map.values():
            for reference in value if isinstance(value, list) else [value]:
                if isinstance(reference, str):
                    modules.add(reference.split("--")[-1].rsplit(".", 1)[0])
    return modules


def hf_checkpoint(checkpoint: Path, code_dir: Path | None, scratch_root: Path) -> Path:
    """The folder transformers loads: `checkpoint` itself when it holds the remote code its auto_map names, else a
    scratch copy (weights and other files symlinked, code_dir's *.py copied in)."""
    if not (checkpoint / "config.json").is_file():
        raise BenchError(f"{checkpoint} is not a checkpoint folder (no config.json)")
    needed = remote_code_modules(checkpoint)
    if code_dir is None:
        missing = sorted(module for module in needed if not (checkpoint / f"{module}.py").is_file())
        if missing or not needed:
            raise BenchError(f"{checkpoint} has no remote code ({', '.join(f'{m}.py' for m in missing) or 'auto_map'} "
                             "missing): pass --hf-code DIR, a folder with the model's *.py files from its Hugging "
                             "Face repository")
        return checkpoint
    code = sorted(code_dir.glob("*.py"))
    if not code:
        raise BenchError(f"--hf-code {code_dir}: no *.py files there")
    missing = sorted(needed - {file.stem for file in code})
    if missing:
        raise BenchError(f"--hf-code {code_dir} lacks {', '.join(f'{m}.py' for m in missing)} (named by the "
                         "checkpoint's auto_map)")
    scratch = scratch_root / f"{checkpoint.resolve().name}-hf"
    if scratch.exists():
        if not (scratch / SCRATCH_MARKER).exists():
            raise BenchError(f"{scratch} exists and is not a scratch copy of this benchmark: remove it or pass "
                             "another --scratch-dir")
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    for entry in sorted(checkpoint.iterdir()):
        if entry.suffix != ".py" and entry.name != SCRATCH_MARKER:
            (scratch / entry.name).symlink_to(entry.resolve())
    for file in code:
        shutil.copy2(file, scratch / file.name)
    (scratch / SCRATCH_MARKER).write_text(f"{checkpoint.resolve()}\n{code_dir.resolve()}\n")
    return scratch


# ---- measurements shared by the sides (worker processes) ---------------------------------------------------------
def open_image(item: Item, shadow: bool = False):
    """The item's PIL image (None: text only); `shadow`: a different picture of the same size, for warm-ups."""
    from PIL import Image

    from bench_offline import synthetic

    if item.image is None and item.size is None:
        return None
    if item.image is not None and not shadow:
        return Image.open(item.image).convert("RGB")
    width, height = item.size or Image.open(item.image).size
    return synthetic(width, height, seed=10_000 + item.seed if shadow else item.seed)


def peak_memory(device: Any) -> tuple[int, str]:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated (this mode)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS (this process so far)"


def reset_peak(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def row(item: Item, generated: list[int], stop_id: int, start: float, first: float | None, end: float,
        tiles: int) -> dict:
    """One request's record (times relative to its call's start): `tokens` are those before the stop token, at
    most max_new_tokens (a batch runs to its longest row's); TPOT counts the stop token's step too."""
    generated = list(generated)[: item.max_new_tokens]
    tokens = generated[: generated.index(stop_id)] if stop_id in generated else generated
    steps = len(tokens) + (stop_id in generated)
    tpot = (end - first) / (steps - 1) if first is not None and steps > 1 else None
    return {"id": item.id, "tiles": tiles, "tokens": tokens, "output_tokens": len(tokens),
            "ttft_s": None if first is None else first - start, "tpot_s": tpot, "e2e_s": end - start}


def generated_steps(generated: list[int], stop_id: int, limit: int) -> int:
    """How many decoding steps a row took: up to its stop token (included), at most `limit`."""
    generated = list(generated)[:limit]
    return generated.index(stop_id) + 1 if stop_id in generated else len(generated)


def batches(items: list[Item], size: int) -> list[list[Item]]:
    return [items[i: i + size] for i in range(0, len(items), size)]


@dataclasses.dataclass
class Mode:
    name: str
    batch_size: int
    groups: list[list[Item]]  # one timed call each
    run: Callable[[list[Item], bool], tuple[list[dict], float]]  # (group, warm-up?) -> rows, seconds of the call
    warmup_group: list[Item]  # run on other pictures of the same sizes, 2 tokens, before the timed calls
    setup: Callable[[], None] = lambda: None  # a fresh engine: no cache hits from an earlier mode


class Side(abc.ABC):
    """One side's model and its modes (`chat` one request at a time, then batches)."""

    def __init__(self, spec: dict) -> None:
        import torch

        self.spec = spec
        self.device = torch.device(spec["device"])
        self.dtype = getattr(torch, spec["dtype"])

    def pixel_values(self, item: Item, shadow: bool = False):
        from internvl_engine import load_image

        image = open_image(item, shadow)
        if image is None:
            return None
        return load_image(image, max_num=item.max_num).to(self.device, self.dtype)

    def run_modes(self, items: list[Item], progress: bool) -> list[dict]:
        from tqdm.auto import tqdm

        results = []
        for mode in self.modes(items):
            bar = tqdm(total=len(items), desc=f"{self.spec['kind']} {mode.name} (batch {mode.batch_size})",
                       unit="req", disable=not progress, file=sys.stderr)
            mode.setup()
            if self.spec["warmup"]:
                mode.run(mode.warmup_group, True)
            reset_peak(self.device)
            rows, wall = [], 0.0
            for group in mode.groups:
                group_rows, seconds = mode.run(group, False)
                rows += group_rows
                wall += seconds
                bar.update(len(group))
            bar.close()
            memory, memory_kind = peak_memory(self.device)
            results.append({"mode": mode.name, "batch_size": mode.batch_size, "wall_s": wall, "rows": rows,
                            "peak_memory_bytes": memory, "memory_kind": memory_kind})
        return results

    @abc.abstractmethod
    def modes(self, items: list[Item]) -> list[Mode]:
        """What this side runs: (name, batch size) modes over `items`."""


def largest(items: list[Item]) -> list[Item]:
    return [max(items, key=lambda item: (item.max_num, item.size or (0, 0), item.max_new_tokens))]


class ChatSide(Side):
    """`chat` and `batch_chat` of the official remote code (kind "hf") or of this engine's compat model."""

    def __init__(self, spec: dict) -> None:
        super().__init__(spec)
        started = time.perf_counter()
        if spec["kind"] == "hf":
            import transformers

            self.model = transformers.AutoModel.from_pretrained(
                spec["hf_model"], torch_dtype=self.dtype, trust_remote_code=True,
                low_cpu_mem_usage=_has("accelerate")).eval().to(self.device)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(spec["hf_model"], trust_remote_code=True,
                                                                        use_fast=False)
            self.versions = {"transformers": transformers.__version__}
            self._capture_hf()
        else:
            import internvl_engine
            from internvl_engine.compat import chat_model

            self.model = internvl_engine.AutoModel.from_pretrained(spec["model"], torch_dtype=self.dtype,
                                                                   device=self.device, progress=False)
            self.tokenizer = internvl_engine.AutoTokenizer.from_pretrained(spec["model"])
            self.versions = {"internvl_engine": internvl_engine.__version__}
            self.outputs: list = []
            original = chat_model.run_rows

            def run_rows(*args: Any, **kwargs: Any):  # the engine's RequestOutputs (tokens, metrics) of each call
                outputs = original(*args, **kwargs)
                self.outputs = outputs
                return outputs

            chat_model.run_rows = run_rows
        self.load_s = time.perf_counter() - started
        from internvl_engine.text.templates import get_template

        # chat stops at the template separator only (<|im_end|>, the 4B's <|end|>), as the official chat does
        self.stop_id = self.tokenizer.convert_tokens_to_ids(get_template(self.model.template or "internlm2-chat")
                                                            .stop_token)

    def _capture_hf(self) -> None:
        """Keep what `generate` returns (the new tokens) and time each token with a streamer."""
        original = self.model.generate
        self.sequences = None
        self.token_times: list[float] = []

        def generate(*args: Any, **kwargs: Any):
            self.sequences = original(*args, **kwargs)
            return self.sequences

        self.model.generate = generate
        signature = inspect.signature(self.model.batch_chat).parameters
        self.patches_keyword = "num_patches_list" if "num_patches_list" in signature else "image_counts"

    def streamer(self):
        times = self.token_times = []
        side = self
        side.prompt_length = 0

        class TokenTimes:  # transformers' streamer protocol: put(prompt ids) first, then put(new tokens) per step
            calls = 0

            def put(self, value: Any) -> None:
                if TokenTimes.calls:
                    times.append(time.perf_counter())
                else:  # with inputs_embeds, the ids generate seeds (a BOS column in 4.37): they lead the sequences
                    side.prompt_length = value.shape[-1] if value.dim() > 1 else 0
                TokenTimes.calls += 1

            def end(self) -> None:
                pass

        return TokenTimes()

    def modes(self, items):
        modes = [Mode("chat", 1, [[item] for item in items], self.chat, largest(items), self.fresh_engine)]
        for size in self.spec["batch_sizes"]:
            groups = batches(items, size)
            modes.append(Mode("batch_chat", size, groups, self.batch_chat, groups[0], self.fresh_engine))
        return modes

    def fresh_engine(self) -> None:
        """The engine's chat keeps an engine with feature and prefix caches: a new one per mode."""
        import gc

        import torch

        if self.spec["kind"] != "hf":
            self.model._llm = None
            self.llm = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def chat(self, group: list[Item], warmup: bool) -> tuple[list[dict], float]:
        item = group[0]
        pixel_values = self.pixel_values(item, shadow=warmup)
        config = {"max_new_tokens": 2 if warmup else item.max_new_tokens, "do_sample": False}
        if self.spec["kind"] == "hf":
            config["streamer"] = self.streamer()
        start = time.perf_counter()
        self.model.chat(self.tokenizer, pixel_values, ("Warm-up: " if warmup else "") + item.question, config)
        end = time.perf_counter()
        tiles = 0 if pixel_values is None else pixel_values.shape[0]
        return self._rows([item], start, end, [tiles]), end - start

    def batch_chat(self, group: list[Item], warmup: bool) -> tuple[list[dict], float]:
        pixels = [self.pixel_values(item, shadow=warmup) for item in group]
        tiles = [0 if p is None else p.shape[0] for p in pixels]
        present = [p for p in pixels if p is not None]
        config = {"max_new_tokens": 2 if warmup else max(item.max_new_tokens for item in group), "do_sample": False}
        if self.spec["kind"] == "hf":
            config["streamer"] = self.streamer()
        questions = [("Warm-up: " if warmup else "") + item.question for item in group]
        import torch

        start = time.perf_counter()
        if self.spec["kind"] == "hf":
            self.model.batch_chat(self.tokenizer, torch.cat(present) if present else None, questions, config,
                                  **{self.patches_keyword: tiles})
        else:
            self.model.batch_chat(self.tokenizer, torch.cat(present) if present else None, questions, config,
                                  num_patches_list=tiles)
        end = time.perf_counter()
        return self._rows(group, start, end, tiles), end - start

    def _rows(self, group: list[Item], start: float, end: float, tiles: list[int]) -> list[dict]:
        rows = []
        if self.spec["kind"] == "hf":
            times = self.token_times  # one per decoding step of the batch
            for index, generated in enumerate(self.sequences[:, self.prompt_length:].tolist()):
                steps = generated_steps(generated, self.stop_id, group[index].max_new_tokens)
                finish = times[min(steps, len(times)) - 1] if times and steps else end
                rows.append(row(group[index], generated, self.stop_id, start, times[0] if times else None, finish,
                                tiles[index]))
        else:
            for index, output in enumerate(self.outputs):
                metrics = output.metrics
                rows.append(row(group[index], output.token_ids, self.stop_id, start, metrics.first_token_time,
                                metrics.finished_time, tiles[index]))
        return rows


class EngineSide(ChatSide):
    """This engine: `model.chat` one at a time, then `LLM.generate` over the workload."""

    llm = None

    def modes(self, items):
        modes = [Mode("chat", 1, [[item] for item in items], self.chat, largest(items), self.fresh_engine)]
        for size in sorted(set(self.spec["batch_sizes"]) | {len(items)}):
            modes.append(Mode("generate", size, [items], self.generate, largest(items), self.engine_with(size)))
        return modes

    def engine_with(self, max_num_seqs: int) -> Callable[[], None]:
        def setup() -> None:
            from internvl_engine import LLM

            self.fresh_engine()
            self.llm = LLM.from_model(self.model, self.tokenizer, max_num_seqs=max_num_seqs)

        return setup

    def generate(self, group: list[Item], warmup: bool) -> tuple[list[dict], float]:
        from internvl_engine import SamplingParams

        requests, params = [], []
        for item in group:
            image = open_image(item, shadow=warmup)
            question = ("Warm-up: " if warmup else "") + item.question
            requests.append({"prompt": question, "images": [image] if image is not None else [],
                             "max_tiles": item.max_num})
            params.append(SamplingParams(max_tokens=2 if warmup else item.max_new_tokens, temperature=0.0,
                                         ignore_eos=True, stop_token_ids=(self.stop_id,)))
        start = time.perf_counter()
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        end = time.perf_counter()
        failed = [output.error for output in outputs if output.error]
        if failed:
            raise RuntimeError(f"LLM.generate: a request failed: {failed[0]}")
        return [row(item, output.token_ids, self.stop_id, start, output.metrics.first_token_time,
                    output.metrics.finished_time, output.num_image_tiles) for item, output in zip(group, outputs)], \
            end - start


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def worker(kind: str, spec_path: str, result_path: str) -> int:
    """A side, in its own process: load, run its modes, write the result JSON."""
    sys.stdout.flush()
    os.dup2(2, 1)  # whatever the libraries print goes to stderr: the parent's stdout is the report
    sys.path.insert(0, str(REPO))  # the HF interpreter may not have the package installed
    spec = json.loads(Path(spec_path).read_text())
    items = [Item(**{**entry, "size": tuple(entry["size"]) if entry["size"] else None}) for entry in spec["workload"]]
    import torch

    torch.manual_seed(0)
    side = EngineSide(spec) if kind == "engine" else ChatSide({**spec, "kind": kind})
    modes = side.run_modes(items, spec["progress"])
    device = side.device
    result = {"kind": kind, "load_s": side.load_s, "modes": modes, "versions": {**side.versions,
              "torch": torch.__version__, "python": platform.python_version()},
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else (platform.processor() or platform.machine())}
    Path(result_path).write_text(json.dumps(result))
    return 0


# ---- the parent: run the sides, compare, report ------------------------------------------------------------------
def run_side(kind: str, spec: dict, python: str, scratch: Path) -> dict:
    spec_path, result_path = scratch / f"{kind}.spec.json", scratch / f"{kind}.result.json"
    spec_path.write_text(json.dumps({**spec, "kind": kind}))
    command = [python, str(Path(__file__).resolve()), "--worker", kind, "--spec", str(spec_path),
               "--result", str(result_path)]
    completed = subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if completed.returncode != 0 or not result_path.exists():
        raise BenchError(f"the {kind} side failed (exit status {completed.returncode}; its messages are above)")
    return json.loads(result_path.read_text())


def summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {"mean": statistics.mean(ordered), "p50": ordered[len(ordered) // 2],
            "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], "max": ordered[-1]}


def first_divergence(tokens: list[int], reference: list[int]) -> int | None:
    """The first position where `tokens` differ from `reference` (None: equal)."""
    for position, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return position
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


def report(items: list[Item], results: dict[str, dict]) -> list[dict]:
    """One entry per side and mode, compared with the baseline's one-at-a-time chat."""
    reference = {row["id"]: row["tokens"] for row in results["baseline"]["modes"][0]["rows"]}
    entries = []
    for side in ("baseline", "engine"):
        for mode in results[side]["modes"]:
            rows = mode["rows"]
            divergence = {row["id"]: first_divergence(row["tokens"], reference[row["id"]]) for row in rows}
            exact = sum(position is None for position in divergence.values())
            tokens = sum(row["output_tokens"] for row in rows)
            wall = mode["wall_s"]
            entries.append({
                "side": side, "kind": results[side]["kind"], "mode": mode["mode"], "batch_size": mode["batch_size"],
                "requests": len(rows), "wall_s": wall, "requests_per_s": len(rows) / wall,
                "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
                "ttft_s": summary([row["ttft_s"] for row in rows if row["ttft_s"] is not None]),
                "tpot_s": summary([row["tpot_s"] for row in rows if row["tpot_s"] is not None]),
                "e2e_s": summary([row["e2e_s"] for row in rows]),
                "agreement": {"exact": exact, "total": len(rows), "rate": exact / len(rows),
                              "first_divergence": {k: v for k, v in divergence.items() if v is not None}},
                "peak_memory_bytes": mode["peak_memory_bytes"], "memory_kind": mode["memory_kind"],
                "per_request": [{**{k: v for k, v in row.items()}, "match": divergence[row["id"]] is None,
                                 "first_divergence": divergence[row["id"]]} for row in rows]})
    return entries


SIDE_NAMES = {"hf": "transformers", "engine-chat": "baseline: engine", "engine": "engine"}


def family(entry: dict) -> str:
    """"transformers batch_chat", "engine LLM.generate", ...: one line of the plots."""
    return f"{SIDE_NAMES[entry['kind']]} {'LLM.generate' if entry['mode'] == 'generate' else entry['mode']}"


def label(entry: dict) -> str:
    return family(entry) + (f" (max_num_seqs {entry['batch_size']})" if entry["mode"] == "generate" else "")


def markdown(meta: dict, entries: list[dict], items: list[Item]) -> str:
    ms = lambda s: "n/a" if s is None else f"{s['mean'] * 1e3:.1f} / {s['p50'] * 1e3:.1f}"  # noqa: E731
    lines = [f"# bench_vs_hf: {meta['model']}", "",
             f"- device: {meta['device']} ({meta['device_name']}), dtype {meta['dtype']}",
             f"- versions: {json.dumps(meta['versions'])}", f"- date: {meta['date']}",
             f"- command: `{meta['command']}`",
             f"- workload: {len(items)} requests ({meta['workload']}); greedy; agreement is with the baseline's "
             "one-at-a-time chat", "",
             "| side / mode | batch | req/s | out tok/s | TTFT mean / p50 ms | TPOT mean / p50 ms | e2e mean / p50 ms |"
             " exact match | first divergence | peak memory |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for e in entries:
        divergence = ", ".join(f"{k}@{v}" for k, v in e["agreement"]["first_divergence"].items()) or "-"
        lines.append(f"| {label(e)} | {e['batch_size']} | {e['requests_per_s']:.2f} | {e['output_tokens_per_s']:.1f} | "
                     f"{ms(e['ttft_s'])} | {ms(e['tpot_s'])} | {ms(e['e2e_s'])} | "
                     f"{e['agreement']['exact']}/{e['agreement']['total']} | {divergence} | "
                     f"{e['peak_memory_bytes'] / 2 ** 30:.2f} GiB |")
    lines += ["", f"Peak memory: {entries[0]['memory_kind']}. Times count from the start of each call (of the batch, "
              "for batched calls; LLM.generate: of the whole workload, its preprocessing included).", ""]
    return "\n".join(lines)


def plots(entries: list[dict], stem: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return []
    written = []
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for entry in [e for e in entries if e["mode"] == "chat"]:
        by_tiles: dict[int, list[dict]] = {}
        for row in entry["per_request"]:
            by_tiles.setdefault(row["tiles"], []).append(row)
        tiles = sorted(by_tiles)
        line, = axes.plot(tiles, [statistics.mean(r["e2e_s"] for r in by_tiles[t]) * 1e3 for t in tiles], marker="o",
                          label=f"{label(entry)}: end to end")
        axes.plot(tiles, [statistics.mean(r["ttft_s"] or 0.0 for r in by_tiles[t]) * 1e3 for t in tiles], marker="x",
                  linestyle="--", color=line.get_color(), label=f"{label(entry)}: TTFT")
    axes.set(xlabel="tiles of the request (thumbnail included)", ylabel="ms", title="one request at a time")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(fontsize=8)
    figure.tight_layout()
    written.append(f"{stem}_latency_by_tiles.png")
    figure.savefig(written[-1], dpi=120)
    plt.close(figure)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    lines: dict[str, list[dict]] = {}
    for entry in entries:
        lines.setdefault(family(entry), []).append(entry)
    for name, points in lines.items():
        points.sort(key=lambda e: e["batch_size"])
        for axis, key in ((left, "output_tokens_per_s"), (right, "requests_per_s")):
            axis.plot([e["batch_size"] for e in points], [e[key] for e in points], marker="o" if len(points) > 1
                      else "s", markersize=6 if len(points) > 1 else 9, label=name)
    left.set(xlabel="batch size (generate: max_num_seqs)", ylabel="output tokens/s", title="throughput")
    right.set(xlabel="batch size (generate: max_num_seqs)", ylabel="requests/s", title="requests per second")
    for axis in (left, right):
        axis.legend(fontsize=8)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    written.append(f"{stem}_throughput_by_batch.png")
    figure.savefig(written[-1], dpi=120)
    plt.close(figure)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=HelpWithDefaults)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the tiny demo checkpoint)")
    parser.add_argument("--workload", default=None, help="JSONL of requests (default: a built-in 8-request mix)")
    parser.add_argument("--baseline", default="hf", choices=["hf", "engine-chat"],
                        help="hf: transformers + remote code; engine-chat: this engine's chat (tests the harness)")
    parser.add_argument("--hf-code", type=Path, default=None,
                        help="a folder with the remote code's *.py files, for a checkpoint without them")
    parser.add_argument("--hf-python", default=sys.executable,
                        help="the interpreter of the transformers side (one with the [hf] extra)")
    parser.add_argument("--scratch-dir", type=Path, default=RESULTS_DIR / "hf-checkpoints",
                        help="where --hf-code's scratch copy of the checkpoint goes")
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 4, 8])
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--no-warmup", action="store_true", help="no warm-up call before each mode")
    parser.add_argument("--output", default=default_output("bench_vs_hf.json"),
                        help="JSON file; the Markdown table and PNGs go beside it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args.worker, args.spec, args.result)
    try:
        return compare(args)
    except BenchError as err:
        print(f"bench_vs_hf: error: {err}", file=sys.stderr)
        return 2


def compare(args: argparse.Namespace) -> int:
    import torch

    items = load_workload(args.workload)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if args.model is None:
        from internvl_engine.testing.checkpoint_builder import ensure_tiny_checkpoint

        model = Path(ensure_tiny_checkpoint("internvl-chat-v1-5", seed=0))
    else:
        model = Path(args.model).expanduser().resolve()
    hf_model = hf_checkpoint(model, args.hf_code, args.scratch_dir) if args.baseline == "hf" else None
    output = prepare_output(args.output)
    spec = {"model": str(model), "hf_model": str(hf_model) if hf_model else None, "device": device, "dtype": dtype,
            "batch_sizes": args.batch_sizes, "warmup": not args.no_warmup, "progress": not args.no_progress,
            "workload": [dataclasses.asdict(item) for item in items]}
    with tempfile.TemporaryDirectory(prefix="bench_vs_hf-") as scratch:
        results = {"baseline": run_side(args.baseline, spec, args.hf_python if args.baseline == "hf"
                                        else sys.executable, Path(scratch)),
                   "engine": run_side("engine", spec, sys.executable, Path(scratch))}
    entries = report(items, results)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "model": str(model), "device": device, "device_name": results["engine"]["device_name"], "dtype": dtype,
            "baseline": args.baseline, "workload": args.workload or "built-in default",
            "versions": {side: results[side]["versions"] for side in results},
            "load_s": {side: results[side]["load_s"] for side in results},
            "ttft_method": {"hf": "streamer: first put after the prompt's", "engine": "RequestOutput.metrics"},
            "hf_code": {path.name: hashlib.sha256(path.read_bytes()).hexdigest()[:16]
                        for path in sorted(hf_model.glob("*.py"))} if hf_model else None}
    document = {"meta": meta, "workload": [dataclasses.asdict(item) for item in items], "results": entries}
    output.write_text(json.dumps(document, indent=1))
    table = markdown(meta, entries, items)
    output.with_suffix(".md").write_text(table)
    pictures = plots(entries, output.with_suffix(""))
    print(table)
    print(f"results: {output}\ntable: {output.with_suffix('.md')}" + "".join(f"\nplot: {p}" for p in pictures) +
          ("" if pictures else "\nplots: matplotlib not installed (pip install 'internvl-engine[bench]')"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
