"""InternLM2 tokenizer without `transformers`: the official slow `InternLM2Tokenizer` as a user sees it.

The official class is a transformers 4.37 `PreTrainedTokenizer` around a sentencepiece model. Token ids must match
it exactly, so this module reproduces the parts of that machinery that shape ids and text:
- text is first cut around every *added* token (longest first, leftmost match, as the 4.37 trie does); each
  remaining chunk is encoded by sentencepiece on its own, so merges never cross an added token;
- decoding keeps InternVL's added tokens past the sentencepiece vocab (`<img>`, `<IMG_CONTEXT>`, ...) as separate
  pieces joined with spaces, and InternLM2's own `convert_tokens_to_string` quirks: a space is put *before the text
  that precedes* a special token, and the English clean-up (" ." -> ".", " 's" -> "'s", ...) always runs there.
Cutting uses one compiled regex, so a prompt with ~10K `<IMG_CONTEXT>` tokens encodes in milliseconds.
Reading the checkpoint's tokenizer files and the small value types (`AddedToken`, `BatchEncoding`) live in
`tokenizer_files`; those names are re-exported here.
"""
from __future__ import annotations

import numbers
import re
from pathlib import Path
from typing import Any, Sequence

import sentencepiece as spm
import torch

from .tokenizer_files import (_SPECIAL_ATTRS, VOCAB_FILE, AddedToken, BatchEncoding, _as_id_list,
                              clean_up_tokenization, read_tokenizer_files)

_DEFAULT_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
_PADDING_MODES = {False: False, "do_not_pad": False, True: True, "longest": True}


class InternLM2Tokenizer:
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
        self._register_missing_special_tokens()
        self._added_encoder = {tok.content: idx for idx, tok in sorted(self._added_decoder.items())}
        # One alternation, longest first, finds the same leftmost-longest matches as transformers' trie.
        by_length = sorted(self._added_encoder, key=len, reverse=True)
        self._split_pattern = re.compile("(" + "|".join(map(re.escape, by_length)) + ")") if by_length else None
        self._has_strip_rules = any(t.lstrip or t.rstrip or t.single_word for t in self._added_decoder.values())
        self._special_set = frozenset(self.all_special_tokens)
        self._special_ids = frozenset(self.all_special_ids)
        # Decoded as standalone pieces: non-special added tokens, and special ones past the sentencepiece vocab.
        self._legacy_added = (set(self._added_encoder) - self._special_set) | {
            t for t in self.additional_special_tokens if self.convert_tokens_to_ids(t) >= self.vocab_size}
        self._size = len(self.get_vocab())

    @classmethod
    def from_pretrained(cls, path: str | Path, **_ignored: Any) -> "InternLM2Tokenizer":
        """Load a checkpoint folder the way transformers 4.37 does (HF-only kwargs such as trust_remote_code are
        accepted and ignored)."""
        folder = Path(path)
        folder = folder.parent if folder.is_file() else folder
        return cls(**read_tokenizer_files(folder))

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

    def _register_missing_special_tokens(self) -> None:
        """Special tokens absent from the added-token table get the sentencepiece id of the same piece, or a new
        id past the vocab, as PreTrainedTokenizer.__init__ does."""
        known = {tok.content for tok in self._added_decoder.values()}
        vocab = self.get_vocab()
        for content in self.all_special_tokens:
            if content in known:
                continue
            index = vocab.get(content, len(vocab))
            vocab[content] = index
            self._added_decoder[index] = AddedToken(content, special=True)
            known.add(content)

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def __len__(self) -> int:
        """Size of the full vocabulary, added tokens included (what the embedding table must cover)."""
        return self._size

    def get_vocab(self) -> dict[str, int]:
        vocab = {self._id_to_token(i): i for i in range(self.vocab_size)}
        vocab.update({tok.content: idx for idx, tok in sorted(self._added_decoder.items())})
        return vocab

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        return dict(self._added_encoder)

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return dict(sorted(self._added_decoder.items()))

    @property
    def all_special_tokens(self) -> list[str]:
        values = [v for v in self._special_attrs.values() if v is not None] + self.additional_special_tokens
        return list(dict.fromkeys(values))

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    @property
    def bos_token_id(self) -> int | None:
        """bos/eos ids come from the sentencepiece model, as the official class overrides them."""
        return None if self.sp_model.bos_id() < 0 else self.sp_model.bos_id()

    @property
    def eos_token_id(self) -> int | None:
        return None if self.sp_model.eos_id() < 0 else self.sp_model.eos_id()

    @property
    def pad_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.unk_token)

    def _split_on_added_tokens(self, text: str) -> list[str]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        parts = self._split_pattern.split(text) if self._split_pattern is not None else [text]
        if self._has_strip_rules:
            parts = self._apply_strip_rules([p for p in parts if p])
        return [p for p in parts if p]

    def _apply_strip_rules(self, parts: list[str]) -> list[str]:
        """AddedToken lstrip/rstrip/single_word, in transformers' order (all False in InternVL checkpoints)."""
        for i, part in enumerate(parts):
            if part not in self._added_encoder:
                continue
            tok = self._added_decoder[self._added_encoder[part]]
            left = parts[i - 1] if i > 0 else None
            right = parts[i + 1] if i < len(parts) - 1 else None
            if tok.rstrip and right:
                parts[i + 1] = right.lstrip()
            if tok.lstrip and left:
                parts[i - 1] = left.rstrip()
            if tok.single_word and left and left[-1] != " ":
                parts[i - 1] += part
                parts[i] = ""
            elif tok.single_word and right and right[0] != " ":
                parts[i + 1] = part + parts[i + 1]
                parts[i] = ""
        return parts

    def tokenize(self, text: str) -> list[str]:
        """Added tokens stay whole; each chunk between them goes through sentencepiece on its own."""
        tokens: list[str] = []
        for part in self._split_on_added_tokens(text):
            if part in self._added_encoder:
                tokens.append(part)
            else:
                tokens.extend(self.sp_model.encode(part, out_type=str))
        return tokens

    def _token_to_id(self, token: str) -> int:
        index = self._added_encoder.get(token)
        return index if index is not None else self.sp_model.piece_to_id(token)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str] | None) -> int | list[int] | None:
        """Unknown tokens map to the unk id (sentencepiece's behaviour)."""
        if tokens is None or isinstance(tokens, str):
            return None if tokens is None else self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def _id_to_token(self, index: int) -> str:
        added = self._added_decoder.get(index)
        if added is not None:
            return added.content
        if not 0 <= index < self.vocab_size:
            raise IndexError(f"token id {index} is outside the vocabulary (size {self.vocab_size} plus "
                             f"{len(self._added_decoder)} added tokens)")
        return self.sp_model.id_to_piece(index)

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str | list[str]:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        if isinstance(ids, numbers.Integral):
            return self._id_to_token(int(ids))
        return [self._id_to_token(int(i)) for i in ids if not (skip_special_tokens and int(i) in self._special_ids)]

    def build_inputs_with_special_tokens(self, ids: list[int]) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        return bos + ids + eos

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`, with BOS in front unless add_special_tokens=False (the official default adds it)."""
        ids = [self._token_to_id(t) for t in self.tokenize(text)]
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def __call__(self, text: str | Sequence[str], return_tensors: str | None = None,
                 padding: bool | str = False, add_special_tokens: bool = True) -> BatchEncoding:
        batched = not isinstance(text, str)
        texts = list(text) if batched else [text]
        if not texts:
            raise ValueError("nothing to encode: the list of texts is empty")
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        masks = [[1] * len(r) for r in rows]
        if padding not in _PADDING_MODES:
            raise ValueError(f"padding={padding!r} is not supported; use False, True or 'longest'")
        if _PADDING_MODES[padding]:
            rows, masks = self._pad(rows)
        if return_tensors is None:
            return BatchEncoding(input_ids=rows if batched else rows[0], attention_mask=masks if batched else masks[0])
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use None or 'pt'")
        if len({len(r) for r in rows}) > 1:
            raise ValueError(f"cannot make one tensor from sequences of different lengths "
                             f"{sorted({len(r) for r in rows})}; pass padding=True")
        return BatchEncoding(input_ids=torch.tensor(rows, dtype=torch.long),
                             attention_mask=torch.tensor(masks, dtype=torch.long))

    def _pad(self, rows: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
        """Pad to the longest row on `padding_side` (batch_chat sets 'left' so every row ends at the prompt end)."""
        pad_id = self.pad_token_id
        if pad_id is None or self.padding_side not in ("left", "right"):
            raise ValueError(f"padding needs a pad token and padding_side 'left' or 'right' (pad token "
                             f"{self.pad_token!r}, padding_side {self.padding_side!r})")
        width, left = max(map(len, rows)), self.padding_side == "left"

        def fill(seq: list[int], value: int) -> list[int]:
            gap = [value] * (width - len(seq))
            return gap + seq if left else seq + gap

        return [fill(r, pad_id) for r in rows], [fill([1] * len(r), 0) for r in rows]

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

    def decode(self, ids: Any, skip_special_tokens: bool = False, spaces_between_special_tokens: bool = True,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """transformers' `_decode`: InternVL's image/box tokens (ids past the sentencepiece vocab) become standalone
        pieces, joined by spaces when spaces_between_special_tokens; the rest goes through InternLM2's join."""
        sub_texts: list[str] = []
        pending: list[str] = []
        for token in self.convert_ids_to_tokens(_as_id_list(ids), skip_special_tokens=skip_special_tokens):
            if token not in self._legacy_added:
                pending.append(token)
                continue
            if pending:
                text = self.convert_tokens_to_string(pending)
                sub_texts += [text] if text else []
                pending = []
            sub_texts.append(token)
        if pending:
            sub_texts.append(self.convert_tokens_to_string(pending))
        text = (" " if spaces_between_special_tokens else "").join(sub_texts)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None \
            else clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean else text

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False,
                     spaces_between_special_tokens: bool = True,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        sequences = sequences.tolist() if hasattr(sequences, "tolist") else sequences
        return [self.decode(seq, skip_special_tokens, spaces_between_special_tokens, clean_up_tokenization_spaces)
                for seq in sequences]
