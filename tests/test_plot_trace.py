"""benchmarks/plot_trace.py draws a real engine trace: a request with an image over several ViT slices."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from PIL import Image

from golden_utils import MODELS, checkpoint
from internvl_engine.engine.llm import LLM
from internvl_engine.engine.sampling_params import SamplingParams

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_plot_trace():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("plot_trace", BENCHMARKS / "plot_trace.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_a_trace_becomes_a_timeline_png(tmp_path):
    trace = tmp_path / "trace.json"
    llm = LLM(checkpoint(MODELS[0]), dtype=torch.float32, device="cpu", backend="torch", trace_path=str(trace),
              max_vit_tiles_per_step=2)
    image = Image.new("RGB", (900, 448), (30, 120, 200))
    llm.generate([{"prompt": "<image>\nWhat is it?", "images": [image], "max_tiles": 4}, "Tell me a story."],
                 SamplingParams(max_tokens=4, temperature=0.0))
    llm.close()
    module = load_plot_trace()
    events = __import__("json").loads(trace.read_text())["traceEvents"]
    order, names = module.lanes(events)
    assert order[0] == 0 and len(order) == 3  # the engine's steps, then the two requests
    assert sum(1 for e in events if e.get("name") == "vit" and e["tid"] != 0) >= 2  # the image over two slices
    out = tmp_path / "trace.png"
    assert module.main([str(trace), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert module.main([str(tmp_path / "missing.json")]) == 1
