"""The tiny checkpoint builder: official folder layout, names/shapes equal to the goldens', determinism, caching,
and an InternLM2-style tokenizer. Golden files are read from ../shared/goldens, never copied."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open

from internvl_engine.testing.checkpoint_builder import (MARKER, PRESETS, REMOVE, build_tiny_checkpoint,
                                                default_demo_checkpoint_dir, ensure_tiny_checkpoint, make_config)
from internvl_engine.testing.tiny_tokenizer import CHAT_TOKENS, INTERNVL_TOKENS

from checkpoint_files import diff_paths, read_json, tensors
from golden_utils import goldens_dir

GOLDEN_FOR_PRESET = {"internvl-chat-v1-5": "InternVL-Chat-V1-5-tiny",
                     "mini-internvl-chat-2b-v1-5": "Mini-InternVL-Chat-2B-V1-5-tiny",
                     "mini-internvl-chat-4b-v1-5": "Mini-InternVL-Chat-4B-V1-5-tiny"}
# Fields that pick sizes, not structure: taken from the golden config to build a golden-sized checkpoint.
VISION_SIZES = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size")
LLM_SIZES = VISION_SIZES + ("num_key_value_heads", "rope_scaling")




def _golden_checkpoint(preset: str) -> Path:
    return goldens_dir() / GOLDEN_FOR_PRESET[preset] / "checkpoint"




def _golden_size_overrides(golden_config: dict) -> dict:
    vc, lc = golden_config["vision_config"], golden_config["llm_config"]
    return {"vision_config": {k: vc[k] for k in VISION_SIZES}, "llm_config": {k: lc[k] for k in LLM_SIZES}}


def _shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update((name, tuple(f.get_slice(name).get_shape())) for name in f.keys())
    return out






@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("num_shards", [2, 3])
def test_sharded_layout(tmp_path: Path, preset: str, num_shards: int) -> None:
    folder = build_tiny_checkpoint(tmp_path / "ckpt", preset=preset, num_shards=num_shards)
    for name in ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                 "special_tokens_map.json", "added_tokens.json", "model.safetensors.index.json"):
        assert (folder / name).is_file(), name
    assert not (folder / "model.safetensors").exists()
    index = read_json(folder / "model.safetensors.index.json")
    expected_shards = {f"model-{i:05d}-of-{num_shards:05d}.safetensors" for i in range(1, num_shards + 1)}
    assert set(index["weight_map"].values()) == expected_shards
    assert {p.name for p in folder.glob("*.safetensors")} == expected_shards
    total = 0
    for shard in sorted(expected_shards):
        with safe_open(str(folder / shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert set(f.keys()) == {n for n, s in index["weight_map"].items() if s == shard}
            for name in f.keys():
                tensor = f.get_tensor(name)
                assert tensor.dtype == torch.bfloat16, name
                assert torch.isfinite(tensor.float()).all(), name
                total += tensor.numel() * tensor.element_size()
    assert index["metadata"]["total_size"] == total
    assert sum((folder / s).stat().st_size for s in expected_shards) < 4 * 2**20  # "a couple of MB"


def test_single_shard_has_no_index(tmp_path: Path) -> None:
    folder = build_tiny_checkpoint(tmp_path / "ckpt", num_shards=1)
    assert (folder / "model.safetensors").is_file()
    assert not (folder / "model.safetensors.index.json").exists()
    assert [p.name for p in folder.glob("*.safetensors")] == ["model.safetensors"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_names_and_shapes_equal_golden_at_golden_sizes(tmp_path: Path, preset: str) -> None:
    golden = _golden_checkpoint(preset)
    overrides = _golden_size_overrides(read_json(golden / "config.json"))
    folder = build_tiny_checkpoint(tmp_path / "ckpt", preset=preset, num_shards=3, config_overrides=overrides)
    golden_shapes = _shapes(golden)
    assert set(golden_shapes) == set(read_json(golden.parent / "meta.json")["tensor_names"])
    assert _shapes(folder) == golden_shapes
    assert set(read_json(folder / "model.safetensors.index.json")["weight_map"]) == set(golden_shapes)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_default_sizes_follow_golden_name_patterns(tmp_path: Path, preset: str) -> None:
    """At the preset's own sizes the names are the golden's with the layer indices renumbered."""
    folder = build_tiny_checkpoint(tmp_path / "ckpt", preset=preset, num_shards=1)
    pattern = re.compile(r"\.layers\.\d+\.")
    ours = {pattern.sub(".layers.N.", n) for n in _shapes(folder)}
    assert ours == {pattern.sub(".layers.N.", n) for n in _shapes(_golden_checkpoint(preset))}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_config_has_the_official_fields(preset: str) -> None:
    golden = read_json(_golden_checkpoint(preset) / "config.json")
    ours = make_config(preset, vocab_size=golden["llm_config"]["vocab_size"],
                       overrides=_golden_size_overrides(golden))
    differing = diff_paths(ours, golden)
    # Only the names of the tiny models and the per-release choices the presets deliberately make may differ.
    allowed = {"vision_config._name_or_path", "llm_config._name_or_path", "ps_version", "max_dynamic_patch"}
    phi3 = preset == "mini-internvl-chat-4b-v1-5"
    if phi3:  # where the long su factors start: chosen for our tokenizer's prompt lengths (see tiny_config)
        allowed |= {"llm_config.max_position_embeddings", "llm_config.original_max_position_embeddings"}
    assert differing <= allowed, differing - allowed
    assert ours["llm_config"]["architectures"] == ["Phi3ForCausalLM" if phi3 else "InternLM2ForCausalLM"]
    assert ours["template"] == ("phi3-chat" if phi3 else "internlm2-chat")


def test_preset_specific_config_values(tmp_path: Path) -> None:
    v15 = read_json(build_tiny_checkpoint(tmp_path / "a", num_shards=1) / "config.json")
    mini = read_json(build_tiny_checkpoint(tmp_path / "b", preset="mini-internvl-chat-2b-v1-5",
                                            num_shards=1) / "config.json")
    assert "ps_version" not in v15 and mini["ps_version"] == "v2"  # the released V1.5 config predates ps_version
    assert (v15["max_dynamic_patch"], mini["max_dynamic_patch"]) == (12, 6)
    assert v15["vision_config"]["norm_type"] == "rms_norm" and v15["vision_config"]["qk_normalization"]
    assert mini["vision_config"]["norm_type"] == "layer_norm" and mini["vision_config"]["qkv_bias"]
    for cfg in (v15, mini):
        lc = cfg["llm_config"]
        assert lc["num_key_value_heads"] < lc["num_attention_heads"] and lc["rope_scaling"]["type"] == "dynamic"
        assert cfg["hidden_size"] == lc["hidden_size"]


def test_config_overrides_are_deep_merged_before_weights(tmp_path: Path) -> None:
    overrides = {"ps_version": "v2", "select_layer": -2, "llm_config": {"num_hidden_layers": 3, "hidden_size": 48}}
    folder = build_tiny_checkpoint(tmp_path / "ckpt", num_shards=3, config_overrides=overrides)
    config = read_json(folder / "config.json")
    assert config["ps_version"] == "v2" and config["select_layer"] == -2 and config["hidden_size"] == 48
    assert config["llm_config"]["num_key_value_heads"] == 2  # untouched siblings survive the merge
    shapes = _shapes(folder)
    assert "language_model.model.layers.2.ffn_norm.weight" in shapes
    assert shapes["language_model.model.tok_embeddings.weight"][1] == 48
    removed = make_config("internvl-chat-v1-5", vocab_size=10, overrides={"ps_version": "v1", "template": REMOVE})
    assert removed["ps_version"] == "v1" and "template" not in removed


def test_determinism(tmp_path: Path) -> None:
    a = build_tiny_checkpoint(tmp_path / "a", seed=3)
    b = build_tiny_checkpoint(tmp_path / "b", seed=3)
    c = build_tiny_checkpoint(tmp_path / "c", seed=4)
    for path in sorted(a.iterdir()):
        assert path.read_bytes() == (b / path.name).read_bytes(), path.name
    shards = [p.name for p in a.glob("model-*.safetensors")]
    assert all((a / s).read_bytes() != (c / s).read_bytes() for s in shards)
    assert (a / "tokenizer.model").read_bytes() == (c / "tokenizer.model").read_bytes()
    # Values depend on the seed and the tensor name only, not on how the tensors are sharded.
    one = build_tiny_checkpoint(tmp_path / "one", seed=3, num_shards=1)
    tensors_a, tensors_one = tensors(a), tensors(one)
    assert tensors_a.keys() == tensors_one.keys()
    assert all(torch.equal(tensors_a[k], tensors_one[k]) for k in tensors_a)


def test_overwrite(tmp_path: Path) -> None:
    folder = build_tiny_checkpoint(tmp_path / "ckpt", num_shards=3)
    with pytest.raises(FileExistsError):
        build_tiny_checkpoint(folder)
    build_tiny_checkpoint(folder, num_shards=2, overwrite=True)
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    with pytest.raises(ValueError):
        build_tiny_checkpoint(tmp_path / "x", num_shards=0)
    with pytest.raises(ValueError):
        build_tiny_checkpoint(tmp_path / "y", preset="no-such-preset")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_default_demo_checkpoint_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INTERNVL_ENGINE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".cache" / "internvl_engine" / "demo-internvl-chat-v1-5-seed0"
    assert default_demo_checkpoint_dir() == expected
    monkeypatch.setenv("INTERNVL_ENGINE_CACHE", str(tmp_path / "cache"))
    assert default_demo_checkpoint_dir("mini-internvl-chat-2b-v1-5", 7) == (
        tmp_path / "cache" / "demo-mini-internvl-chat-2b-v1-5-seed7")


def test_ensure_tiny_checkpoint_reuses_and_rebuilds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERNVL_ENGINE_CACHE", str(tmp_path))
    path = ensure_tiny_checkpoint("mini-internvl-chat-2b-v1-5", seed=1)
    assert path == default_demo_checkpoint_dir("mini-internvl-chat-2b-v1-5", 1)
    assert (path / MARKER).is_file() and (path / "config.json").is_file()
    stamps = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    assert ensure_tiny_checkpoint("mini-internvl-chat-2b-v1-5", seed=1) == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == stamps
    (path / MARKER).unlink()  # an interrupted build: incomplete, so it must be rebuilt from scratch
    (path / "stale.txt").write_text("left over")
    assert ensure_tiny_checkpoint("mini-internvl-chat-2b-v1-5", seed=1) == path
    assert (path / MARKER).is_file() and not (path / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary folders left behind


def test_tokenizer_layout_matches_golden(tmp_path: Path) -> None:
    folder = build_tiny_checkpoint(tmp_path / "ckpt", num_shards=1)
    golden = _golden_checkpoint("internvl-chat-v1-5")
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    ref = spm.SentencePieceProcessor(model_file=str(golden / "tokenizer.model"))
    size = sp.get_piece_size()
    assert size == ref.get_piece_size()
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.unk_id() == 0 and sp.bos_id() == 1 and sp.eos_id() == 2 and sp.pad_id() == -1
    assert [sp.id_to_piece(i) for i in range(3, 259)] == [f"<0x{b:02X}>" for b in range(256)]
    assert all(sp.is_byte(i) for i in range(3, 259))
    chat_ids = list(range(size - len(CHAT_TOKENS), size))
    assert [sp.id_to_piece(i) for i in chat_ids] == list(CHAT_TOKENS)
    assert [sp.id_to_piece(i) for i in chat_ids] == [ref.id_to_piece(i) for i in chat_ids]
    prompt = "<|im_start|>user\n你好, who are you?<|im_end|><|im_start|>assistant\n"
    ids = sp.encode(prompt)
    assert ids[0] == sp.piece_to_id("<|im_start|>") and sp.piece_to_id("<|im_end|>") in ids
    assert sp.decode(ids) == prompt
    spaced = "  two  spaces and\ttab\n\nnewlines 12345"
    assert sp.decode(sp.encode(spaced)) == spaced  # identity normalizer: whitespace kept verbatim
    assert not sp.id_to_piece(sp.encode("Hello")[0]).startswith("\u2581")  # no dummy prefix, as in the golden
    assert not ref.id_to_piece(ref.encode("Hello")[0]).startswith("\u2581")

    added = read_json(folder / "added_tokens.json")
    assert sorted(added.values()) == list(range(size, size + len(INTERNVL_TOKENS)))
    assert [tok for tok, _ in sorted(added.items(), key=lambda kv: kv[1])] == list(INTERNVL_TOKENS)
    assert read_json(folder / "config.json")["llm_config"]["vocab_size"] == size + len(added)
    for name in ("added_tokens.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert read_json(folder / name) == read_json(golden / name), name


def test_tiny_tokenizer_alone_for_random_weight_presets(tmp_path):
    from internvl_engine import AutoTokenizer
    from internvl_engine.testing.checkpoint_builder import ensure_tiny_tokenizer

    folder = ensure_tiny_tokenizer(tmp_path / "tokenizer")
    assert ensure_tiny_tokenizer(tmp_path / "tokenizer") == folder  # built once
    assert not list(folder.glob("*.safetensors")) and not (folder / "config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    added = json.loads((folder / "added_tokens.json").read_text(encoding="utf-8"))
    assert set(added) == set(INTERNVL_TOKENS)
    assert tokenizer.encode("<img><IMG_CONTEXT></img>")[1:] == [added[t] for t in ("<img>", "<IMG_CONTEXT>", "</img>")]
