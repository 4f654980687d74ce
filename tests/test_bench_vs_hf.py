"""benchmarks/bench_vs_hf.py: the side-by-side harness end to end with the engine's own chat as the baseline (tiny
checkpoint, CPU), the scratch checkpoint for --hf-code, workload errors in one line, and how rows are measured."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_vs_hf", REPO / "benchmarks" / "bench_vs_hf.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_vs_hf", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


# --- end to end --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_engine_chat_baseline_end_to_end_on_the_tiny_checkpoint(bench, tmp_path, capsys):
    workload = write(tmp_path / "workload.jsonl", [
        "# a 3-tile image and a 1-tile one",
        {"id": "wide", "synthetic": "1280x720", "question": "Describe this image.", "max_num": 2, "max_new_tokens": 5},
        "",
        {"id": "small", "synthetic": "640x480", "question": "What is shown?", "max_num": 1, "max_new_tokens": 4}])
    output = tmp_path / "out" / "report.json"
    code = bench.main(["--baseline", "engine-chat", "--workload", str(workload), "--batch-sizes", "2",
                       "--output", str(output), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    document = json.loads(output.read_text())
    assert document["meta"]["baseline"] == "engine-chat" and document["meta"]["device"] == "cpu"
    assert [item["id"] for item in document["workload"]] == ["wide", "small"]
    modes = [(e["side"], e["mode"], e["batch_size"]) for e in document["results"]]
    assert modes == [("baseline", "chat", 1), ("baseline", "batch_chat", 2), ("engine", "chat", 1),
                     ("engine", "generate", 2)]
    for entry in document["results"]:
        assert entry["agreement"] == {"exact": 2, "total": 2, "rate": 1.0, "first_divergence": {}}, entry["mode"]
        for key in ("requests_per_s", "output_tokens_per_s", "wall_s", "peak_memory_bytes"):
            assert entry[key] > 0, key
        for key in ("ttft_s", "tpot_s", "e2e_s"):
            assert set(entry[key]) == {"mean", "p50", "p90", "max"} and entry[key]["mean"] > 0, key
        assert entry["memory_kind"].startswith("peak RSS")
        rows = {row["id"]: row for row in entry["per_request"]}
        assert rows["wide"]["tiles"] == 3 and rows["small"]["tiles"] == 1
        assert 1 <= rows["wide"]["output_tokens"] <= 5 and rows["wide"]["match"]
        assert rows["wide"]["ttft_s"] <= rows["wide"]["e2e_s"]
    table = output.with_suffix(".md").read_text()
    assert "| side / mode |" in table and "engine LLM.generate (max_num_seqs 2)" in table and "2/2" in table
    assert table.splitlines()[-1] in printed or "side / mode" in printed
    for name in ("report_latency_by_tiles.png", "report_throughput_by_batch.png"):
        assert (output.parent / name).read_bytes()[:8] == PNG_MAGIC


# --- the checkpoint transformers loads -----------------------------------------------------------------------------


def fake_checkpoint(root: Path, with_code: bool = False) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"auto_map": {
        "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
        "AutoModel": "modeling_internvl_chat.InternVLChatModel"}}))
    (root / "tokenizer_config.json").write_text(json.dumps({"auto_map": {
        "AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}}))
    (root / "model.safetensors").write_bytes(b"weights")
    (root / "old.py").write_text("# stale code: replaced by --hf-code's")
    if with_code:
        for name in ("configuration_internvl_chat", "modeling_internvl_chat", "tokenization_internlm2"):
            (root / f"{name}.py").write_text("# remote code\n")
    return root


def code_folder(root: Path, names=("configuration_internvl_chat", "modeling_internvl_chat", "tokenization_internlm2",
                                   "modeling_intern_vit")) -> Path:
    root.mkdir(parents=True)
    for name in names:
        (root / f"{name}.py").write_text(f"# {name}\n")
    return root


def test_hf_code_makes_a_scratch_copy_with_symlinked_weights(bench, tmp_path):
    checkpoint = fake_checkpoint(tmp_path / "ckpt")
    code = code_folder(tmp_path / "code")
    scratch = bench.hf_checkpoint(checkpoint, code, tmp_path / "scratch")
    assert scratch == tmp_path / "scratch" / "ckpt-hf"
    for name in ("config.json", "tokenizer_config.json", "model.safetensors"):
        assert (scratch / name).is_symlink() and (scratch / name).resolve() == (checkpoint / name).resolve()
    copied = sorted(path.name for path in scratch.glob("*.py"))
    assert copied == sorted(path.name for path in code.glob("*.py"))  # old.py is not carried over
    assert not any((scratch / name).is_symlink() for name in copied)
    (code / "extra.py").write_text("# new\n")
    again = bench.hf_checkpoint(checkpoint, code, tmp_path / "scratch")  # rebuilt, not stacked
    assert (again / "extra.py").exists() and (checkpoint / "model.safetensors").read_bytes() == b"weights"


def test_a_checkpoint_with_its_code_is_used_as_it_is(bench, tmp_path):
    checkpoint = fake_checkpoint(tmp_path / "ckpt", with_code=True)
    assert bench.hf_checkpoint(checkpoint, None, tmp_path / "scratch") == checkpoint
    assert not (tmp_path / "scratch").exists()


@pytest.mark.parametrize("case, message", [
    ("no code", "has no remote code (configuration_internvl_chat.py, modeling_internvl_chat.py, "
                "tokenization_internlm2.py missing): pass --hf-code DIR"),
    ("empty code folder", "no *.py files there"),
    ("code folder lacks a module", "lacks modeling_internvl_chat.py (named by the checkpoint's auto_map)"),
    ("not a checkpoint", "is not a checkpoint folder (no config.json)"),
    ("foreign scratch folder", "is not a scratch copy of this benchmark"),
])
def test_hf_checkpoint_problems_are_one_line(bench, tmp_path, case, message):
    checkpoint = fake_checkpoint(tmp_path / "ckpt")
    code = None
    if case == "empty code folder":
        code = tmp_path / "code"
        code.mkdir()
    elif case == "code folder lacks a module":
        code = code_folder(tmp_path / "code", ("configuration_internvl_chat", "tokenization_internlm2"))
    elif case == "not a checkpoint":
        (checkpoint / "config.json").unlink()
    elif case == "foreign scratch folder":
        code = code_folder(tmp_path / "code")
        (tmp_path / "scratch" / "ckpt-hf").mkdir(parents=True)
    with pytest.raises(bench.BenchError) as caught:
        bench.hf_checkpoint(checkpoint, code, tmp_path / "scratch")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_hf_baseline_without_remote_code_stops_with_one_line(bench, tmp_path, capsys):
    checkpoint = fake_checkpoint(tmp_path / "ckpt")
    code = bench.main(["--model", str(checkpoint), "--output", str(tmp_path / "r.json"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("bench_vs_hf: error: ") and "pass --hf-code DIR" in err


# --- the workload --------------------------------------------------------------------------------------------------


def test_the_default_workload_and_a_file_parse(bench, tmp_path):
    default = bench.load_workload(None)
    assert len(default) == 8 and {item.size for item in default} == {(3840, 2160), (1920, 1080), (1280, 720)}
    image = tmp_path / "photo.png"
    image.write_bytes(b"not checked here")
    items = bench.load_workload(str(write(tmp_path / "w.jsonl", [
        {"image": "photo.png", "question": "q1"},
        {"id": "x", "synthetic": "800x600", "question": "q2", "max_num": 40, "max_new_tokens": 3, "seed": 9},
        {"question": "text only"}])))
    assert [(i.id, i.image, i.size, i.max_num, i.max_new_tokens, i.seed) for i in items] == [
        ("0", str(image.resolve()), None, 12, 64, 0), ("x", None, (800, 600), 40, 3, 9),
        ("2", None, None, 12, 64, 2)]


@pytest.mark.parametrize("line, message", [
    ("{not json", "w.jsonl:2: not JSON"),
    ('["a list"]', "w.jsonl:2: a request must be a JSON object, got list"),
    ('{"question": "q", "maxnum": 3}', "w.jsonl:2: unknown key(s) maxnum"),
    ('{"max_num": 3}', "w.jsonl:2: 'question' must be a non-empty string"),
    ('{"question": "q", "max_num": 41}', "w.jsonl:2: 'max_num' must be an integer between 1 and 40, got 41"),
    ('{"question": "q", "max_new_tokens": 0}', "w.jsonl:2: 'max_new_tokens' must be an integer >= 1, got 0"),
    ('{"question": "q", "max_num": true}', "'max_num' must be an integer between 1 and 40, got True"),
    ('{"question": "q", "synthetic": "8k"}', "w.jsonl:2: 'synthetic' must be one of 4k, 1080p, 720p or WxH"),
    ('{"question": "q", "image": "missing.png"}', "missing.png' does not exist"),
    ('{"question": "q", "image": "a.png", "synthetic": "4k"}', "give 'image' or 'synthetic', not both"),
    ('{"id": "a", "question": "q"}', "w.jsonl: duplicate request id(s) a"),
])
def test_workload_errors_name_the_line_in_one_line(bench, tmp_path, line, message):
    path = write(tmp_path / "w.jsonl", [{"id": "a", "question": "fine"}, line])
    with pytest.raises(bench.BenchError) as caught:
        bench.load_workload(str(path))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_an_empty_or_missing_workload_is_one_line_from_main(bench, tmp_path, capsys):
    empty = write(tmp_path / "empty.jsonl", ["# nothing", ""])
    assert bench.main(["--workload", str(empty), "--baseline", "engine-chat", "--no-progress"]) == 2
    assert capsys.readouterr().err == f"bench_vs_hf: error: {empty}: the workload has no requests\n"
    missing = tmp_path / "nope.jsonl"
    assert bench.main(["--workload", str(missing), "--baseline", "engine-chat", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bench_vs_hf: error: {missing}: cannot read the workload") and err.count("\n") == 1


# --- measurement ---------------------------------------------------------------------------------------------------


def test_rows_cut_at_the_stop_token_and_count_its_step(bench):
    item = bench.Item("a", "q", max_new_tokens=6)
    record = bench.row(item, [5, 6, 7, 99, 0, 0], 99, start=10.0, first=11.0, end=11.3, tiles=3)
    assert record["tokens"] == [5, 6, 7] and record["output_tokens"] == 3
    assert record["ttft_s"] == pytest.approx(1.0) and record["e2e_s"] == pytest.approx(1.3)
    assert record["tpot_s"] == pytest.approx(0.1)  # 3 intervals: the stop token came with the 4th step
    short = bench.row(bench.Item("b", "q", max_new_tokens=2), [5, 6, 7], 99, 0.0, 1.0, 2.0, 1)
    assert short["tokens"] == [5, 6] and short["tpot_s"] == pytest.approx(1.0)  # a batch ran past its limit
    assert bench.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert bench.first_divergence([1, 9, 3], [1, 2, 3]) == 1
    assert bench.first_divergence([1, 2], [1, 2, 3]) == 2


def test_transformers_rows_drop_the_seeded_ids_and_time_each_row(bench):
    """What ChatSide reads from transformers: sequences led by the ids generate seeds (a BOS column in 4.37),
    padded after each row's stop token, and one streamer time per decoding step."""
    side = bench.ChatSide.__new__(bench.ChatSide)
    side.spec, side.stop_id = {"kind": "hf"}, 99
    streamer = side.streamer()
    streamer.put(torch.tensor([[1], [1]]))  # the seeded ids
    for _ in range(4):
        streamer.put(torch.tensor([0, 0]))
    side.token_times = [1.0, 1.5, 2.0, 2.5]
    side.sequences = torch.tensor([[1, 5, 99, 2, 2], [1, 6, 7, 8, 9]])
    items = [bench.Item("a", "q", max_new_tokens=4), bench.Item("b", "q", max_new_tokens=4)]
    first, second = side._rows(items, start=0.5, end=3.0, tiles=[3, 0])
    assert side.prompt_length == 1
    assert first["tokens"] == [5] and first["e2e_s"] == pytest.approx(1.0)  # finished with its stop token at 1.5
    assert first["ttft_s"] == pytest.approx(0.5) and first["tpot_s"] == pytest.approx(0.5)
    assert second["tokens"] == [6, 7, 8, 9] and second["e2e_s"] == pytest.approx(2.0)

