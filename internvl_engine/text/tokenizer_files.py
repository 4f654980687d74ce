"""The tokenizer's checkpoint-file side: the file formats, the value types, and reading a checkpoint folder.

`read_tokenizer_files` turns the files transformers 4.37 writes next to `tokenizer.model` (tokenizer_config.json,
or for legacy checkpoints special_tokens_map.json and added_tokens.json) into the keyword arguments of
`InternLM2Tokenizer`; `checkpoint_folder` finds the folder a path names. `AddedToken` is the form those files give
added tokens, `BatchEncoding` the form an encode returns, `_as_id_list` the id forms a decode accepts, and
`clean_up_tokenization` the English clean-up that InternLM2's decode applies.
"""
from __future__ import annotations

import json
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

VOCAB_FILE = "tokenizer.model"
# Order of transformers' SPECIAL_TOKENS_ATTRIBUTES: it fixes the order of `all_special_tokens`.
_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_tokenization(text: str) -> str:
    """transformers' English clean-up; InternLM2 applies it inside every decode, whatever the config says."""
    for before, after in _CLEANUPS:
        text = text.replace(before, after)
    return text


@dataclass(frozen=True)
class AddedToken:
    """A token matched verbatim in text before sentencepiece runs; the flags control whitespace around it."""

    content: str
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = False
    special: bool = False

    @classmethod
    def parse(cls, value: str | dict, special: bool = False) -> "AddedToken":
        """Read the forms found in tokenizer files: a bare string, or a dict with `content` and flags."""
        if isinstance(value, str):
            return cls(value, normalized=not special, special=special)
        fields = {k: value[k] for k in ("lstrip", "rstrip", "single_word", "normalized", "special") if k in value}
        return cls(value["content"], **{"special": special, **fields})


class BatchEncoding(dict):
    """The `__call__` result: a dict that also allows `enc.input_ids` and `enc.to(device)`, as HF's does."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: torch.device | str) -> "BatchEncoding":
        return BatchEncoding({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


def checkpoint_folder(path: str | Path) -> Path:
    """The checkpoint folder named by `path`: the folder itself, or the folder of a file inside it."""
    folder = Path(path)
    return folder.parent if folder.is_file() else folder


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def _content(value: Any) -> str | None:
    return value["content"] if isinstance(value, dict) else value


def _as_id_list(ids: Any) -> list[int]:
    """Accept a list, tuple, 1-D tensor/array or a single id; reject batches, which belong to batch_decode."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, numbers.Integral):
        return [int(ids)]
    if any(isinstance(i, (list, tuple)) for i in ids):
        raise ValueError("decode() takes one sequence of ids; use batch_decode() for a batch")
    return [int(i) for i in ids]


def read_tokenizer_files(folder: Path) -> dict[str, Any]:
    """`InternLM2Tokenizer` keyword arguments from a checkpoint folder, read the way transformers 4.37 reads it."""
    config = _read_json(folder / "tokenizer_config.json")
    specials = {k: _content(config[k]) for k in _SPECIAL_ATTRS if k in config}
    additional = [_content(t) for t in config.get("additional_special_tokens") or []]
    if "added_tokens_decoder" in config:
        decoder = {int(i): AddedToken.parse(t) for i, t in config["added_tokens_decoder"].items()}
    else:  # legacy checkpoints: special_tokens_map.json overrides, added_tokens.json gives the ids
        special_map = _read_json(folder / "special_tokens_map.json")
        specials.update({k: _content(v) for k, v in special_map.items() if k in _SPECIAL_ATTRS})
        additional += [c for c in map(_content, special_map.get("additional_special_tokens", []))
                       if c not in additional]
        named = set(additional) | {v for v in specials.values() if v is not None}
        decoder = {int(i): AddedToken.parse(tok, special=tok in named)
                   for tok, i in _read_json(folder / "added_tokens.json").items()}
    return dict(vocab_file=folder / VOCAB_FILE, added_tokens_decoder=decoder, special_tokens=specials,
                additional_special_tokens=additional, add_bos_token=config.get("add_bos_token", True),
                add_eos_token=config.get("add_eos_token", False),
                clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces", False),
                padding_side=config.get("padding_side", "right"))
