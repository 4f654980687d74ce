"""LlamaTokenizer (Mini-InternVL-Chat-4B-V1.5) reproduces transformers 4.37.2's slow LlamaTokenizer.

The oracle is the official run in ../shared/goldens/Mini-InternVL-Chat-4B-V1-5-tiny (ids of every prompt, decoded
outputs, responses). The flag tests build their expectations from those goldens or from the plain sentencepiece
model and the rules transformers documents (AddedToken strip flags, legacy prefix handling, special tokens)."""
from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from internvl_engine.engine.detokenizer import IncrementalDetokenizer
from internvl_engine.text.llama_tokenizer import (LlamaTokenizer, TokenizerFileError, TokenizerFileMissing,
                                                  load_tokenizer, tokenizer_kind)
from internvl_engine.text.tokenizer import AddedToken, InternLM2Tokenizer

from golden_utils import MODELS, goldens_dir, golden_json

MODEL = "Mini-InternVL-Chat-4B-V1-5-tiny"
STOP = "<|end|>"  # template phi3-chat: chat() cuts the decoded text at template.sep.strip()
FILES = ("tokenizer.model", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json", "config.json")


def ckpt() -> Path:
    return goldens_dir() / MODEL / "checkpoint"


@lru_cache(maxsize=None)
def tokenizer() -> LlamaTokenizer:
    return LlamaTokenizer.from_pretrained(ckpt())


@lru_cache(maxsize=None)
def plain_sp() -> spm.SentencePieceProcessor:
    """The sentencepiece model as stored (dummy prefix on): what legacy=True encodes every chunk with."""
    return spm.SentencePieceProcessor(model_file=str(ckpt() / "tokenizer.model"))


def variant(**overrides) -> LlamaTokenizer:
    return LlamaTokenizer.from_pretrained(ckpt(), **overrides)


def with_tokens(*tokens: AddedToken, **options) -> LlamaTokenizer:
    """The golden tokenizer plus extra added tokens (ids past the table), built through the constructor."""
    base = tokenizer()
    decoder = dict(base.added_tokens_decoder)
    for offset, token in enumerate(tokens):
        decoder[len(base) + offset] = token
    specials = {"bos_token": base.bos_token, "eos_token": base.eos_token, "unk_token": base.unk_token,
                "pad_token": base.pad_token}
    return LlamaTokenizer(base.vocab_file, added_tokens_decoder=decoder, special_tokens=specials,
                          additional_special_tokens=base.additional_special_tokens,
                          legacy=options.get("legacy", False))


def chat_cases() -> list[tuple[str, str]]:
    fp32 = [("fp32", case) for case in golden_json(MODEL)["chat"]]
    su = [("su_fp32", case) for case, spec in golden_json(MODEL, "su_fp32").items()
          if isinstance(spec, dict) and "input_ids" in spec]
    return fp32 + su


def case_spec(kind: str, case: str) -> dict:
    data = golden_json(MODEL, kind)
    return data["chat"][case] if kind == "fp32" else data[case]


# ---- the goldens ----
@pytest.mark.parametrize("kind,case", chat_cases())
def test_input_ids_match_goldens(kind: str, case: str) -> None:
    spec, tok = case_spec(kind, case), tokenizer()
    prompts = spec["prompt_expanded"] if kind == "fp32" else spec["prompts"]
    api = spec["call"]["api"] if kind == "fp32" else spec["api"]
    if api == "batch_chat":  # the official batch_chat: padding_side 'left', padding=True, pad id = <|endoftext|>
        assert len(prompts) > 1
        tok.padding_side = "left"
        try:
            enc = tok(prompts, padding=True, return_tensors="pt")
        finally:
            tok.padding_side = "right"
        if kind == "fp32":
            assert tok.pad_token_id == spec["call"]["pad_token_id"]
    else:
        assert len(prompts) == 1
        enc = tok(prompts[0], return_tensors="pt")
    assert enc["input_ids"].tolist() == spec["input_ids"]
    assert enc["attention_mask"].tolist() == spec["attention_mask"]


@pytest.mark.parametrize("kind,case", chat_cases())
def test_decoding_matches_goldens(kind: str, case: str) -> None:
    spec, tok = case_spec(kind, case), tokenizer()
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in spec["generated_ids"]]
    if "decoded_raw" in spec:
        assert texts == spec["decoded_raw"]
    if "generate_output_raw" in spec:  # what chat() decoded: batch_decode of generate's output
        texts = tok.batch_decode(torch.tensor(spec["generate_output_raw"]), skip_special_tokens=True)
    expected = spec["responses"] if "responses" in spec else [spec["response"]]
    assert [t.split(STOP)[0].strip() for t in texts] == expected
    assert tok.convert_tokens_to_ids(STOP) == spec["eos_token_id"]


def test_vocabulary_and_special_ids() -> None:
    tok = tokenizer()
    llm = json.loads((ckpt() / "config.json").read_text())["llm_config"]
    added = json.loads((ckpt() / "added_tokens.json").read_text())
    config = json.loads((ckpt() / "tokenizer_config.json").read_text())
    assert len(tok) == llm["vocab_size"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (llm["bos_token_id"], llm["eos_token_id"],
                                                                      llm["pad_token_id"])
    assert tok.convert_tokens_to_ids(list(added)) == list(added.values())
    assert tok.convert_ids_to_tokens(list(added.values())) == list(added)
    assert tok.convert_tokens_to_ids("no-such-piece-anywhere") == tok.unk_token_id == 0
    # all_special_tokens = bos/eos/unk(/pad) + additional_special_tokens, not every added token flagged special
    flagged = {t["content"] for t in config["added_tokens_decoder"].values() if t["special"]}
    listed = {config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    listed |= set(config["additional_special_tokens"])
    assert set(tok.all_special_tokens) == listed and flagged > listed
    assert tok.legacy is (config["legacy"] if config.get("legacy") is not None else True)


def test_prompt_start_and_role_tokens_follow_the_goldens() -> None:
    """From the official ids: [<s>, ▁, <|system|>, ...] (legacy=False keeps the prefix ▁ before an added token that
    is not in all_special_tokens), the rstrip role token swallows the '\\n', and the text after it has no ▁."""
    spec, tok = golden_json(MODEL)["chat"]["text_single"], tokenizer()
    ids = spec["input_ids"][0]
    assert tok.convert_ids_to_tokens(ids[:3]) == ["<s>", "\u2581", "<|system|>"]
    assert "<|system|>" not in tok.all_special_tokens
    assert tok.tokenize(spec["prompt_expanded"][0]) == tok.convert_ids_to_tokens(ids[1:])
    user = ids.index(tok.convert_tokens_to_ids("<|user|>"))
    end = ids.index(tok.convert_tokens_to_ids(STOP), user)
    question = tok.convert_ids_to_tokens(ids[user + 1:end])
    assert not question[0].startswith("\u2581") and "\n" not in "".join(question)
    assert "".join(question).replace("\u2581", " ") == spec["call"]["question"]


# ---- flags on synthetic cases ----
def test_legacy_true_false_and_none() -> None:
    """transformers' own example (T5/Llama docstring): with legacy=True the text after an added token gets a dummy
    prefix ▁; with legacy=False it does not. legacy missing/None means True."""
    text = "Hello <|end|>."
    new, old = variant(legacy=False).tokenize(text), variant(legacy=True).tokenize(text)
    cut_new, cut_old = new.index("<|end|>"), old.index("<|end|>")
    assert old[cut_old + 1:] == plain_sp().encode(".", out_type=str)  # legacy: chunk encoded as is, ▁ in front
    assert new[cut_new + 1:] == ["."]
    assert old[:cut_old] == plain_sp().encode("Hello ", out_type=str) == new[:cut_new]
    assert variant(legacy=None).legacy is True
    assert variant(legacy=None).tokenize(text) == old


def test_special_token_at_the_start() -> None:
    """legacy=False drops the prefix ▁ only before tokens of all_special_tokens (bos, additional specials)."""
    tok = tokenizer()
    tokens = tok.tokenize("<s>Hi")
    assert tokens[0] == "<s>" and "".join(tokens[1:]) == "Hi"
    assert tok.tokenize("<img>x")[:2] == ["<img>", "x"]
    assert tok.tokenize("<|user|>x")[:2] == ["\u2581", "<|user|>"]  # special=true in the file, but not listed
    assert tok.encode("<img>x")[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<img>")]


def test_text_after_an_added_token_has_no_prefix() -> None:
    tok = tokenizer()
    after = tok.tokenize("<img>Hello")[1:]
    assert after[0] == "H" and "".join(after) == "Hello"
    assert tok.tokenize("<img> Hello")[1:] == tok.tokenize(" Hello")[1:]  # a real space is kept, as ▁


def test_literal_prefix_character_becomes_a_space() -> None:
    tok = tokenizer()
    assert tok.tokenize("a\u2581b") == tok.tokenize("a b")


def test_rstrip_and_lstrip_swallow_whitespace() -> None:
    tok = with_tokens(AddedToken("<x>", lstrip=True, rstrip=True), AddedToken("<y>"))
    assert tok.tokenize("a  \t<x>  \n b") == tok.tokenize("a<x>b")
    assert tok.tokenize("a  <y>  b") != tok.tokenize("a<y>b")
    after = tok.tokenize("a<y>  b")
    assert "".join(after[after.index("<y>") + 1:]).replace("\u2581", " ") == "  b"
    # rstrip of the checkpoint's role tokens: every whitespace after them goes, newlines included
    assert tokenizer().tokenize("<|user|>\n \n Hi") == tokenizer().tokenize("<|user|>Hi")
    assert tokenizer().tokenize("<img>\nHi") != tokenizer().tokenize("<img>Hi")  # <img> has no rstrip


def test_single_word_token_only_matches_whole_words() -> None:
    tok = with_tokens(AddedToken("<w>", single_word=True))
    assert "<w>" in tok.tokenize("a <w> b")
    assert "<w>" not in tok.tokenize("a<w> b")  # glued to the word on its left, encoded by sentencepiece


def test_normalized_flag_changes_nothing() -> None:
    """The slow tokenizer only lower-cases with `normalized` (do_lower_case), which Llama does not have."""
    a = with_tokens(AddedToken("<Q>", normalized=True))
    b = with_tokens(AddedToken("<Q>", normalized=False))
    assert a.tokenize("Hi <Q> There") == b.tokenize("Hi <Q> There")


def test_add_bos_and_eos_flags() -> None:
    tok = tokenizer()
    body = tok.encode("Hi there", add_special_tokens=False)
    assert tok.encode("Hi there") == [tok.bos_token_id] + body
    assert variant(add_bos_token=False).encode("Hi there") == body
    assert variant(add_eos_token=True).encode("Hi there") == [tok.bos_token_id] + body + [tok.eos_token_id]
    assert tok.encode("") == [tok.bos_token_id]


def test_flags_are_read_from_the_config(tmp_path: Path) -> None:
    folder = copy_checkpoint(tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(add_bos_token=False, add_eos_token=True, clean_up_tokenization_spaces=True, padding_side="left")
    config.pop("legacy")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = LlamaTokenizer.from_pretrained(folder)
    assert (tok.add_bos_token, tok.add_eos_token, tok.legacy, tok.padding_side) == (False, True, True, "left")
    assert tok.encode("Hi")[-1] == tok.eos_token_id and tok.encode("Hi")[0] != tok.bos_token_id
    assert tok.decode(tok.encode("a , b .", add_special_tokens=False)) == "a, b."


def test_skip_special_tokens_drops_only_all_special_ids() -> None:
    """<|end|> and the other role tokens are added tokens flagged special, but not special tokens of the slow
    tokenizer: they survive skip_special_tokens (the goldens' decoded_raw keeps '<|end|>')."""
    tok = tokenizer()
    assert any(STOP in text for case in golden_json(MODEL)["chat"].values() for text in case["decoded_raw"])
    ids = [tok.bos_token_id] + tok.encode("<|user|>\nHi<|end|><img><IMG_CONTEXT></img>", add_special_tokens=False)
    ids.append(tok.pad_token_id)
    kept = tok.convert_ids_to_tokens(ids, skip_special_tokens=True)
    assert kept == [t for t in tok.convert_ids_to_tokens(ids) if t not in tok.all_special_tokens]
    assert "<|user|>" in kept and "<|end|>" in kept and "<img>" not in kept and "<s>" not in kept
    assert tok.decode(ids, skip_special_tokens=True) == "<|user|> Hi <|end|>"


def test_spaces_between_special_tokens() -> None:
    """Standalone pieces (non-special added tokens, additional specials past the vocab) are joined with ' ' by
    default — 4.37.2 ignores the config's `spaces_between_special_tokens: false`, as the goldens show."""
    tok = tokenizer()
    config = json.loads((ckpt() / "tokenizer_config.json").read_text())
    spec = golden_json(MODEL)["chat"]["text_single"]
    ids = spec["generated_ids"][0]
    assert config["spaces_between_special_tokens"] is False
    assert tok.decode(ids, skip_special_tokens=True) == spec["decoded_raw"][0]
    joined = tok.decode(ids, skip_special_tokens=True, spaces_between_special_tokens=False)
    assert joined == spec["decoded_raw"][0].replace(" " + STOP, STOP)
    text_ids = tok.encode("a<img><IMG_CONTEXT></img>b", add_special_tokens=False)
    assert tok.decode(text_ids, spaces_between_special_tokens=False) == "a<img><IMG_CONTEXT></img>b"
    assert tok.decode(text_ids) == "a <img> <IMG_CONTEXT> </img> b"


@pytest.mark.parametrize("text", ["Hello, who are you?", "请描述这张图片。你好，世界", "tabs\tand  double  spaces   ",
                                  "\n\nline one\nline two\n", "  leading and trailing  ", "emoji 🙂 and ａ"])
def test_round_trip_plain_text(text: str) -> None:
    tok = tokenizer()
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.convert_tokens_to_ids(tok.tokenize(text)) == ids[1:]


def test_incremental_detokenizer_matches_full_decode() -> None:
    tok = tokenizer()
    sequences = [ids for case in golden_json(MODEL)["chat"].values() for ids in case["generated_ids"]]
    for ids in sequences:
        detok = IncrementalDetokenizer(tok)
        pieces = [detok.update(ids[: n + 1]) for n in range(len(ids))]
        full = tok.decode(ids, skip_special_tokens=True)
        assert "".join(pieces) == detok.text
        assert detok.text == full or (full.startswith(detok.text) and full.endswith("\ufffd"))


# ---- interface ----
def test_same_public_interface_as_internlm2() -> None:
    public = {n for n in dir(InternLM2Tokenizer) if not n.startswith("_")} | {"__call__", "__len__"}
    missing = {n for n in public if not hasattr(LlamaTokenizer, n)}
    missing |= {n for n in ("vocab_file", "sp_model", "add_bos_token", "add_eos_token", "padding_side", "bos_token",
                            "eos_token", "unk_token", "pad_token", "additional_special_tokens",
                            "clean_up_tokenization_spaces") if not hasattr(tokenizer(), n)}
    assert not missing


def test_call_padding_and_tensors() -> None:
    tok = tokenizer()
    short, long = tok.encode("hi"), tok.encode("a longer question here")
    pad = [tok.pad_token_id] * (len(long) - len(short))
    assert tok(["hi", "a longer question here"], padding=True)["input_ids"] == [short + pad, long]
    tok.padding_side = "left"
    try:
        enc = tok(["hi", "a longer question here"], padding="longest")
    finally:
        tok.padding_side = "right"
    assert enc["input_ids"][0] == pad + short and enc["attention_mask"][0] == [0] * len(pad) + [1] * len(short)
    assert tok("hi") == {"input_ids": short, "attention_mask": [1] * len(short)}
    assert tok("hi", return_tensors="pt").input_ids.shape == (1, len(short))
    with pytest.raises(ValueError, match="padding=True"):
        tok(["hi", "a longer question here"], return_tensors="pt")
    assert tok.decode(torch.tensor(long)) == tok.decode(long) == tok.decode(tuple(long))
    with pytest.raises(IndexError, match="outside the vocabulary"):
        tok.decode([len(tok) + 5])
    with pytest.raises(ValueError, match="batch_decode"):
        tok.decode([long, long])


# ---- files, errors, factory ----
def copy_checkpoint(tmp_path: Path, skip: tuple[str, ...] = ()) -> Path:
    for name in FILES:
        if name not in skip:
            shutil.copy(ckpt() / name, tmp_path / name)
    return tmp_path


def test_missing_or_corrupt_files(tmp_path: Path) -> None:
    folder = copy_checkpoint(tmp_path, skip=("tokenizer.model",))
    with pytest.raises(TokenizerFileMissing, match="tokenizer.model") as missing:
        LlamaTokenizer.from_pretrained(folder)
    assert isinstance(missing.value, ValueError) and isinstance(missing.value, FileNotFoundError)
    (folder / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerFileError, match="tokenizer.model"):
        LlamaTokenizer.from_pretrained(folder)
    shutil.copy(ckpt() / "tokenizer.model", folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerFileError, match="tokenizer_config.json"):
        LlamaTokenizer.from_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"x": {"content": "<a>"}}}))
    with pytest.raises(TokenizerFileError, match="tokenizer_config.json"):
        LlamaTokenizer.from_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"5": {"lstrip": True}}}))
    with pytest.raises(TokenizerFileError, match="tokenizer_config.json"):
        LlamaTokenizer.from_pretrained(folder)
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "added_tokens.json").write_text(json.dumps({"<a>": "7"}))
    with pytest.raises(TokenizerFileError, match="added_tokens.json"):
        LlamaTokenizer.from_pretrained(folder)
    with pytest.raises(TokenizerFileMissing):
        LlamaTokenizer.from_pretrained(tmp_path / "nowhere")


def test_checkpoint_without_added_tokens_decoder(tmp_path: Path) -> None:
    """Older files: added_tokens.json gives the ids, special_tokens_map.json the specials; such tokens carry no
    strip flags (transformers builds them with rstrip=lstrip=False)."""
    folder = copy_checkpoint(tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for key in ("added_tokens_decoder", "additional_special_tokens", "eos_token", "pad_token"):
        config.pop(key)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    legacy_files, reference = LlamaTokenizer.from_pretrained(folder), tokenizer()
    assert legacy_files.added_tokens_encoder == reference.added_tokens_encoder
    assert len(legacy_files) == len(reference)
    assert legacy_files.all_special_tokens == reference.all_special_tokens  # eos/pad/extras from the map
    assert not any(t.rstrip for t in legacy_files.added_tokens_decoder.values())
    assert legacy_files.tokenize("<|user|>Hi") == reference.tokenize("<|user|>Hi")
    assert legacy_files.tokenize("<|user|>\nHi") != reference.tokenize("<|user|>\nHi")


def test_load_tokenizer_picks_the_class(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(ckpt(), trust_remote_code=True, use_fast=False), LlamaTokenizer)
    assert all(type(load_tokenizer(goldens_dir() / m / "checkpoint")) is InternLM2Tokenizer for m in MODELS[:2])
    folder = copy_checkpoint(tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("tokenizer_class")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert tokenizer_kind(folder) == "llama"  # from config.json: llm_config.architectures = Phi3ForCausalLM
    (folder / "config.json").write_text(json.dumps({"llm_config": {"architectures": ["InternLM2ForCausalLM"]}}))
    assert tokenizer_kind(folder) == "internlm2"
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizerFast"}))
    assert tokenizer_kind(folder / "tokenizer.model") == "llama"
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "Qwen2Tokenizer"}))
    with pytest.raises(TokenizerFileError, match="Qwen2Tokenizer"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").unlink()
    (folder / "config.json").unlink()
    assert tokenizer_kind(folder) == "internlm2"
