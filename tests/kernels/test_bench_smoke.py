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
    assert out.count("ViT attention:") == len(module.SMOKE.vit) == 2  # two head_dims, as InternViT-6B and 300M
    assert "uint8 upload, pinned" in out and "uint8 upload, pageable" in out  # tile_norm timed with its upload too


def test_bench_kernels_smoke_sets_the_interpreter_itself_without_a_gpu():
    import os
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("with a GPU --smoke runs the compiled kernels")
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(path), "--smoke", "--only", "unshuffle"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "re-running under Triton's interpreter (TRITON_INTERPRET=1)" in done.stderr
    assert "pixel unshuffle" in done.stdout
