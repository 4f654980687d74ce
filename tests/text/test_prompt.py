"""Prompt building reproduces the text the official chat()/batch_chat() gave the tokenizer (../shared/goldens)."""
from __future__ import annotations

import pytest

from internvl_engine.text.templates import (IMAGE_PLACEHOLDER, LEGACY_INTERNLM2_SYSTEM_MESSAGE, TEMPLATES, build_prompt,
                                    expand_image_placeholders, get_template, image_tokens, prepare_batch_queries,
                                    prepare_chat_query)

from golden_utils import MODELS, golden_json

golden = golden_json


def chat_cases() -> list[tuple[str, str]]:
    return [(m, case) for m in MODELS for case in golden(m)["chat"]]


def _system_message(model: str, case: str) -> str:
    """The legacy case ran with model.system_message set to InternLM2's old prompt (see the goldens README)."""
    return LEGACY_INTERNLM2_SYSTEM_MESSAGE if case == "image_legacy_system_message" else golden(model)["system_message"]


def _num_patches(call: dict) -> list[int]:
    """chat() defaults num_patches_list to [all tiles] when pixel values are given."""
    if call["num_patches_list"] is not None:
        return call["num_patches_list"]
    return [call["pixel_values_tiles"]] if call["pixel_values_tiles"] else []


@pytest.mark.parametrize("model,case", chat_cases())
def test_prompts_match_goldens(model: str, case: str) -> None:
    data = golden(model)
    spec, call = data["chat"][case], data["chat"][case]["call"]
    kwargs = dict(system_message=_system_message(model, case), num_image_token=data["num_image_token"])
    if call["api"] == "batch_chat":
        queries = prepare_batch_queries(data["template"], call["questions"], call["num_patches_list"],
                                        has_images=bool(call["images"]), **kwargs)
        assert queries == spec["prompt_expanded"]
        return
    history = [tuple(turn) for turn in call["history_in"]] if call["history_in"] is not None else None
    query, question = prepare_chat_query(data["template"], call["question"], history, _num_patches(call), **kwargs)
    assert query == spec["prompt_expanded"][0]
    assert question == spec["history_out"][-1][0]


def test_ntk_prompts_match_goldens() -> None:
    data = golden(MODELS[0], "ntk_fp32")
    cases = [spec for spec in data.values() if isinstance(spec, dict) and "prompt" in spec]
    assert cases
    for spec in cases:
        assert build_prompt("internlm2-chat", spec["question"]) == spec["prompt"]


def test_internlm2_chat_text() -> None:
    assert build_prompt("internlm2-chat", "Hi?", system_message="SYS") == (
        "<|im_start|>system\nSYS<|im_end|><|im_start|>user\nHi?<|im_end|><|im_start|>assistant\n")
    history = [("Q1", "A1"), ("Q2", "A2")]
    assert build_prompt("internlm2-chat", "Q3", history, system_message="SYS") == (
        "<|im_start|>system\nSYS<|im_end|>"
        "<|im_start|>user\nQ1<|im_end|><|im_start|>assistant\nA1<|im_end|>"
        "<|im_start|>user\nQ2<|im_end|><|im_start|>assistant\nA2<|im_end|>"
        "<|im_start|>user\nQ3<|im_end|><|im_start|>assistant\n")
    default = get_template("internlm2-chat").system_message
    assert build_prompt("internlm2-chat", "x").startswith(f"<|im_start|>system\n{default}<|im_end|>")


def test_empty_answer_leaves_the_role_open_like_upstream() -> None:
    assert build_prompt("internlm2-chat", "Q2", [("Q1", "")], system_message="S") == (
        "<|im_start|>system\nS<|im_end|><|im_start|>user\nQ1<|im_end|><|im_start|>assistant\n"
        "<|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n")


def test_other_templates() -> None:
    assert build_prompt("phi3-chat", "Hi", system_message="S") == (
        "<|system|>\nS<|end|><|user|>\nHi<|end|><|assistant|>\n")
    hermes, internlm2 = (build_prompt(name, "Hi", system_message="S") for name in ("Hermes-2", "internlm2-chat"))
    assert hermes == internlm2
    assert build_prompt("internvl2_5", "Hi", system_message="S") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert {t.stop_token for t in TEMPLATES.values()} == {"<|im_end|>", "<|end|>"}
    assert get_template("internvl2_5").system_message != get_template("internlm2-chat").system_message
    with pytest.raises(ValueError, match="internlm2-chat"):
        get_template("vicuna_v1.1")
    with pytest.raises(ValueError, match="pair"):
        build_prompt("internlm2-chat", "x", [("only question",)])


def test_expand_in_order() -> None:
    query = "A <image> B <image> C"
    assert expand_image_placeholders(query, [1, 2], num_image_token=2) == (
        "A <img><IMG_CONTEXT><IMG_CONTEXT></img> B <img>" + "<IMG_CONTEXT>" * 4 + "</img> C")
    assert expand_image_placeholders("no images", []) == "no images"
    assert image_tokens(41).count("<IMG_CONTEXT>") == 41 * 256


@pytest.mark.parametrize("query,patches,match", [
    ("<image>\n<image>\nCompare.", [3], "2 <image> placeholder"),
    ("<image>\nDescribe.", [1, 1], "1 <image> placeholder"),
    ("Describe.", [1], "0 <image> placeholder"),
    ("<image>\nDescribe.", [], "1 <image> placeholder"),
    ("<image>\nDescribe.", [0], "at least one tile"),
])
def test_expand_errors(query: str, patches: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        expand_image_placeholders(query, patches)


def test_chat_query_placeholder_rules() -> None:
    query, question = prepare_chat_query("internlm2-chat", "What?", None, [2], num_image_token=1)
    assert question == f"{IMAGE_PLACEHOLDER}\nWhat?"
    assert "user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat?" in query
    _, question = prepare_chat_query("internlm2-chat", "What?", None, [])
    assert question == "What?"
    with pytest.raises(ValueError, match="<image>"):
        prepare_chat_query("internlm2-chat", "What?", [], [1])
    with pytest.raises(ValueError, match="<image>"):
        prepare_chat_query("internlm2-chat", "<image>\nno image given", None, [])


def test_batch_query_rules() -> None:
    queries = prepare_batch_queries("internlm2-chat", ["a", "<image>\nb"], [1, 2], num_image_token=1)
    assert [q.count("<IMG_CONTEXT>") for q in queries] == [1, 2]
    assert "user\n<img><IMG_CONTEXT></img>\na<|im_end|>" in queries[0]
    text_only = prepare_batch_queries("internlm2-chat", ["a", "b"], [0, 0], has_images=False)
    assert text_only == [build_prompt("internlm2-chat", q) for q in ("a", "b")]
    with pytest.raises(ValueError, match="num_patches_list"):
        prepare_batch_queries("internlm2-chat", ["a", "b"], [1])
    with pytest.raises(ValueError, match="<image>"):
        prepare_batch_queries("internlm2-chat", ["<image>\na"], [0], has_images=False)
    with pytest.raises(ValueError, match="<image>"):
        prepare_batch_queries("internlm2-chat", ["<image><image>a"], [1])
    with pytest.raises(ValueError, match="at least one tile"):
        prepare_batch_queries("internlm2-chat", ["a"], [0])
