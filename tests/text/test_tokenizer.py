"""InternLM2Tokenizer reproduces the official tokenizer's ids and texts (goldens from ../shared/goldens)."""
from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from internvl_engine.text.tokenizer import AddedToken, InternLM2Tokenizer

from golden_utils import MODELS, golden_json, goldens_dir

INTERNLM2_MODELS = MODELS[:2]  # the 4B's Llama-style tokenizer: tests/text/test_llama_tokenizer.py

STOP = "<|im_end|>"




golden = golden_json


@lru_cache(maxsize=None)
def tokenizer(model: str) -> InternLM2Tokenizer:
    return InternLM2Tokenizer.from_pretrained(goldens_dir() / model / "checkpoint")


def chat_cases() -> list[tuple[str, str]]:
    return [(m, case) for m in INTERNLM2_MODELS for case in golden(m)["chat"]]


def ntk_cases() -> list[tuple[str, str]]:
    return [(m, case) for m in INTERNLM2_MODELS if (goldens_dir() / m / "goldens_ntk_fp32.json").is_file()
            for case, spec in golden(m, "ntk_fp32").items() if isinstance(spec, dict) and "input_ids" in spec]


@pytest.mark.parametrize("model,case", chat_cases())
def test_input_ids_match_goldens(model: str, case: str) -> None:
    spec, tok = golden(model)["chat"][case], tokenizer(model)
    if spec["call"]["api"] == "batch_chat":
        tok.padding_side = spec["call"]["padding_side"]
        try:
            enc = tok(spec["prompt_expanded"], padding=True, return_tensors="pt")
        finally:
            tok.padding_side = "right"
        assert enc["input_ids"].tolist() == spec["input_ids"]
        assert enc["attention_mask"].tolist() == spec["attention_mask"]
        assert tok.pad_token_id == spec["call"]["pad_token_id"]
    else:
        enc = tok(spec["prompt_expanded"][0], return_tensors="pt")
        assert enc.input_ids.tolist() == spec["input_ids"]
        assert enc.attention_mask.tolist() == spec["attention_mask"]


@pytest.mark.parametrize("model,case", chat_cases())
def test_decoding_matches_goldens(model: str, case: str) -> None:
    spec, tok = golden(model)["chat"][case], tokenizer(model)
    assert [tok.decode(ids, skip_special_tokens=True) for ids in spec["generated_ids"]] == spec["decoded_raw"]
    texts = tok.batch_decode(torch.tensor(spec["generate_output_raw"]), skip_special_tokens=True)
    expected = spec["responses"] if "responses" in spec else [spec["response"]]
    assert [t.split(STOP)[0].strip() for t in texts] == expected
    assert spec["generate_output_raw"][0][0] == tok.bos_token_id
    assert tok.convert_tokens_to_ids(STOP) == spec["eos_token_id"]


@pytest.mark.parametrize("model,case", ntk_cases())
def test_ntk_prompts(model: str, case: str) -> None:
    spec, tok = golden(model, "ntk_fp32")[case], tokenizer(model)
    assert tok([spec["prompt"]])["input_ids"] == spec["input_ids"]
    texts = tok.batch_decode(spec["generated_ids"], skip_special_tokens=True)
    assert texts[0].split(STOP)[0].strip() == spec["response"]


@pytest.mark.parametrize("model", INTERNLM2_MODELS)
def test_vocabulary_and_special_ids(model: str) -> None:
    tok, ckpt = tokenizer(model), goldens_dir() / model / "checkpoint"
    llm = json.loads((ckpt / "config.json").read_text())["llm_config"]
    added = json.loads((ckpt / "added_tokens.json").read_text())
    assert len(tok) == llm["vocab_size"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (llm["bos_token_id"], llm["eos_token_id"],
                                                                      llm["pad_token_id"])
    assert tok.convert_tokens_to_ids(list(added)) == list(added.values())
    assert all(tok.added_tokens_encoder[t] == i for t, i in added.items())
    assert tok.convert_ids_to_tokens(list(added.values())) == list(added)
    assert tok.convert_tokens_to_ids("no-such-piece-anywhere") == tok.unk_token_id == 0
    assert tok.vocab_size <= min(added.values())
    assert set(tok.all_special_ids) >= set(added.values()) | {tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}


ROUND_TRIP = ["Hello, who are you?", "请描述这张图片。你好，世界", "tabs\tand  double  spaces   ", "\n\nline one\nline two\n",
              "  leading and trailing  ", "mixed 中文 and English 123", "emoji 🙂 and bytes \u3000 ａ"]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_plain_text(text: str) -> None:
    tok = tokenizer(MODELS[0])
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids[1:]) == text
    assert tok.convert_tokens_to_ids(tok.tokenize(text)) == ids[1:]


@pytest.mark.parametrize("text,spaced,plain", [
    ("a<img><IMG_CONTEXT></img>b", "a <img> <IMG_CONTEXT> </img> b", "ab"),
    ("x <img> y", "x  <img>  y", "x  y"),
    ("<box>1 2</box><ref> cat </ref>", "<box> 1 2 </box> <ref>  cat  </ref>", "1 2 cat "),
])
def test_round_trip_image_tokens(text: str, spaced: str, plain: str) -> None:
    """InternVL's added tokens lie past the sentencepiece vocab: they decode as standalone pieces, joined by
    spaces unless spaces_between_special_tokens=False, and vanish with skip_special_tokens."""
    tok = tokenizer(MODELS[0])
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, spaces_between_special_tokens=False) == text
    assert tok.decode(ids) == spaced
    assert tok.decode(ids, skip_special_tokens=True) == plain


def test_special_tokens_are_cut_out_before_sentencepiece() -> None:
    tok = tokenizer(MODELS[0])
    sp = tok.sp_model
    text = "Hi <|im_start|>user\n<img><IMG_CONTEXT></img> there<|im_end|>"
    expected = (sp.encode("Hi ", out_type=str) + ["<|im_start|>"] + sp.encode("user\n", out_type=str)
                + ["<img>", "<IMG_CONTEXT>", "</img>"] + sp.encode(" there", out_type=str) + ["<|im_end|>"])
    assert tok.tokenize(text) == expected
    assert tok.encode(text, add_special_tokens=False) == tok.convert_tokens_to_ids(expected)
    assert tok.tokenize("<s>x</s>") == ["<s>", "x", "</s>"]
    assert tok.tokenize("<<img>>") == sp.encode("<", out_type=str) + ["<img>"] + sp.encode(">", out_type=str)


def test_decode_keeps_official_spacing_quirks() -> None:
    """InternLM2's convert_tokens_to_string puts a space before the text preceding a special token and always runs
    the English clean-up, whatever clean_up_tokenization_spaces says."""
    tok = tokenizer(MODELS[0])
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False)
    assert tok.decode(ids) == " <|im_start|> user\nHi<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi"
    assert tok.decode([tok.bos_token_id] + ids) == " <s><|im_start|> user\nHi<|im_end|>"
    assert tok.decode(tok.encode("Hello , world . It 's", add_special_tokens=False)) == "Hello, world. It's"
    assert tok.clean_up_tokenization_spaces is False


def test_decode_input_forms() -> None:
    tok = tokenizer(MODELS[0])
    ids = tok.encode("describe the image")
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids) == tok.decode(tuple(ids))
    assert tok.batch_decode(torch.tensor([ids, ids])) == [tok.decode(ids)] * 2
    assert tok.decode(ids[2]) == tok.decode([ids[2]])
    assert tok.convert_ids_to_tokens(ids, skip_special_tokens=True) == tok.tokenize("describe the image")
    with pytest.raises(IndexError, match="outside the vocabulary"):
        tok.decode([len(tok) + 5])
    with pytest.raises(ValueError, match="batch_decode"):
        tok.decode([ids, ids])


def test_call_padding_and_tensors() -> None:
    tok = tokenizer(MODELS[0])
    short, long = tok.encode("hi"), tok.encode("a longer question here")
    enc = tok(["hi", "a longer question here"], padding=True)
    pad = [tok.pad_token_id] * (len(long) - len(short))
    assert enc["input_ids"] == [short + pad, long]
    assert enc["attention_mask"] == [[1] * len(short) + [0] * len(pad), [1] * len(long)]
    tok.padding_side = "left"
    try:
        assert tok(["hi", "a longer question here"], padding="longest")["input_ids"][0] == pad + short
    finally:
        tok.padding_side = "right"
    assert tok("hi") == {"input_ids": short, "attention_mask": [1] * len(short)}
    assert tok("hi", add_special_tokens=False)["input_ids"] == short[1:]
    pt = tok("hi", return_tensors="pt")
    assert pt.input_ids.dtype == torch.long and pt.input_ids.shape == (1, len(short))
    with pytest.raises(ValueError, match="padding=True"):
        tok(["hi", "a longer question here"], return_tensors="pt")
    with pytest.raises(ValueError, match="return_tensors"):
        tok("hi", return_tensors="np")


def _copy_checkpoint(tmp_path: Path, skip: tuple[str, ...] = ()) -> Path:
    src = goldens_dir() / MODELS[0] / "checkpoint"
    for name in ("tokenizer.model", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"):
        if name not in skip:
            shutil.copy(src / name, tmp_path / name)
    return tmp_path


def test_missing_or_broken_model_file(tmp_path: Path) -> None:
    folder = _copy_checkpoint(tmp_path, skip=("tokenizer.model",))
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        InternLM2Tokenizer.from_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="tokenizer.model"):
        InternLM2Tokenizer.from_pretrained(folder)


def test_legacy_checkpoint_without_added_tokens_decoder(tmp_path: Path) -> None:
    """Older checkpoints only have added_tokens.json + special_tokens_map.json; ids must not change."""
    folder = _copy_checkpoint(tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for key in ("added_tokens_decoder", "additional_special_tokens"):
        config.pop(key)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    legacy, reference = InternLM2Tokenizer.from_pretrained(folder), tokenizer(MODELS[0])
    assert legacy.added_tokens_encoder == reference.added_tokens_encoder
    assert len(legacy) == len(reference)
    for case in ("two_images_separate", "text_multiturn"):
        spec = golden(MODELS[0])["chat"][case]
        assert legacy(spec["prompt_expanded"])["input_ids"] == spec["input_ids"]


def test_added_token_strip_flags() -> None:
    """lstrip/rstrip make an added token swallow neighbouring spaces (transformers semantics)."""
    base = tokenizer(MODELS[0])
    decoder = {**base.added_tokens_decoder, len(base): AddedToken("<x>", lstrip=True, rstrip=True)}
    tok = InternLM2Tokenizer(base.vocab_file, added_tokens_decoder=decoder,
                             additional_special_tokens=base.additional_special_tokens)
    assert tok.tokenize("a  <x>  b") == ["a", "<x>", "b"]
    assert tok.decode(tok.encode("a  <x>  b", add_special_tokens=False)) == "a <x> b"
    assert len(tok) == len(base) + 1
