"""The whole chat on the "triton" backend (kernels under the interpreter on CPU) gives the torch backend's tokens.

Both run on the engine's paged KV cache. Triton path: ViT attention kernel, the ViT's norms fused with the
layer-scaled residual adds (rms_norm / layer_norm kernels, q/k norms too), fused pixel unshuffle + LayerNorm, the
LLM's norms (ffn / post-attention norm fused with the attention residual), one gate_up GEMM and the silu * up
kernel, the paged prefill and decode kernels. Torch path: the reference modules and the attention references.
"""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from internvl_engine import AutoModel, AutoTokenizer, load_image
from internvl_engine.kernels import layer_norm, rms_norm, silu_mul

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


@pytest.fixture()
def kernel_calls(monkeypatch):
    """Counts the calls of the fused layer kernels (the models import them at call time)."""
    calls: dict[str, int] = {}

    def counted(module, name):
        fn = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    for module, name in ((rms_norm, "rms_norm"), (layer_norm, "layer_norm"), (silu_mul, "silu_mul"),
                         (silu_mul, "silu_mul_pair")):
        counted(module, name)
    return calls


@pytest.mark.parametrize("name", MODELS)
def test_fused_layers_run_on_the_triton_backend_only(name, kernel_calls):
    """The ViT (norms with the layer-scaled residual adds) and the LLM (norms, one gate_up GEMM, silu * up) run
    the fused kernels on "triton" and agree with the torch path; "torch" calls none of them."""
    model, tokenizer = load(name, "triton")
    reference, _ = load(name, "torch")
    vision = model.config.vision
    layers = vision.num_hidden_layers
    pixel_values = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    features = model.extract_feature(pixel_values)
    # Per layer: norm1 (fused with the previous layer's ls2 add from the second layer on) and norm2 (fused with
    # the ls1 add), plus q_norm and k_norm over the whole width with qk normalisation.
    kernel = "rms_norm" if vision.norm_type == "rms_norm" else "layer_norm"
    assert kernel_calls == {kernel: layers * (4 if vision.qk_normalization else 2)}
    assert rel_l2(features, reference.extract_feature(pixel_values)) < 1e-5

    kernel_calls.clear()
    config = dict(max_new_tokens=3, do_sample=False)
    response = model.chat(tokenizer, None, "Hello, who are you?", dict(config))
    assert response == reference.chat(tokenizer, None, "Hello, who are you?", dict(config))
    decoder = model.language_model.decoder_layers
    steps = 3  # a prefill and two decode steps (the final norm stays a torch module)
    assert kernel_calls == {"rms_norm": 2 * len(decoder) * steps, "silu_mul": len(decoder) * steps}
    if hasattr(decoder[0], "feed_forward"):  # InternLM2: w1 / w3 loaded into one storage, one GEMM
        assert all(layer.feed_forward.gate_up_weight() is not None for layer in decoder)

    kernel_calls.clear()
    reference.extract_feature(pixel_values)
    reference.chat(tokenizer, None, "Hello, who are you?", dict(config))
    assert kernel_calls == {}
