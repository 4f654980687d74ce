"""The whole chat on the "triton" backend (kernels under the interpreter on CPU) gives the torch backend's tokens.

Both run on the engine's paged KV cache. Triton path: ViT attention kernel, fused pixel unshuffle + LayerNorm,
the paged-decode kernel. Torch path: the reference modules and the paged-decode reference.
"""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from internvl_engine import AutoModel, AutoTokenizer, load_image

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


def test_batch_chat_on_the_kernels_gives_the_official_responses():
    """Left-padded rows of unequal lengths as separate engine requests, decoded by the paged-decode kernel."""
    name = MODELS[0]
    spec = golden_json(name)["chat"]["batch"]
    call = spec["call"]
    model, tokenizer = load(name, "triton")
    questions = [call["questions"][1], "Hello, who are you?"]  # text only: the ViT kernels are tested above
    responses = model.batch_chat(tokenizer, None, questions, dict(call["generation_config"]))
    reference, _ = load(name, "torch")
    assert responses == reference.batch_chat(tokenizer, None, questions, dict(call["generation_config"]))
    assert responses[1] == reference.chat(tokenizer, None, questions[1], dict(call["generation_config"]))
