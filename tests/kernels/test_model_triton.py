"""The whole chat on the "triton" backend (kernels under the interpreter on CPU) gives the torch backend's tokens.

Triton path: ViT attention kernel, fused pixel unshuffle + LayerNorm, a paged KV cache read by the paged-decode
kernel. Torch path: the reference modules and the dense cache.
"""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from internvl_engine import AutoModel, AutoTokenizer, load_image
from internvl_engine.generation import generate
from internvl_engine.prompt import get_template
from internvl_engine.sampler import GenerationConfig

from golden_utils import MODELS, checkpoint, golden_json, image_path, rel_l2

DTYPE = torch.float32  # the interpreter's bf16 dots are unreliable; fp32 compares tokens with the goldens


@lru_cache(maxsize=None)
def load(name: str, backend: str):
    model = AutoModel.from_pretrained(checkpoint(name), torch_dtype=DTYPE, backend=backend)
    return model, AutoTokenizer.from_pretrained(checkpoint(name))


def test_backend_switch_validates():
    model, _ = load(MODELS[0], "torch")
    with pytest.raises(ValueError, match="backend"):
        model.set_backend("cuda")
    assert model.resolved_backend() == "torch"
    assert load(MODELS[0], "triton")[0].resolved_backend() == "triton"


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_features_match_between_backends(name):
    pixel_values = load_image(image_path("sq448"), max_num=12)
    torch_features = load(name, "torch")[0].extract_feature(pixel_values)
    triton_features = load(name, "triton")[0].extract_feature(pixel_values)
    assert rel_l2(triton_features, torch_features) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name,case", [(MODELS[0], "image_one_tile"), (MODELS[1], "text_multiturn")])
def test_chat_tokens_match_between_backends(name, case):
    spec = golden_json(name)["chat"][case]
    call = spec["call"]
    pixel_values = None
    if call["images"]:
        pixel_values = torch.cat([load_image(image_path(n), max_num=m) for n, m in call["images"]])
    history = [tuple(turn) for turn in call["history_in"]] if call["history_in"] else None
    responses = {}
    for backend in ("torch", "triton"):
        model, tokenizer = load(name, backend)
        responses[backend] = model.chat(tokenizer, pixel_values, call["question"], dict(call["generation_config"]),
                                        history=history)
    assert responses["triton"] == responses["torch"] == spec["response"]


def test_paged_decode_path_generates_the_golden_tokens_for_a_batch():
    """Left-padded batch on the paged cache (padding never stored): the official batch_chat's tokens."""
    name = MODELS[0]
    spec = golden_json(name)["chat"]["text_single"]
    model, tokenizer = load(name, "triton")
    tokenizer.padding_side = "left"
    try:
        inputs = tokenizer([spec["prompt_expanded"][0], "<|im_start|>user\nHi<|im_end|>"], return_tensors="pt",
                           padding=True)
    finally:
        tokenizer.padding_side = "right"
    assert inputs["attention_mask"][1, 0] == 0  # the short row really is padded
    embeds = model.embed_inputs(inputs["input_ids"], None)
    stop = {tokenizer.convert_tokens_to_ids(get_template(model.template).stop_token), tokenizer.eos_token_id}
    result = generate(model, embeds, inputs["attention_mask"], GenerationConfig(max_new_tokens=16), stop,
                      tokenizer.pad_token_id, tokenizer.bos_token_id)
    assert result.sequences[0] == spec["generated_ids"][0][: len(result.sequences[0])]
