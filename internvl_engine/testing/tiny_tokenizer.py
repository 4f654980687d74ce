"""A small sentencepiece tokenizer laid out like InternLM2's, trained on the spot for tiny demo checkpoints.

The official InternLM2 `tokenizer.model` is a byte-fallback BPE model with an identity normalizer (no dummy
prefix, whitespace kept verbatim, digits split): ids 0/1/2 are `<unk>`/`<s>`/`</s>`, then the 256 byte pieces,
then the merges, and the chat tokens (`<|plugin|>` ... `<|im_start|>`) are user-defined pieces at the very END
of the sentencepiece vocab. InternVL then adds `<img>`, `<IMG_CONTEXT>`, ... as Hugging Face *added* tokens with
ids past the sentencepiece vocab (`added_tokens.json`). The engine's tokenizer must cope with exactly that
split, so the tiny model reproduces it rather than using a simpler layout.
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import sentencepiece as spm

SP_VOCAB_SIZE = 1000
# Order of InternLM2's user-defined pieces at the end of its vocab (ids 92538..92543 in the real model).
CHAT_TOKENS = ("<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>")
# InternVL's added tokens, in the order the official training code adds them.
INTERNVL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
# The order tokenizer_config.json lists the chat tokens in (as InternLM2's own config does).
_CHAT_TOKENS_LISTED = ("<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>",
                       "<|plugin|>")
_USER_DEFINED = 4  # sentencepiece ModelProto.SentencePiece.Type.USER_DEFINED

_EN_WORDS = (
    "the a an this that these image picture photo shows show describe description detail details in on of with and or "
    "to from is are was be there here it its what who where when why how which can you your please tell me about "
    "color colour red green blue yellow black white gray grey orange purple pink brown dark light bright left right "
    "top bottom middle center corner background foreground small large big tiny wide tall long short round square "
    "circle line lines stripe stripes pattern gradient text number numbers letter word sign building house tree trees "
    "sky cloud clouds sun water river sea mountain road street car cars person people man woman child dog cat bird "
    "table chair window door book phone screen chart graph diagram map document page title answer question user "
    "assistant system model language vision hello hi thanks thank yes no not some many several one two three four "
    "five first second third next last also very quite really good great nice simple complex scene view near far "
    "above below between inside outside appears looks seems contains includes has have made using"
).split()
_ZH_PHRASES = (
    "请 描述 这张 图片 图像 照片 详细 内容 你好 你是 谁 我 是 一个 人工智能 助手 书生 浦语 上海 实验室 开发 "
    "中文 英文 文字 颜色 红色 绿色 蓝色 黄色 黑色 白色 左边 右边 上面 下面 中间 背景 天空 云 太阳 海 山 河 树 "
    "房子 道路 汽车 人 狗 猫 鸟 桌子 椅子 窗户 门 书 手机 屏幕 图表 地图 文档 标题 问题 回答 用户 系统 模型 "
    "视觉 语言 多模态 大 小 长 短 圆 方 线 条纹 渐变 数字 第一 第二 还有 非常 很 好 简单 复杂 场景 显示 包含 "
    "看起来 可以 什么 哪里 为什么 怎么 谢谢 是的 不是 和 或者 的 了 在 有 这 那 个 张 幅 种 科学 联合 英语 "
    "实验 由 用 汤 海洋"
).split()
_PUNCT_EN = (".", ",", "?", "!", ":", ";")
_PUNCT_ZH = ("。", "，", "？", "！", "：", "、")


def training_corpus(num_sentences: int = 3000, seed: int = 20240501) -> list[str]:
    """A deterministic English + Chinese + digits corpus, rich enough for ~735 BPE merges.

    The corpus is independent of the weight seed, so every demo checkpoint shares one tokenizer.
    """
    rng = random.Random(seed)
    sentences = []
    for i in range(num_sentences):
        kind = i % 4
        if kind == 3:
            words = rng.choices(_ZH_PHRASES, k=rng.randint(4, 14))
            sentences.append("".join(words) + rng.choice(_PUNCT_ZH))
            continue
        words = rng.choices(_EN_WORDS, k=rng.randint(4, 16))
        if rng.random() < 0.5:
            words[0] = words[0].capitalize()
        if kind == 2:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
            words.insert(rng.randrange(len(words)), "".join(rng.choices(_ZH_PHRASES, k=2)))
        gap = "  " if rng.random() < 0.05 else " "
        sentences.append(gap.join(words) + rng.choice(_PUNCT_EN))
    return sentences


def train_sentencepiece(vocab_size: int = SP_VOCAB_SIZE) -> bytes:
    """Train the BPE model (single thread, no shuffling: same bytes every time) and return its serialized proto."""
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_corpus()), model_writer=writer, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        user_defined_symbols=list(CHAT_TOKENS), unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, shuffle_input_sentence=False, minloglevel=2)
    return _move_user_defined_to_end(writer.getvalue())


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _fields(data: bytes) -> list[tuple[int, int, bytes, bytes]]:
    """Top-level protobuf fields as (number, varint value or -1, payload, raw bytes incl. the tag)."""
    out, pos = [], 0
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        value, payload = -1, b""
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            payload, pos = data[pos:pos + length], pos + length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        out.append((number, value, payload, data[start:pos]))
    return out


def _move_user_defined_to_end(model_proto: bytes) -> bytes:
    """Reorder ModelProto.pieces (field 1) so that user-defined pieces come last, as in InternLM2's model.

    The trainer always puts user-defined symbols right after the control symbols; the protobuf package is not
    a dependency, so the wire format is edited directly (a repeated field's order is its order on the wire).
    """
    fields = _fields(model_proto)
    pieces = [f for f in fields if f[0] == 1]
    user = [p for p in pieces if any(n == 3 and v == _USER_DEFINED for n, v, _, _ in _fields(p[2]))]
    normal = [p for p in pieces if p not in user]
    rest = [f for f in fields if f[0] != 1]
    return b"".join(f[3] for f in normal + user + rest)


def _token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def write_tokenizer(folder: Path) -> int:
    """Write tokenizer.model and the Hugging Face tokenizer files; return the full vocab size (sp + added)."""
    proto = train_sentencepiece()
    (folder / "tokenizer.model").write_bytes(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    sp_size = sp.get_piece_size()
    added = {token: sp_size + i for i, token in enumerate(INTERNVL_TOKENS)}
    decoder = {str(sp.piece_to_id(t)): t for t in ("<unk>", "<s>", "</s>", *CHAT_TOKENS)}
    decoder.update({str(i): t for t, i in added.items()})
    tokenizer_config = {
        "added_tokens_decoder": {i: {**_token_entry(t), "special": True} for i, t in decoder.items()},
        "additional_special_tokens": [*_CHAT_TOKENS_LISTED, *INTERNVL_TOKENS],
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>",
        "model_max_length": int(1e30), "pad_token": "</s>", "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>",
    }
    special_tokens_map = {
        "additional_special_tokens": [*_CHAT_TOKENS_LISTED, *(_token_entry(t) for t in INTERNVL_TOKENS)],
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
    }
    write_tokenizer_json(folder, added, tokenizer_config, special_tokens_map)
    return sp_size + len(added)


def write_tokenizer_json(folder: Path, added: dict[str, int], tokenizer_config: dict, special_tokens_map: dict) -> None:
    """added_tokens.json, tokenizer_config.json, special_tokens_map.json and generation_config.json, formatted as
    transformers 4.37 saves them."""
    _write_json(folder / "added_tokens.json", dict(sorted(added.items())), indent=2)
    _write_json(folder / "tokenizer_config.json", tokenizer_config, indent=1)
    _write_json(folder / "special_tokens_map.json", special_tokens_map, indent=2)
    _write_json(folder / "generation_config.json", {"_from_model_config": True, "transformers_version": "4.37.2"},
                indent=2)


def _write_json(path: Path, data: dict, indent: int) -> None:
    path.write_text(json.dumps(data, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
