"""benchmarks/bench_kernels.py runs end to end (tiny shapes, Triton interpreter): the GPU run is one command."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_bench_kernels_smoke(capsys, monkeypatch):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_kernels", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    assert module.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "bit-identical to the official recipe: True" in out
    for section in ("ViT attention", "paged decode", "paged prefill", "pixel unshuffle", "tile normalisation",
                    "w8a16 weight-only int8 GEMM"):
        assert section in out
