"""First runs without surprises: tqdm bars on stderr for the slow parts (random-weight builds, decode-graph capture,
benchmark loops) that `progress=False` / --no-progress turn off, and benchmark files in benchmarks/results/."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from internvl_engine import LLM, SamplingParams
from internvl_engine.models import presets
from internvl_engine.testing.tiny_config import make_config

from golden_utils import MODELS, checkpoint

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
RESULTS = BENCHMARKS / "results"


def load_benchmark(name: str, monkeypatch):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_preset(monkeypatch):
    """A preset with the tiny checkpoints' shapes (the real ones take tens of seconds to fill)."""
    monkeypatch.setitem(presets.PRESETS, "tiny-test", make_config("internvl-chat-v1-5", vocab_size=512))
    return "tiny-test"


# --- random weights ---------------------------------------------------------------------------------------------


def test_build_random_model_shows_a_bar_unless_disabled(tiny_preset, capsys):
    shown = presets.build_random_model(tiny_preset, torch.float32, "cpu", seed=3)
    err = capsys.readouterr().err
    assert "random weights" in err and "100%" in err
    hidden = presets.build_random_model(tiny_preset, torch.float32, "cpu", seed=3, progress=False)
    assert capsys.readouterr().err == ""
    for (name, a), (_, b) in zip(shown.named_parameters(), hidden.named_parameters()):
        assert torch.equal(a, b), name  # the bar changes nothing in the draws


def test_build_random_model_weights_match_randomize(tiny_preset, capsys):
    """The same draws as filling the model with `randomize_` (no bar by default) in parameter order."""
    built = presets.build_random_model(tiny_preset, torch.float32, "cpu", seed=5, progress=False)
    with torch.device("meta"):
        model = presets.InternVLChatModel(presets.preset_config(tiny_preset))
    model = presets.randomize_(model.to_empty(device="cpu"), seed=5)
    assert capsys.readouterr().err == ""
    for (name, a), (_, b) in zip(built.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), name


# --- decode graphs ----------------------------------------------------------------------------------------------


def greedy_tokens(llm: LLM) -> list[list[int]]:
    prompts = ["Hello, who are you?", "Tell me a story.", "What is 2 + 2?"]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0), use_tqdm=False)
    assert all(output.error is None for output in outputs)
    return [output.token_ids for output in outputs]


def static_llm() -> LLM:
    return LLM(checkpoint(MODELS[0]), dtype=torch.float32, device="cpu", backend="torch", static_decode=True,
               max_num_seqs=4)


def test_capture_all_shows_a_bar_over_the_buckets_and_changes_nothing(capsys):
    reference = greedy_tokens(static_llm())
    llm = static_llm()
    graphs = llm.runner.decode_graphs
    assert graphs is not None and not graphs.use_graphs and graphs.buckets == [1, 2, 4]
    cache = llm.runner.cache
    before = [layer[: llm.runner.num_blocks].clone() for layer in cache.keys + cache.values]
    capsys.readouterr()
    graphs.capture_all()
    err = capsys.readouterr().err
    assert "capturing decode graphs" in err and "3/3" in err
    after = [layer[: llm.runner.num_blocks] for layer in cache.keys + cache.values]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # only the scratch block was written
    assert greedy_tokens(llm) == reference
    graphs.capture_all(progress=False)
    graphs.progress = False
    graphs.capture_all()
    assert "capturing decode graphs" not in capsys.readouterr().err


# --- benchmark outputs ------------------------------------------------------------------------------------------


def test_gitignore_lists_the_results_folder():
    lines = (REPO / ".gitignore").read_text().splitlines()
    assert "benchmarks/results/" in lines


def test_results_dir_helper(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import results_dir

    assert results_dir.RESULTS_DIR == RESULTS
    assert Path(results_dir.default_output("x.json")) == RESULTS / "x.json"
    target = results_dir.prepare_output(tmp_path / "new" / "folder" / "x.json")
    assert target.parent.is_dir() and target == (tmp_path / "new" / "folder" / "x.json").resolve()


def test_bench_serving_defaults_to_the_results_folder(monkeypatch):
    bench = load_benchmark("bench_serving", monkeypatch)
    args = bench.build_parser().parse_args([])
    assert Path(args.result_json) == RESULTS / "bench_serving_result.json"
    assert Path(args.plot) == RESULTS / "bench_serving.png"
    assert not args.no_progress
    explicit = bench.build_parser().parse_args(["--result-json", "run.json", "--plot", "", "--no-progress"])
    assert (explicit.result_json, explicit.plot, explicit.no_progress) == ("run.json", "", True)


def test_bench_offline_defaults_to_the_results_folder(monkeypatch):
    bench = load_benchmark("bench_offline", monkeypatch)
    args = bench.build_parser().parse_args([])
    assert Path(args.plot) == RESULTS / "vit_stall.png" and not args.no_progress
    assert bench.build_parser().parse_args(["--plot", "mine.png"]).plot == "mine.png"


def fake_benchmark(bench):
    async def benchmark(args, base_url, images_b64, warmup_images_b64):
        records = [bench.RequestRecord(index=i, ok=True, status=200, ttft_s=0.01, tpot_s=0.002, e2e_s=0.02,
                                       itl_s=[0.002], prompt_tokens=5, output_tokens=2) for i in range(len(images_b64))]
        return "tiny", records, 0.5
    return benchmark


def test_bench_serving_creates_the_default_folder_and_says_where(tmp_path, monkeypatch, capsys):
    bench = load_benchmark("bench_serving", monkeypatch)
    results = tmp_path / "results"
    monkeypatch.setattr(bench, "default_output", lambda name: str(results / name))  # the default, elsewhere
    monkeypatch.setattr(bench, "benchmark", fake_benchmark(bench))
    argv = ["--num-requests", "2", "--warmup", "0", "--image-resolutions", "32x32", "--plot", ""]
    assert bench.main(argv) == 0
    captured = capsys.readouterr()
    written = results / "bench_serving_result.json"
    assert json.loads(written.read_text())["summary"]["completed"] == 2
    assert f"wrote {written}" in captured.out
    assert "encoding images" in captured.err and "encoding images" not in captured.out
    assert bench.main(argv + ["--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_bench_serving_request_bar(monkeypatch, capsys):
    import httpx

    bench = load_benchmark("bench_serving", monkeypatch)
    stream = b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\ndata: [DONE]\n\n'
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=stream))

    async def run(progress: bool):
        async with httpx.AsyncClient(transport=transport) as client:
            return await bench.run_requests(client, "http://test/v1/chat/completions", [b"{}"] * 3, [0.0] * 3, {},
                                            None, progress=progress)

    records, _ = asyncio.run(run(True))
    assert all(record.ok for record in records)
    err = capsys.readouterr().err
    assert "requests" in err and "3/3" in err
    asyncio.run(run(False))
    assert capsys.readouterr().err == ""


def test_bench_scheduler_and_preprocess_bars(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO))
    scheduler_bench = load_benchmark("bench_scheduler", monkeypatch)
    args = Namespace(num_seqs=4, steps=8, block_size=16, min_context=1000, max_context=1100, seed=0)
    scheduler, requests = scheduler_bench.build(args, progress=True)
    assert scheduler.num_running == 4 and "prefill" in capsys.readouterr().err
    scheduler_bench.build(args)
    assert capsys.readouterr().err == ""
    preprocess_bench = load_benchmark("bench_preprocess", monkeypatch)
    medians = preprocess_bench.interleaved_medians_ms({"noop": lambda: None}, 2, progress=True, desc="cell")
    assert set(medians) == {"noop"} and "cell" in capsys.readouterr().err
    preprocess_bench.interleaved_medians_ms({"noop": lambda: None}, 2)
    assert capsys.readouterr().err == ""
