"""benchmarks/bench_serving.py runs end to end against a server it spawns (tiny checkpoint): one command."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_bench_serving_spawns_a_server_and_reports(tmp_path, monkeypatch, capsys):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_serving.py"
    spec = importlib.util.spec_from_file_location("bench_serving", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_serving", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    result, plot = tmp_path / "result.json", tmp_path / "plot.png"
    status = module.main(["--spawn", "--server-args", "--tiny --backend torch", "--num-requests", "6",
                          "--request-rate", "20", "--max-tokens", "4", "--ignore-eos", "--image-resolutions",
                          "720p,640x480", "--max-tiles", "2", "--slo-ttft-ms", "60000",
                          "--result-json", str(result), "--plot", str(plot)])
    assert status == 0, capsys.readouterr()
    summary = json.loads(result.read_text())["summary"]
    assert summary["completed"] == 6 and summary["failed"] == 0
    assert summary["total_output_tokens"] == 6 * 4
    assert summary["good_requests"] == 6
    assert all(summary[key]["median"] > 0 for key in ("ttft_ms", "tpot_ms", "e2e_ms"))
    assert plot.stat().st_size > 10_000
    assert "Request throughput" in capsys.readouterr().out
