"""A small tokenizer laid out like Mini-InternVL-Chat-4B-V1.5's (Phi-3's Llama-2 sentencepiece), trained on the spot.

Phi-3 reuses Llama-2's `tokenizer.model`: a byte-fallback BPE model whose normalizer is "identity" with a dummy
prefix (`Hello` is encoded as `▁Hello`), whitespace kept verbatim as `▁`, digits split; ids 0/1/2 are
`<unk>`/`<s>`/`</s>`, then the 256 byte pieces, then the merges and characters. Unlike InternLM2 there are no
chat pieces inside the sentencepiece vocab: Phi-3's `<|endoftext|>` (eos and pad), `<|assistant|>`, ...
`<|user|>` and then InternVL's `<img>`, ... `</box>` are Hugging Face *added* tokens with ids right after the
sentencepiece vocab, read by transformers' slow `LlamaTokenizer` (`legacy: false`, BOS prepended, no EOS, the
role tokens `rstrip`). The files mirror what the official code writes for such a tokenizer (the tiny golden
checkpoint's tokenizer_config.json, special_tokens_map.json and added_tokens.json), only the vocabulary differs.
"""
from __future__ import annotations

import io
from pathlib import Path

import sentencepiece as spm

from .tiny_tokenizer import INTERNVL_TOKENS, SP_VOCAB_SIZE, _token_entry, training_corpus, write_tokenizer_json

# Phi-3's added tokens in id order (32000..32010 in the real model): eos/pad, then the role and spare tokens.
PHI3_TOKENS = ("<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
               "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>")
EOS_TOKEN = "<|endoftext|>"  # also the pad token
# All of Phi-3's added tokens but the eos strip the whitespace that follows them ("<|user|>\n" is one token).
RSTRIP_TOKENS = frozenset(PHI3_TOKENS[1:])
NUM_ADDED_TOKENS = len(PHI3_TOKENS) + len(INTERNVL_TOKENS)


def train_llama_sentencepiece(vocab_size: int = SP_VOCAB_SIZE) -> bytes:
    """Train a BPE model with Llama-2's trainer and normalizer settings on the shared tiny corpus; return its
    serialized proto (single thread, no shuffling: the same bytes every time)."""
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_corpus()), model_writer=writer, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, shuffle_input_sentence=False, minloglevel=2)
    return writer.getvalue()


def write_phi3_tokenizer(folder: Path) -> int:
    """Write tokenizer.model and the Hugging Face tokenizer files of a Phi-3 based InternVL checkpoint; return
    the full vocab size (sentencepiece pieces + added tokens), which is the LLM's vocab_size."""
    folder = Path(folder)
    proto = train_llama_sentencepiece()
    (folder / "tokenizer.model").write_bytes(proto)
    sp_size = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    added = {token: sp_size + i for i, token in enumerate((*PHI3_TOKENS, *INTERNVL_TOKENS))}

    # transformers lists the special tokens it was constructed with (unk, bos; eos is an added token here, so
    # `</s>` is not listed) and then every added token, all flagged special.
    decoder = {"0": {**_token_entry("<unk>"), "special": True}, "1": {**_token_entry("<s>"), "special": True}}
    for token, index in added.items():
        decoder[str(index)] = {**_token_entry(token), "rstrip": token in RSTRIP_TOKENS, "special": True}
    tokenizer_config = {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": list(INTERNVL_TOKENS), "bos_token": "<s>", "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN, "legacy": False, "model_max_length": int(1e30), "pad_token": EOS_TOKEN,
        "sp_model_kwargs": {}, "spaces_between_special_tokens": False, "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>", "use_default_system_prompt": False,
    }
    special_tokens_map = {
        "additional_special_tokens": [_token_entry(t) for t in INTERNVL_TOKENS], "bos_token": _token_entry("<s>"),
        "eos_token": _token_entry(EOS_TOKEN), "pad_token": _token_entry(EOS_TOKEN), "unk_token": _token_entry("<unk>"),
    }
    write_tokenizer_json(folder, added, tokenizer_config, special_tokens_map)
    return sp_size + len(added)
