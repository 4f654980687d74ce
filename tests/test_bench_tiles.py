"""benchmarks/bench_tiles.py: images with exactly the asked tile grid, and a short sweep on the tiny checkpoint (TTFT
split by tile count, stream ITL by ViT budget) that writes its JSON and PNGs."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from internvl_engine.preprocessing.tiling import plan_tiles

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_tiles", REPO / "benchmarks" / "bench_tiles.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_tiles", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("tiles", [1, 2, 4, 6, 12, 24, 40])
def test_the_synthetic_image_of_each_count_makes_exactly_that_grid(bench, tiles):
    cols, rows = bench.grid_for(tiles)
    assert cols * rows == tiles and cols >= rows
    plan = plan_tiles(448 * cols, 448 * rows, 1, tiles, 448, use_thumbnail=True)
    assert (plan.cols, plan.rows) == (cols, rows) and plan.num_tiles == tiles + (tiles > 1)


def test_a_short_sweep_writes_json_and_plots(bench, tmp_path, capsys):
    output = tmp_path / "tiles.json"
    code = bench.main(["--tiles", "1,2", "--budgets", "1,4", "--streams", "2", "--stall-tiles", "2",
                       "--warm-steps", "2", "--repeats", "1", "--output", str(output), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "1 -> 1 (1x1), 2 -> 3 (2x1 + thumbnail)" in printed  # the real tile counts
    document = json.loads(output.read_text())
    assert document["meta"]["device"] == "cpu" and document["meta"]["model"] == "tiny demo checkpoint"
    rows = document["ttft_by_tiles"]
    assert [(r["requested_tiles"], r["tiles"], r["grid"], r["image_size"]) for r in rows] == [
        (1, 1, "1x1", "448x448"), (2, 3, "2x1 + thumbnail", "896x448")]
    for row in rows:
        parts = sum(row[key] for key in ("preprocess_s", "queue_s", "vit_s", "prefill_s", "first_token_s"))
        assert row["ttft_s"] > 0 and row["vit_s"] > 0 and row["first_token_s"] > 0
        assert parts == pytest.approx(row["ttft_s"], rel=0.05, abs=0.005)  # the parts make up the TTFT
        assert row["prompt_tokens"] > 256 * row["tiles"] and len(row["runs"]) == 1
    stalls = document["itl_by_vit_budget"]
    assert [(s["budget"], s["tiles"]) for s in stalls] == [(1, 3), (4, 3)]
    assert stalls[0]["vit_steps"] == 3 and stalls[1]["vit_steps"] == 1  # one tile per step, or all at once
    for stall in stalls:
        assert stall["itl_during"] and stall["itl_during_p50_s"] > 0 and stall["itl_during_max_s"] > 0
        assert set(stall) >= {"ttft_s", "preprocess_s", "queue_s", "vit_s", "prefill_s", "itl_before",
                              "itl_before_p50_s", "itl_during_p99_s"}
    for name in ("tiles_ttft.png", "tiles_itl.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_bad_lists_are_refused_by_the_parser(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--tiles", "1,x"])
    assert "--tiles: must be a comma list of positive integers (got 1,x)" in capsys.readouterr().err
