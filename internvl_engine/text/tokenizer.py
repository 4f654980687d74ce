"""InternLM2 tokenizer without `transformers`: the official slow `InternLM2Tokenizer` as a user sees it.

The official class is a transformers 4.37 `PreTrainedTokenizer` around a sentencepiece model. Token ids must match
it exactly, so this module reproduces the parts of that machinery that shape ids and text:
- text is first cut around every *added* token (longest first, leftmost match, as the 4.37 trie does); each
  remaining chunk is encoded by sentencepiece on its own, so merges never cross an added token;
- decoding keeps InternVL's added tokens past the sentencepiece vocab (`<img>`, `<IMG_CONTEXT>`, ...) as separate
  pieces joined with spaces, and InternLM2's own `convert_tokens_to_string` quirks: a space is put *before the text
  that precedes* a special token, and the English clean-up (" ." -> ".", " 's" -> "'s", ...) always runs there.
Cutting uses one compiled regex, so a prompt with ~10K `<IMG_CONTEXT>` tokens encodes in milliseconds.
The machinery both sentencepiece tokenizers share (cutting, id conversion, `__call__`, `_decode`) is
`SentencePieceTokenizerBase` in `sentencepiece_base`; this class adds InternLM2's own parts. Reading the checkpoint's
tokenizer files and the small value types (`AddedToken`, `BatchEncoding`) live in `tokenizer_files`; those names are
re-exported here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import sentencepiece as spm

from .sentencepiece_base import SentencePieceTokenizerBase
from .tokenizer_files import (_SPECIAL_ATTRS, VOCAB_FILE, AddedToken, BatchEncoding, checkpoint_folder,
                              clean_up_tokenization, read_tokenizer_files)

__all__ = ["AddedToken", "BatchEncoding", "InternLM2Tokenizer"]

_DEFAULT_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}


class InternLM2Tokenizer(SentencePieceTokenizerBase):
    """Encode/decode exactly like the official InternLM2Tokenizer under transformers 4.37.2."""

    def __init__(self, vocab_file: str | Path, added_tokens_decoder: dict[int, AddedToken] | None = None,
                 special_tokens: dict[str, str | None] | None = None,
                 additional_special_tokens: Sequence[str] = (), add_bos_token: bool = True,
                 add_eos_token: bool = False, clean_up_tokenization_spaces: bool = False,
                 padding_side: str = "right") -> None:
        self.vocab_file = str(vocab_file)
        self.sp_model = self._load_sentencepiece(Path(vocab_file))
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.padding_side = padding_side
        specials = {**_DEFAULT_SPECIALS, **(special_tokens or {})}
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = (
            specials.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token"))
        self._special_attrs = {k: specials.get(k) for k in _SPECIAL_ATTRS}
        self.additional_special_tokens = list(dict.fromkeys(additional_special_tokens))
        self._added_decoder: dict[int, AddedToken] = dict(added_tokens_decoder or {})
        # Special tokens missing from the table are added as PreTrainedTokenizer.__init__ does.
        self._add_missing_tokens(AddedToken(content, special=True) for content in self.all_special_tokens)
        self._index_added_tokens()
        # Fixed at load time: which tokens are special, and which are decoded as standalone pieces.
        self._special_set = frozenset(self.all_special_tokens)
        self._special_ids = frozenset(self.all_special_ids)
        self._legacy_added = self._find_standalone_tokens(self._special_set)

    @classmethod
    def from_pretrained(cls, path: str | Path, **_ignored: Any) -> "InternLM2Tokenizer":
        """Load a checkpoint folder the way transformers 4.37 does (HF-only kwargs such as trust_remote_code are
        accepted and ignored)."""
        return cls(**read_tokenizer_files(checkpoint_folder(path)))

    @staticmethod
    def _load_sentencepiece(model_file: Path) -> spm.SentencePieceProcessor:
        if not model_file.is_file():
            raise FileNotFoundError(f"{model_file} not found: the tokenizer needs the sentencepiece model file "
                                    f"{VOCAB_FILE!r} in the checkpoint folder")
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(str(model_file))
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"{model_file} is not a readable sentencepiece model: {exc}") from exc
        return processor

    def _special_token_values(self) -> list[str]:
        """bos/eos/unk/sep/pad/cls/mask as loaded (those not None), then additional_special_tokens."""
        return [v for v in self._special_attrs.values() if v is not None] + self.additional_special_tokens

    @property
    def bos_token_id(self) -> int | None:
        """bos/eos ids come from the sentencepiece model, as the official class overrides them."""
        return None if self.sp_model.bos_id() < 0 else self.sp_model.bos_id()

    @property
    def eos_token_id(self) -> int | None:
        return None if self.sp_model.eos_id() < 0 else self.sp_model.eos_id()

    def build_inputs_with_special_tokens(self, ids: list[int]) -> list[int]:
        """BOS (the sentencepiece bos id) in front when add_bos_token, EOS behind when add_eos_token."""
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        return bos + ids + eos

    def _skipped_ids(self) -> frozenset[int]:
        return self._special_ids

    def _standalone_tokens(self) -> set[str]:
        return self._legacy_added

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """InternLM2's own join: a space goes before the text that precedes a special token (not after it)."""
        out, pending, prev_special = "", [], False
        for token in tokens:
            if token in self._special_set:
                out += ("" if prev_special else " ") + self.sp_model.decode(pending) + token
                pending, prev_special = [], True
            else:
                pending.append(token)
                prev_special = False
        return clean_up_tokenization(out + self.sp_model.decode(pending))
