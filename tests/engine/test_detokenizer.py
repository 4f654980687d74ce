"""Incremental decoding equals decoding the whole output; streamed chunks concatenate to the final text."""
from __future__ import annotations

import random

import pytest

from internvl_engine.engine.detokenizer import IncrementalDetokenizer, StreamText, find_stop, truncate_at_stop
from internvl_engine import AutoTokenizer

from golden_utils import MODELS, checkpoint, golden_json


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(checkpoint(MODELS[0]))


def golden_outputs() -> list[list[int]]:
    return [case["generated_ids"][0] for case in golden_json(MODELS[0])["chat"].values() if "generated_ids" in case]


def test_incremental_text_equals_the_full_decode(tokenizer):
    sequences = golden_outputs()
    rng = random.Random(0)
    text_ids = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    sequences += [[rng.choice(text_ids) for _ in range(40)] for _ in range(20)]
    utf8 = tokenizer.encode("naïve café — 你好，世界 🙂 emoji", add_special_tokens=False)
    sequences.append(utf8)
    for ids in sequences:
        detokenizer = IncrementalDetokenizer(tokenizer)
        pieces = [detokenizer.update(ids[: n + 1]) for n in range(len(ids))]
        full = tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(pieces) == detokenizer.text
        assert detokenizer.text == full or (full.startswith(detokenizer.text) and full.endswith("\ufffd"))


def test_stream_text_concatenates_to_the_stripped_final_text():
    stream = StreamText(stops=("STOP",))
    growing = ["  ", "  Hel", "  Hello ", "  Hello wor", "  Hello world ST", "  Hello world STO"]
    chunks = [stream.delta(text, False) for text in growing]
    assert chunks == ["", "Hel", "lo", " wor", "ld", ""]  # whitespace and a partial stop string held back
    assert stream.delta("Hello world", True) == ""  # the engine's final text (cut at STOP, stripped)
    assert "".join(chunks) == "Hello world"


def test_stream_text_releases_held_text_when_it_is_not_a_stop():
    stream = StreamText(stops=("STOP",))
    assert stream.delta("a ST", False) == "a"
    assert stream.delta("a STAR", False) == " STAR"
    assert stream.delta("a STAR\ufffd", False) == ""  # an incomplete character waits
    assert stream.delta("a STAR!", True) == "!"


def test_stop_search_and_truncation():
    assert find_stop("abc<end>def<x>", ("<x>", "<end>")) == 3
    assert find_stop("abc<end>", ("<end>",), start=4) == -1
    assert truncate_at_stop("one. two. three", (". t",)) == ("one", True)
    assert truncate_at_stop("nothing here", ("zzz",)) == ("nothing here", False)
