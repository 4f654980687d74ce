"""Llama-2-style sentencepiece tokenizer without `transformers`: the slow `LlamaTokenizer` of transformers 4.37.2.

Mini-InternVL-Chat-4B-V1.5 (Phi-3-mini LLM) is read by the official code with
`AutoTokenizer.from_pretrained(path, trust_remote_code=True, use_fast=False)`, which gives transformers' slow
`LlamaTokenizer` plus the checkpoint's added tokens. Ids must match it exactly, so this module reproduces the
machinery that shapes ids and text, driven by the checkpoint's files rather than by Phi-3's particular values:

- Added tokens (every entry of the added-token table, special or not) are cut out of the text before sentencepiece
  runs, leftmost and longest first as 4.37's trie does; each remaining chunk is encoded on its own. Per token,
  `rstrip` / `lstrip` swallow all whitespace (newlines included) on that side and `single_word` glues the token to
  an adjoining word, in transformers' order. `normalized` changes nothing here: the slow tokenizer only uses it to
  lower-case, and Llama has no `do_lower_case`. `split_special_tokens=True` turns the cutting off.
- `legacy=False` (None means True, as in 4.37): sentencepiece runs without its dummy prefix; the whole text gets a
  `▁` in front (literal `▁` in the text become spaces), which is dropped again only when the next token is one of
  `all_special_tokens`; a chunk starting with a space is encoded behind the unk token, which is then removed, so
  its leading space survives. Text right after an added token therefore gets no `▁`.
  `legacy=True`: the sentencepiece model as stored, each chunk encoded as is (dummy prefix included).
- Which tokens are "special" (skipped by `skip_special_tokens`, and the `▁` rule above) is `all_special_tokens`:
  bos/eos/unk/sep/pad/cls/mask plus `additional_special_tokens` — not every added token whose `special` flag is set
  (tokens read from `added_tokens_decoder` never reach 4.37's `_add_tokens`, which alone widens that list).
- Decoding follows 4.37's `_decode`: added tokens that are not special, and additional special tokens past the
  sentencepiece vocab, are standalone pieces joined with " " when `spaces_between_special_tokens` (a decode
  argument defaulting to True: 4.37.2 ignores the config's value); the rest goes through Llama's
  `convert_tokens_to_string` (one leading `▁` of each run dropped, a space before special tokens only when
  legacy). `clean_up_tokenization_spaces` comes from the config unless given.

Cutting, id conversion, `__call__` and `_decode` are `SentencePieceTokenizerBase` (sentencepiece_base), shared
with `InternLM2Tokenizer`; this class adds the Llama parts named above. `load_tokenizer(folder)` picks this class
or `InternLM2Tokenizer` from the checkpoint's files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import sentencepiece as spm

from .sentencepiece_base import SentencePieceTokenizerBase
from .tokenizer import InternLM2Tokenizer
from .tokenizer_files import _SPECIAL_ATTRS, VOCAB_FILE, AddedToken, checkpoint_folder

SPIECE_UNDERLINE = "\u2581"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"
# LlamaTokenizer.__init__ defaults (4.37.2); `None` = not set.
_LLAMA_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
                   "sep_token": None, "cls_token": None, "mask_token": None}
# A ModelProto field 3 (normalizer_spec) holding only field 3 (add_dummy_prefix) = false. Protobuf parsers merge a
# repeated singular message field into the earlier one, so appending this to a serialized model is exactly
# transformers' `model.normalizer_spec.MergeFrom(NormalizerSpec(add_dummy_prefix=False))`, without protobuf.
_NO_DUMMY_PREFIX = bytes([(3 << 3) | 2, 2, (3 << 3) | 0, 0])
# from_pretrained keyword arguments that override tokenizer_config.json (transformers: init_kwargs.update(kwargs)).
_OVERRIDABLE = ("legacy", "add_bos_token", "add_eos_token", "clean_up_tokenization_spaces", "padding_side",
                "split_special_tokens", "sp_model_kwargs", "additional_special_tokens", *_SPECIAL_ATTRS)


class TokenizerFileError(ValueError):
    """A tokenizer file of a checkpoint is unreadable or malformed; the message names the file."""


class TokenizerFileMissing(TokenizerFileError, FileNotFoundError):
    """A tokenizer file the checkpoint needs is absent (also a FileNotFoundError)."""


def _content(value: Any) -> str | None:
    """The text of a token given as a string, an AddedToken or a dict with `content` (None stays None)."""
    if isinstance(value, AddedToken):
        return value.content
    return value["content"] if isinstance(value, dict) else value


def _read_json_object(path: Path, required: bool = False) -> dict:
    if not path.is_file():
        if required:
            raise TokenizerFileMissing(f"{path} not found")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerFileError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerFileError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _parse_added(value: Any, path: Path, special: bool = False) -> AddedToken:
    """An added token as the files store it: a string, or a dict with `content` and flags (`__type` allowed)."""
    if isinstance(value, dict):
        if not isinstance(value.get("content"), str):
            raise TokenizerFileError(f"{path}: added token {value!r} has no string 'content'")
        flags = {k: bool(value[k]) for k in ("lstrip", "rstrip", "single_word", "normalized", "special")
                 if k in value}
        return AddedToken(value["content"], **{"special": special, **flags})
    if isinstance(value, str):
        return AddedToken(value, normalized=not special, special=special)
    raise TokenizerFileError(f"{path}: expected a token string or object, got {value!r}")


def _check_special(value: Any, key: str, path: Path) -> Any:
    if value is None or isinstance(value, str) or (isinstance(value, dict) and isinstance(value.get("content"), str)):
        return value
    raise TokenizerFileError(f"{path}: {key} must be a string, a token object or null, got {value!r}")


def read_llama_tokenizer_files(folder: str | Path) -> dict[str, Any]:
    """`LlamaTokenizer` keyword arguments from a checkpoint folder, read as transformers 4.37.2's `_from_pretrained`.

    tokenizer_config.json gives the flags; its `added_tokens_decoder` (when present) is the added-token table and
    special_tokens_map.json / added_tokens.json are then not read. Older checkpoints without it: special_tokens_map.json
    overrides the special tokens and extends `additional_special_tokens`, and added_tokens.json gives the ids (a
    token is special there iff it is one of the special tokens)."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    config = _read_json_object(config_path)
    specials = {k: _check_special(config[k], k, config_path) for k in _SPECIAL_ATTRS if k in config}
    listed = config.get("additional_special_tokens") or []
    if not isinstance(listed, list):
        raise TokenizerFileError(f"{config_path}: additional_special_tokens must be a list, got {listed!r}")
    additional = [_parse_added(t, config_path, special=True) for t in listed]
    if "added_tokens_decoder" in config:
        table = config["added_tokens_decoder"]
        if not isinstance(table, dict):
            raise TokenizerFileError(f"{config_path}: added_tokens_decoder must be an object of id -> token")
        decoder = {}
        for index, token in table.items():
            try:
                decoder[int(index)] = _parse_added(token, config_path)
            except ValueError as exc:
                if isinstance(exc, TokenizerFileError):
                    raise
                raise TokenizerFileError(f"{config_path}: added_tokens_decoder key {index!r} is not an id") from None
    else:
        map_path = folder / SPECIAL_TOKENS_MAP_FILE
        for key, value in _read_json_object(map_path).items():
            if key == "additional_special_tokens" and isinstance(value, list):
                known = {t.content for t in additional}
                additional += [t for t in (_parse_added(v, map_path, special=True) for v in value)
                               if t.content not in known]
            elif key in _SPECIAL_ATTRS:
                specials[key] = _check_special(value, key, map_path)
        named = {t.content for t in additional} | {_content(v) for v in specials.values() if v is not None}
        added_path = folder / ADDED_TOKENS_FILE
        decoder = {}
        for content, index in _read_json_object(added_path).items():
            if not isinstance(index, int) or isinstance(index, bool):
                raise TokenizerFileError(f"{added_path}: the id of {content!r} must be an integer, got {index!r}")
            special = content in named
            decoder[index] = AddedToken(content, normalized=not special, special=special)
    kwargs = {k: config[k] for k in ("legacy", "add_bos_token", "add_eos_token", "clean_up_tokenization_spaces",
                                     "padding_side", "split_special_tokens", "sp_model_kwargs") if k in config}
    return dict(vocab_file=folder / VOCAB_FILE, added_tokens_decoder=decoder, special_tokens=specials,
                additional_special_tokens=additional, **kwargs)


class LlamaTokenizer(SentencePieceTokenizerBase):
    """Encode/decode exactly like transformers 4.37.2's slow `LlamaTokenizer` with the checkpoint's added tokens."""

    def __init__(self, vocab_file: str | Path, added_tokens_decoder: dict[int, AddedToken] | None = None,
                 special_tokens: dict[str, str | dict | AddedToken | None] | None = None,
                 additional_special_tokens: Sequence[str | AddedToken] = (), add_bos_token: bool = True,
                 add_eos_token: bool = False, clean_up_tokenization_spaces: bool = False,
                 legacy: bool | None = None, padding_side: str = "right", split_special_tokens: bool = False,
                 sp_model_kwargs: dict[str, Any] | None = None) -> None:
        self.vocab_file = str(vocab_file)
        self.legacy = True if legacy is None else bool(legacy)
        self.sp_model_kwargs = dict(sp_model_kwargs or {})
        self.sp_model = self._load_sentencepiece(Path(vocab_file), self.legacy, self.sp_model_kwargs)
        self.add_bos_token, self.add_eos_token = bool(add_bos_token), bool(add_eos_token)
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.padding_side = padding_side
        self.split_special_tokens = bool(split_special_tokens)
        raw = {**_LLAMA_SPECIALS, **(special_tokens or {})}
        for key in _SPECIAL_ATTRS:  # bos_token, eos_token, ...: the token strings (None when unset)
            setattr(self, key, _content(raw[key]))
        self.additional_special_tokens = list(dict.fromkeys(map(_content, additional_special_tokens)))
        self._added_decoder: dict[int, AddedToken] = dict(added_tokens_decoder or {})
        self._register_missing_special_tokens(raw, additional_special_tokens)
        self._index_added_tokens(skip_empty=True)
        self._unk_length: tuple[str, int] | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> "LlamaTokenizer":
        """Load a checkpoint folder (or a file inside it) as transformers 4.37 does. Keyword arguments named like
        the config's flags (legacy, add_bos_token, padding_side, bos_token, ...) override it; others, such as
        trust_remote_code or use_fast, are accepted and ignored."""
        folder = checkpoint_folder(path)
        if not folder.is_dir():
            raise TokenizerFileMissing(f"{folder} is not a checkpoint folder (it does not exist)")
        options = read_llama_tokenizer_files(folder)
        for key in _OVERRIDABLE:
            if key not in kwargs:
                continue
            if key in _SPECIAL_ATTRS:
                options["special_tokens"][key] = kwargs[key]
            else:
                options[key] = kwargs[key]
        return cls(**options)

    @staticmethod
    def _load_sentencepiece(model_file: Path, legacy: bool, sp_model_kwargs: dict[str, Any]
                            ) -> spm.SentencePieceProcessor:
        if not model_file.is_file():
            raise TokenizerFileMissing(f"{model_file} not found: the tokenizer needs the sentencepiece model file "
                                       f"{VOCAB_FILE!r} in the checkpoint folder")
        processor = spm.SentencePieceProcessor(**sp_model_kwargs)
        try:
            proto = model_file.read_bytes()
            # legacy=False: transformers turns the model's dummy prefix off before loading it.
            processor.LoadFromSerializedProto(proto if legacy else proto + _NO_DUMMY_PREFIX)
        except (OSError, RuntimeError, ValueError, TypeError) as exc:
            raise TokenizerFileError(f"{model_file} is not a readable sentencepiece model: {exc}") from exc
        if processor.get_piece_size() <= 0:
            raise TokenizerFileError(f"{model_file} is not a readable sentencepiece model: it has no pieces")
        return processor

    def _register_missing_special_tokens(self, raw: dict[str, Any],
                                         additional: Sequence[str | AddedToken]) -> None:
        """Special tokens absent from the added-token table get the sentencepiece id of the same piece, or a new id
        past the vocabulary, in SPECIAL_TOKENS_ATTRIBUTES order (PreTrainedTokenizer.__init__ -> _add_tokens)."""
        forms: dict[str, AddedToken] = {}
        for value in [raw[k] for k in _SPECIAL_ATTRS] + list(additional):
            if value is None:
                continue
            if isinstance(value, AddedToken):
                token = AddedToken(value.content, value.lstrip, value.rstrip, value.single_word, value.normalized,
                                   special=True)
            elif isinstance(value, dict):
                token = _parse_added({**value, "special": True}, Path(CONFIG_FILE), special=True)
            else:  # a bare string: LlamaTokenizer / _add_tokens wrap it as normalized=False, special=True
                token = AddedToken(value, normalized=False, special=True)
            forms.setdefault(token.content, token)
        self._add_missing_tokens(token for content, token in forms.items() if content)

    # ---- special tokens ----
    @property
    def special_tokens_map(self) -> dict[str, str | list[str]]:
        named: dict[str, Any] = {k: getattr(self, k) for k in _SPECIAL_ATTRS if getattr(self, k)}
        if self.additional_special_tokens:
            named["additional_special_tokens"] = list(self.additional_special_tokens)
        return named

    def _special_token_values(self) -> list[str]:
        """bos, eos, unk, sep, pad, cls, mask (those set), then additional_special_tokens (read at every call)."""
        values = [getattr(self, k) for k in _SPECIAL_ATTRS] + list(self.additional_special_tokens)
        return [v for v in values if v]

    @property
    def unk_token_length(self) -> int:
        """Number of pieces sentencepiece makes of the unk token's text (stripped off after prefixing it)."""
        unk = str(self.unk_token)
        if self._unk_length is None or self._unk_length[0] != unk:
            self._unk_length = (unk, len(self.sp_model.encode(unk)))
        return self._unk_length[1]

    # ---- encoding ----
    def _encode_chunk(self, text: str) -> list[str]:
        """Llama's `_tokenize`: without legacy, a chunk starting with a space is encoded behind the unk token (so the
        dummy-prefix-free model keeps that space as `▁`), then the unk token's pieces are removed."""
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return self.sp_model.encode(text, out_type=str)
        tokens = self.sp_model.encode(str(self.unk_token) + text, out_type=str)
        skip = self.unk_token_length
        return tokens[skip:] if len(tokens) >= skip else tokens

    def _tokenize_text(self, text: str) -> list[str]:
        """Added tokens cut out and kept whole (the base class's `_tokenize`), unless split_special_tokens: then
        the whole text is one chunk."""
        if self.split_special_tokens:
            return self._encode_chunk(text) if text else []
        return super()._tokenize(text)

    def _tokenize(self, text: str) -> list[str]:
        """Without legacy the text gets a `▁` in front (literal `▁` become spaces), dropped again when the next
        token is one of all_special_tokens."""
        if self.legacy or not text:
            return self._tokenize_text(text)
        tokens = self._tokenize_text(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "))
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.all_special_tokens:
            tokens = tokens[1:]
        return tokens

    def build_inputs_with_special_tokens(self, ids: list[int]) -> list[int]:
        """bos in front when add_bos_token, eos behind when add_eos_token (each only when that token is set)."""
        bos = [self.bos_token_id] if self.add_bos_token and self.bos_token is not None else []
        eos = [self.eos_token_id] if self.add_eos_token and self.eos_token is not None else []
        return bos + list(ids) + eos

    # ---- decoding ----
    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        """Llama's join: one leading `▁` of the first token dropped (the prefix encode added), special tokens kept
        verbatim (preceded by a space only when legacy), everything else decoded by sentencepiece."""
        tokens = list(tokens)
        if not tokens:
            return ""
        if tokens[0].startswith(SPIECE_UNDERLINE):
            tokens[0] = tokens[0][1:]
        special = set(self.all_special_tokens)
        out, pending, prev_special = "", [], False
        for i, token in enumerate(tokens):
            if token in special:
                if not prev_special and i != 0 and self.legacy:
                    out += " "
                out += self.sp_model.decode(pending) + token
                pending, prev_special = [], True
            else:
                pending.append(token)
                prev_special = False
        return out + self.sp_model.decode(pending)


# ---- choosing the tokenizer class of a checkpoint ----
_CLASSES_BY_NAME = {"LlamaTokenizer": "llama", "InternLM2Tokenizer": "internlm2"}
_CLASSES_BY_ARCHITECTURE = {"InternLM2ForCausalLM": "internlm2", "Phi3ForCausalLM": "llama",
                            "LlamaForCausalLM": "llama"}


def _class_from_name(name: Any) -> str | None:
    if not isinstance(name, str) or not name:
        return None
    name = name.rsplit(".", 1)[-1]
    return _CLASSES_BY_NAME.get(name[:-4] if name.endswith("Fast") else name, "unsupported")


def tokenizer_kind(folder: str | Path) -> str:
    """'llama' or 'internlm2': tokenizer_config.json's `tokenizer_class`, else its `auto_map` AutoTokenizer class,
    else the LLM architecture in config.json (`llm_config.architectures`, or `architectures` of a bare LLM
    checkpoint), else 'internlm2' (the InternVL 1.5 default). A named class this engine lacks is an error."""
    folder = checkpoint_folder(folder)
    config_path = folder / CONFIG_FILE
    config = _read_json_object(config_path)
    names = [("tokenizer_class", config.get("tokenizer_class"))]
    auto = (config.get("auto_map") or {}) if isinstance(config.get("auto_map"), dict) else {}
    slow = auto.get("AutoTokenizer")
    names.append(("auto_map", slow[0] if isinstance(slow, list) and slow else slow))
    for key, name in names:
        kind = _class_from_name(name)
        if kind == "unsupported":
            raise TokenizerFileError(f"{config_path}: {key} {name!r} is not supported (supported: "
                                     f"{sorted(_CLASSES_BY_NAME)})")
        if kind is not None:
            return kind
    model_config = _read_json_object(folder / "config.json")
    llm = model_config.get("llm_config") if isinstance(model_config.get("llm_config"), dict) else model_config
    for architecture in llm.get("architectures") or []:
        if architecture in _CLASSES_BY_ARCHITECTURE:
            return _CLASSES_BY_ARCHITECTURE[architecture]
    return "internlm2"


Tokenizer = InternLM2Tokenizer | LlamaTokenizer  # what the engine accepts: either slow tokenizer


def load_tokenizer(folder: str | Path, **kwargs: Any) -> Tokenizer:
    """The checkpoint's tokenizer (see `tokenizer_kind` for the choice). Keyword arguments go to from_pretrained."""
    if tokenizer_kind(folder) == "llama":
        return LlamaTokenizer.from_pretrained(folder, **kwargs)
    return InternLM2Tokenizer.from_pretrained(folder, **kwargs)
