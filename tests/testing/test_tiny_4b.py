"""The tiny Mini-InternVL-Chat-4B-V1.5 preset (InternViT-300M + MLP projector + Phi-3-mini-128k): the official
folder layout, tensor names / dtypes / shapes and config fields mirroring the golden tiny checkpoint made by the
official code, a Llama-2 style tokenizer with Phi-3's and InternVL's added tokens, determinism, and loading by the
engine. Golden files are read from ../shared/goldens, never copied."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors import safe_open

from internvl_engine.testing.checkpoint_builder import (END_ROW_SCALE, MARKER, PRESETS, build_tiny_checkpoint,
                                                        default_demo_checkpoint_dir, ensure_tiny_checkpoint,
                                                        ensure_tiny_tokenizer, make_config)
from internvl_engine.testing.tiny_phi3_tokenizer import PHI3_TOKENS, RSTRIP_TOKENS
from internvl_engine.testing.tiny_tokenizer import INTERNVL_TOKENS, _fields

from checkpoint_files import diff_paths, read_json, tensors
from golden_utils import goldens_dir

PRESET = "mini-internvl-chat-4b-v1-5"
FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
         "special_tokens_map.json", "added_tokens.json")
TOKENIZER_JSON = ("added_tokens.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
VISION_SIZES = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size")
LLM_SIZES = VISION_SIZES + ("num_key_value_heads", "rope_scaling")
POSITIONS = ("max_position_embeddings", "original_max_position_embeddings")
NAMES = {"vision_config._name_or_path", "llm_config._name_or_path"}


def _golden() -> Path:
    return goldens_dir() / "Mini-InternVL-Chat-4B-V1-5-tiny" / "checkpoint"




def _golden_meta() -> dict:
    return read_json(_golden().parent / "meta.json")


def _size_overrides(golden_config: dict, positions: bool = False) -> dict:
    vc, lc = golden_config["vision_config"], golden_config["llm_config"]
    llm_keys = LLM_SIZES + (POSITIONS if positions else ())
    return {"vision_config": {k: vc[k] for k in VISION_SIZES}, "llm_config": {k: lc[k] for k in llm_keys}}


def _specs(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) over all shards."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                out[name] = (tuple(piece.get_shape()), piece.get_dtype())
    return out






def _proto_field(model_proto: bytes, number: int) -> bytes:
    return next(payload for n, _, payload, _ in _fields(model_proto) if n == number)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The preset at its own sizes, seed 0, two shards (the default build)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny4b") / "ckpt", preset=PRESET)


def test_preset_is_listed_wherever_presets_are_chosen() -> None:
    from internvl_engine.config import MODEL_PRESETS

    assert PRESET in PRESETS and PRESETS[PRESET].is_phi3
    assert not any(PRESETS[name].is_phi3 for name in PRESETS if name != PRESET)
    assert set(MODEL_PRESETS) <= set(PRESETS)  # every CLI/server `choices` entry can be built


def test_sharded_layout(checkpoint: Path) -> None:
    for name in (*FILES, "model.safetensors.index.json"):
        assert (checkpoint / name).is_file(), name
    index = read_json(checkpoint / "model.safetensors.index.json")
    shards = {f"model-{i:05d}-of-00002.safetensors" for i in (1, 2)}
    assert set(index["weight_map"].values()) == shards == {p.name for p in checkpoint.glob("*.safetensors")}
    total = 0
    for shard in sorted(shards):
        with safe_open(str(checkpoint / shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                tensor = f.get_tensor(name)
                assert tensor.dtype == torch.bfloat16 and torch.isfinite(tensor.float()).all(), name
                total += tensor.numel() * tensor.element_size()
    assert index["metadata"]["total_size"] == total
    assert total < 4 * 2**20


def test_names_dtypes_shapes_equal_golden_at_golden_sizes(tmp_path: Path) -> None:
    golden = _golden()
    overrides = _size_overrides(read_json(golden / "config.json"))
    folder = build_tiny_checkpoint(tmp_path / "ckpt", preset=PRESET, num_shards=1, config_overrides=overrides)
    golden_specs = _specs(golden)
    assert set(golden_specs) == set(_golden_meta()["tensor_names"])
    assert _specs(folder) == golden_specs
    assert not any(name.endswith(".bias") for name in golden_specs if name.startswith("language_model."))


def test_own_sizes_follow_golden_names_and_config(checkpoint: Path) -> None:
    pattern = re.compile(r"\.layers\.\d+\.")
    ours = _specs(checkpoint)
    assert {pattern.sub(".layers.N.", n) for n in ours} == {pattern.sub(".layers.N.", n) for n in _specs(_golden())}
    cfg = read_json(checkpoint / "config.json")
    vc, lc = cfg["vision_config"], cfg["llm_config"]
    hidden, heads, kv, inter = (lc[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                "intermediate_size"))
    head_dim, vocab, c = hidden // heads, lc["vocab_size"], vc["hidden_size"]
    for i in range(lc["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}"
        assert ours[f"{p}.self_attn.qkv_proj.weight"][0] == ((heads + 2 * kv) * head_dim, hidden)
        assert ours[f"{p}.self_attn.o_proj.weight"][0] == (hidden, heads * head_dim)
        assert ours[f"{p}.mlp.gate_up_proj.weight"][0] == (2 * inter, hidden)
        assert ours[f"{p}.mlp.down_proj.weight"][0] == (hidden, inter)
    assert ours["language_model.model.embed_tokens.weight"][0] == ours["language_model.lm_head.weight"][0] == (
        vocab, hidden)
    assert ours["mlp1.1.weight"][0] == (hidden, 4 * c) and ours["mlp1.3.weight"][0] == (hidden, hidden)
    # The vision tower is the Mini-2B preset's tiny one.
    assert vc == make_config("mini-internvl-chat-2b-v1-5", vocab_size=10)["vision_config"]


def test_config_has_the_official_fields() -> None:
    golden = read_json(_golden() / "config.json")
    vocab = golden["llm_config"]["vocab_size"]
    # At the golden's sizes only the model names and the preset's own positions (O, M) differ ...
    ours = make_config(PRESET, vocab_size=vocab, overrides=_size_overrides(golden))
    assert diff_paths(ours, golden) == NAMES | {f"llm_config.{k}" for k in POSITIONS}
    # ... and with those too, only the names: every other field and value is the official code's.
    ours = make_config(PRESET, vocab_size=vocab, overrides=_size_overrides(golden, positions=True))
    assert diff_paths(ours, golden) == NAMES
    # Without overrides the preset's factor lists have the same end points as the golden's.
    lists = make_config(PRESET, vocab_size=vocab, overrides={"llm_config": {"hidden_size": 64}})
    assert lists["llm_config"]["rope_scaling"] == golden["llm_config"]["rope_scaling"]


def test_preset_config_values(checkpoint: Path) -> None:
    cfg = read_json(checkpoint / "config.json")
    lc, vc = cfg["llm_config"], cfg["vision_config"]
    assert lc["architectures"] == ["Phi3ForCausalLM"] and lc["model_type"] == "phi3"
    assert cfg["template"] == "phi3-chat" and cfg["ps_version"] == "v2" and cfg["max_dynamic_patch"] == 12
    assert cfg["hidden_size"] == lc["hidden_size"] and "bias" not in lc and lc["tie_word_embeddings"] is False
    assert lc["num_key_value_heads"] == lc["num_attention_heads"]  # plain MHA, as Phi-3-mini
    scaling, half = lc["rope_scaling"], lc["hidden_size"] // lc["num_attention_heads"] // 2
    assert scaling["type"] == "su" and len(scaling["short_factor"]) == len(scaling["long_factor"]) == half
    assert scaling["short_factor"][0] == 1.0 and scaling["long_factor"][-1] == 48.3
    assert all(a < b for a, b in zip(scaling["long_factor"], scaling["long_factor"][1:]))
    original = lc["original_max_position_embeddings"]
    assert lc["max_position_embeddings"] == 32 * original  # Phi-3-mini-128k's ratio 131072 / 4096
    assert lc["sliding_window"] == 262144 and lc["rope_theta"] == 10000.0 and lc["rms_norm_eps"] == 1e-5
    added = read_json(checkpoint / "added_tokens.json")
    assert lc["bos_token_id"] == 1 and lc["eos_token_id"] == lc["pad_token_id"] == added["<|endoftext|>"]
    assert lc["vocab_size"] == 1000 + len(added) == 1020
    assert vc["norm_type"] == "layer_norm" and vc["qkv_bias"] and not vc["qk_normalization"]


def test_end_row_of_the_output_head_is_scaled(checkpoint: Path) -> None:
    head = tensors(checkpoint)["language_model.lm_head.weight"].float()
    end = read_json(checkpoint / "added_tokens.json")["<|end|>"]
    norms = head.norm(dim=1)
    others = torch.cat([norms[:end], norms[end + 1:]])
    assert norms[end] > 0.75 * END_ROW_SCALE * others.median()
    assert norms[end] > others.max()


def test_tokenizer_files_mirror_the_golden(checkpoint: Path) -> None:
    golden = _golden()
    for name in TOKENIZER_JSON:  # same sizes as the golden's vocab, so the same bytes
        assert (checkpoint / name).read_bytes() == (golden / name).read_bytes(), name
    added = read_json(checkpoint / "added_tokens.json")
    order = [tok for tok, _ in sorted(added.items(), key=lambda kv: kv[1])]
    assert order == [*PHI3_TOKENS, *INTERNVL_TOKENS] and sorted(added.values()) == list(range(1000, 1020))
    config = read_json(checkpoint / "tokenizer_config.json")
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["legacy"] is False
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert config["eos_token"] == config["pad_token"] == "<|endoftext|>" and config["bos_token"] == "<s>"
    decoder = config["added_tokens_decoder"]
    assert set(decoder) == {"0", "1", *map(str, added.values())}
    for entry in decoder.values():
        assert entry["special"] is True
        assert entry["rstrip"] is (entry["content"] in RSTRIP_TOKENS), entry
    assert {decoder[str(added[t])]["content"] for t in RSTRIP_TOKENS} == set(PHI3_TOKENS) - {"<|endoftext|>"}
    golden_ids = _golden_meta()["special_token_ids"]
    assert {t: i for t, i in golden_ids.items() if i >= 1000} == added


def test_sentencepiece_model_is_llama_style(checkpoint: Path) -> None:
    proto = (checkpoint / "tokenizer.model").read_bytes()
    golden = (_golden() / "tokenizer.model").read_bytes()
    # NormalizerSpec: "identity", dummy prefix on, extra whitespace kept, exactly as Llama-2's (and the golden's).
    assert _proto_field(proto, 3) == _proto_field(golden, 3)
    trainer = {n: v for n, v, _, _ in _fields(_proto_field(proto, 2)) if v >= 0}
    golden_trainer = {n: v for n, v, _, _ in _fields(_proto_field(golden, 2)) if v >= 0}
    # model_type BPE, vocab size, split_digits, allow_whitespace_only_pieces, byte_fallback, unk/bos/eos/pad ids.
    for number in (3, 4, 25, 26, 35, 40, 41, 42, 43):
        assert trainer[number] == golden_trainer[number], number
    assert 31 not in {n for n, *_ in _fields(_proto_field(proto, 2))}  # no user-defined pieces

    sp = spm.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    assert sp.get_piece_size() == 1000
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.unk_id() == 0 and sp.bos_id() == 1 and sp.eos_id() == 2 and sp.pad_id() == -1
    assert [sp.id_to_piece(i) for i in range(3, 259)] == [f"<0x{b:02X}>" for b in range(256)]
    assert all(sp.is_byte(i) for i in range(3, 259)) and sp.piece_to_id("\u2581") > 258
    assert not any(sp.id_to_piece(i).startswith("<|") for i in range(sp.get_piece_size()))
    assert sp.encode("Hello", out_type=str)[0].startswith("\u2581")  # dummy prefix
    spaced = "  two  spaces and\ttab\n\nnewlines 12345"
    assert sp.decode(sp.encode(spaced)) == spaced  # identity normalizer: whitespace kept verbatim
    assert sp.encode("12345", out_type=str)[-5:] == list("12345")  # digits split
    assert sp.decode(sp.encode("你好 (ü) 😀")) == "你好 (ü) 😀"  # byte fallback


def test_engine_tokenizer_reads_the_files(checkpoint: Path) -> None:
    llama_tokenizer = pytest.importorskip("internvl_engine.text.llama_tokenizer")
    tokenizer = llama_tokenizer.load_tokenizer(checkpoint)
    assert type(tokenizer).__name__ == "LlamaTokenizer" and len(tokenizer) == 1020
    added = read_json(checkpoint / "added_tokens.json")
    for token in ("<|end|>", "<IMG_CONTEXT>", "<|endoftext|>", "<|user|>", "<img>", "</box>"):
        assert tokenizer.convert_tokens_to_ids(token) == added[token]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 1000, 1000)
    # The golden's examples: the same added-token ids in the same places (the pieces between them are this
    # tokenizer's own), and the same decoded text.
    meta = _golden_meta()["tokenizer"]
    for text, golden_ids in meta["example_encodings"].items():
        ids = tokenizer.encode(text)
        assert [i for i in ids if i >= 1000 or i == 1] == [i for i in golden_ids if i >= 1000 or i == 1], text
        expected = meta["example_decode_skip_special_tokens"][text]
        assert tokenizer.decode(ids, skip_special_tokens=True) == expected, text


def test_image_prompts_reach_the_long_rope_factors(checkpoint: Path) -> None:
    """O is chosen so that text prompts stay on the short factors, a one-tile prompt switches while decoding
    and a two-tile prompt is long from the prefill."""
    llama_tokenizer = pytest.importorskip("internvl_engine.text.llama_tokenizer")
    from internvl_engine.text.templates import build_prompt, expand_image_placeholders

    tokenizer = llama_tokenizer.load_tokenizer(checkpoint)
    original = read_json(checkpoint / "config.json")["llm_config"]["original_max_position_embeddings"]

    def length(question: str, tiles: list[int]) -> int:
        return len(tokenizer.encode(expand_image_placeholders(build_prompt("phi3-chat", question), tiles)))

    assert length("Hello, who are you?", []) < original // 2
    one_tile = length("<image>\nDescribe this image in detail.", [1])
    assert original - 32 < one_tile <= original
    assert length("<image>\nDescribe this image in detail.", [2]) > original


def test_determinism(tmp_path: Path, checkpoint: Path) -> None:
    again = build_tiny_checkpoint(tmp_path / "again", preset=PRESET)
    for path in sorted(checkpoint.iterdir()):
        assert path.read_bytes() == (again / path.name).read_bytes(), path.name
    other = build_tiny_checkpoint(tmp_path / "other", preset=PRESET, seed=1, num_shards=3)
    assert (other / "tokenizer.model").read_bytes() == (checkpoint / "tokenizer.model").read_bytes()
    ours, theirs = tensors(checkpoint), tensors(other)
    assert ours.keys() == theirs.keys()
    assert not any(torch.equal(ours[k], theirs[k]) for k in ours)  # every tensor depends on the seed
    one = tensors(build_tiny_checkpoint(tmp_path / "one", preset=PRESET, num_shards=1))
    assert all(torch.equal(ours[k], one[k]) for k in ours)  # values do not depend on the sharding


def test_ensure_tiny_checkpoint_and_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERNVL_ENGINE_CACHE", str(tmp_path / "cache"))
    path = ensure_tiny_checkpoint(PRESET, seed=2)
    assert path == default_demo_checkpoint_dir(PRESET, 2) == tmp_path / "cache" / f"demo-{PRESET}-seed2"
    assert (path / MARKER).is_file() and read_json(path / "config.json")["template"] == "phi3-chat"
    assert ensure_tiny_checkpoint(PRESET, seed=2) == path
    tokenizer = ensure_tiny_tokenizer(preset=PRESET)
    assert tokenizer == tmp_path / "cache" / "tiny-tokenizer-phi3"
    assert not list(tokenizer.glob("*.safetensors")) and not (tokenizer / "config.json").exists()
    for name in ("tokenizer.model", *TOKENIZER_JSON):
        assert (tokenizer / name).read_bytes() == (path / name).read_bytes(), name
    assert ensure_tiny_tokenizer() == tmp_path / "cache" / "tiny-tokenizer"  # the InternLM2 one, apart
    assert "<|end|>" not in read_json(ensure_tiny_tokenizer() / "added_tokens.json")
    with pytest.raises(ValueError):
        ensure_tiny_tokenizer(preset="no-such-preset")


class _CausalAttention:
    """The KV-cache interface for one forward over a whole sequence: causal attention, no past."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_loads_and_runs(checkpoint: Path) -> None:
    from internvl_engine.models.loader import load_model

    model = load_model(checkpoint, dtype=torch.float32)
    added = read_json(checkpoint / "added_tokens.json")
    assert model.img_context_token_id == added["<IMG_CONTEXT>"]
    assert type(model.language_model).__name__ == "Phi3ForCausalLM"
    pixels = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = model.extract_feature(pixels)
        hidden = read_json(checkpoint / "config.json")["llm_config"]["hidden_size"]
        assert features.shape == (1, 256, hidden) and torch.isfinite(features).all()
        ids = torch.tensor([[1, added["<|user|>"], added["<img>"], *[added["<IMG_CONTEXT>"]] * 256,
                             added["</img>"], 13, 500, 600, added["<|end|>"], added["<|assistant|>"]]])
        embeds = model.language_model.embed(ids)
        image = ids[0] == added["<IMG_CONTEXT>"]
        embeds[0, image] = features[0].to(embeds.dtype)
        positions = torch.arange(ids.shape[1])[None]
        logits = {}
        for length in (ids.shape[1], 10_000):  # short factors, then long ones (past O)
            out = model.language_model(embeds, positions, _CausalAttention(), [length])
            logits[length] = model.language_model.logits(out)
            assert logits[length].shape == (1, ids.shape[1], 1020) and torch.isfinite(logits[length]).all()
        assert not torch.allclose(logits[ids.shape[1]], logits[10_000])


def test_greedy_answers_end_at_end_token(checkpoint: Path) -> None:
    """The scaled `<|end|>` row makes random-weight chat answers stop (chat() stops only at `<|end|>`), as the
    demo needs: most of a few greedy answers end before 48 tokens."""
    from internvl_engine.engine.llm import LLM
    from internvl_engine.engine.sampling_params import SamplingParams
    from PIL import Image

    llm = LLM(checkpoint, dtype=torch.float32, device="cpu")
    image = Image.new("RGB", (448, 448), (200, 30, 90))
    requests = [{"prompt": q, "images": images, "max_tiles": 12}
                for images in ([image], []) for q in ("Describe this image in detail.", "What color is it?")]
    outputs = llm.generate(requests, SamplingParams(max_tokens=48, temperature=0.0))
    assert all(o.error is None for o in outputs)
    assert sum(o.finish_reason == "stop" for o in outputs) >= 3, [(len(o.token_ids), o.finish_reason) for o in outputs]
