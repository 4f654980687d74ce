"""What the two slow sentencepiece tokenizers (`InternLM2Tokenizer`, `LlamaTokenizer`) share.

Both reproduce a transformers 4.37 `PreTrainedTokenizer` around a sentencepiece model, so most of the machinery is
the same and lives in `SentencePieceTokenizerBase`:
- the vocabulary views (`vocab_size`, `len()`, `get_vocab`, the added-token tables, the special ids);
- cutting text around the added tokens (one regex, longest first, leftmost match, as 4.37's trie does) and the
  AddedToken strip rules, then encoding each remaining chunk on its own;
- id <-> token conversion, `encode`, `__call__` with padding and `BatchEncoding` building;
- transformers' `_decode` (standalone added pieces joined by spaces, the runs between them joined by the
  subclass's `convert_tokens_to_string`) and `batch_decode`.

A subclass sets the attributes (`sp_model`, the special tokens, `_added_decoder`, ...) in its own `__init__`, then
calls `_index_added_tokens`, and supplies what differs: how a chunk is encoded (`_encode_chunk`) and any prefix
handling (`_tokenize`), `build_inputs_with_special_tokens`, `convert_tokens_to_string`, which tokens count as
special (`_special_token_values`, `_skipped_ids`) and which stay standalone when decoding (`_standalone_tokens`).
"""
from __future__ import annotations

import abc
import numbers
import re
from typing import Any, Iterable, Sequence

import sentencepiece as spm
import torch

from .tokenizer_files import AddedToken, BatchEncoding, _as_id_list, clean_up_tokenization

_PADDING_MODES = {False: False, "do_not_pad": False, True: True, "longest": True}


def _token_id(attribute: str) -> property:
    """A read-only property: the id of the token string held in `attribute` (None when that is None)."""
    return property(lambda self: self.convert_tokens_to_ids(getattr(self, attribute)),
                    doc=f"Id of `{attribute}` (None when it is unset).")


class SentencePieceTokenizerBase(abc.ABC):
    """The shared part of the slow sentencepiece tokenizers; see the module docstring for what a subclass adds."""

    sp_model: spm.SentencePieceProcessor
    additional_special_tokens: list[str]
    clean_up_tokenization_spaces: bool
    padding_side: str
    _added_decoder: dict[int, AddedToken]

    bos_token_id = _token_id("bos_token")
    eos_token_id = _token_id("eos_token")
    pad_token_id = _token_id("pad_token")
    unk_token_id = _token_id("unk_token")

    def _index_added_tokens(self, skip_empty: bool = False) -> None:
        """Once `_added_decoder` is complete: the content -> id table, the regex that cuts text around added tokens
        (one alternation, longest first, finds the same leftmost-longest matches as transformers' trie; empty
        contents left out when skip_empty), whether any strip rule is set, and the full vocabulary size."""
        self._added_encoder = {tok.content: idx for idx, tok in sorted(self._added_decoder.items())}
        by_length = sorted((c for c in self._added_encoder if c or not skip_empty), key=len, reverse=True)
        self._split_pattern = re.compile("(" + "|".join(map(re.escape, by_length)) + ")") if by_length else None
        self._has_strip_rules = any(t.lstrip or t.rstrip or t.single_word for t in self._added_decoder.values())
        self._size = len(self.get_vocab())

    def _add_missing_tokens(self, tokens: Iterable[AddedToken]) -> None:
        """Tokens whose content is not in the added-token table yet get the sentencepiece id of the same piece, or a
        new id past the vocabulary, in the order given (as PreTrainedTokenizer.__init__ -> _add_tokens does)."""
        known = {tok.content for tok in self._added_decoder.values()}
        vocab = self.get_vocab()
        for token in tokens:
            if token.content in known:
                continue
            index = vocab.get(token.content, len(vocab))
            vocab[token.content] = index
            self._added_decoder[index] = token
            known.add(token.content)

    # ---- vocabulary ----
    @property
    def vocab_size(self) -> int:
        """Pieces of the sentencepiece model (added tokens not counted)."""
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

    @abc.abstractmethod
    def _special_token_values(self) -> list[str]:
        """The special token strings in transformers' order, repeats allowed (the subclass decides which)."""

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(self._special_token_values()))

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    # ---- encoding ----
    def _split_on_added_tokens(self, text: str) -> list[str]:
        """`text` cut around every added token, strip rules applied, empty pieces dropped."""
        parts = self._split_pattern.split(text) if self._split_pattern is not None else [text]
        if self._has_strip_rules:
            parts = self._apply_strip_rules([p for p in parts if p])
        return [p for p in parts if p]

    def _apply_strip_rules(self, parts: list[str]) -> list[str]:
        """transformers 4.37's pass over the split text: rstrip/lstrip/single_word of each added token, in place
        (all False in the InternVL checkpoints)."""
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

    def _encode_chunk(self, text: str) -> list[str]:
        """Pieces of one chunk between added tokens."""
        return self.sp_model.encode(text, out_type=str)

    def _tokenize(self, text: str) -> list[str]:
        """Added tokens stay whole; each chunk between them is encoded on its own, so merges never cross one."""
        tokens: list[str] = []
        for part in self._split_on_added_tokens(text):
            if part in self._added_encoder:
                tokens.append(part)
            else:
                tokens.extend(self._encode_chunk(part))
        return tokens

    def tokenize(self, text: str) -> list[str]:
        """Pieces of `text` (no bos/eos)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tokenize(text)

    def _token_to_id(self, token: str) -> int:
        index = self._added_encoder.get(token)
        return index if index is not None else self.sp_model.piece_to_id(token)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str] | None) -> int | list[int] | None:
        """Unknown tokens map to the unk id (sentencepiece's behaviour)."""
        if tokens is None or isinstance(tokens, str):
            return None if tokens is None else self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    @abc.abstractmethod
    def build_inputs_with_special_tokens(self, ids: list[int]) -> list[int]:
        """`ids` with the BOS/EOS the tokenizer's flags add."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`, with bos/eos as add_bos_token/add_eos_token say unless add_special_tokens=False."""
        ids = [self._token_to_id(t) for t in self.tokenize(text)]
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def __call__(self, text: str | Sequence[str], return_tensors: str | None = None,
                 padding: bool | str = False, add_special_tokens: bool = True) -> BatchEncoding:
        batched = not isinstance(text, str)
        texts = list(text) if batched else [text]
        if not texts:
            raise ValueError("nothing to encode: the list of texts is empty")
        if padding not in _PADDING_MODES:
            raise ValueError(f"padding={padding!r} is not supported; use False, True or 'longest'")
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        masks = [[1] * len(r) for r in rows]
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
        """Pad to the longest row with the pad id on `padding_side` (batch_chat sets 'left' so every row ends at
        the prompt end)."""
        pad_id = self.pad_token_id
        if pad_id is None or self.padding_side not in ("left", "right"):
            raise ValueError(f"padding needs a pad token and padding_side 'left' or 'right' (pad token "
                             f"{self.pad_token!r}, padding_side {self.padding_side!r})")
        width, left = max(map(len, rows)), self.padding_side == "left"

        def fill(seq: list[int], value: int) -> list[int]:
            gap = [value] * (width - len(seq))
            return gap + seq if left else seq + gap

        return [fill(r, pad_id) for r in rows], [fill([1] * len(r), 0) for r in rows]

    # ---- decoding ----
    def _id_to_token(self, index: int) -> str:
        added = self._added_decoder.get(index)
        if added is not None:
            return added.content
        if not 0 <= index < self.vocab_size:
            raise IndexError(f"token id {index} is outside the vocabulary (size {self.vocab_size} plus "
                             f"{len(self._added_decoder)} added tokens)")
        return self.sp_model.id_to_piece(index)

    def _skipped_ids(self) -> frozenset[int]:
        """The ids skip_special_tokens drops: all_special_ids."""
        return frozenset(self.all_special_ids)

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str | list[str]:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        if isinstance(ids, numbers.Integral):
            return self._id_to_token(int(ids))
        skipped = self._skipped_ids() if skip_special_tokens else frozenset()
        return [self._id_to_token(int(i)) for i in ids if int(i) not in skipped]

    def _find_standalone_tokens(self, special: set[str] | frozenset[str]) -> set[str]:
        """Tokens decoded as standalone pieces: added tokens that are not special, and additional special tokens past
        the sentencepiece vocab (InternVL's `<img>`, `<IMG_CONTEXT>`, ... when they are listed as special)."""
        return (set(self._added_encoder) - special) | {
            t for t in self.additional_special_tokens if self._token_to_id(t) >= self.vocab_size}

    def _standalone_tokens(self) -> set[str]:
        return self._find_standalone_tokens(set(self.all_special_tokens))

    @abc.abstractmethod
    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        """Pieces back to text, by the tokenizer's own decoding rules."""

    def decode(self, ids: Any, skip_special_tokens: bool = False, spaces_between_special_tokens: bool = True,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """transformers 4.37's `_decode`: standalone tokens (see `_find_standalone_tokens`) are joined by spaces when
        spaces_between_special_tokens; the runs between them go through convert_tokens_to_string.
        skip_special_tokens drops all_special_ids only."""
        standalone = self._standalone_tokens()
        sub_texts: list[str] = []
        pending: list[str] = []
        for token in self.convert_ids_to_tokens(_as_id_list(ids), skip_special_tokens=skip_special_tokens):
            if token not in standalone:
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
