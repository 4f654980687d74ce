"""InternLM2's w1 / w3 held in one storage after loading: the official names and values stay, the torch path is
unchanged, the triton path runs one gate_up GEMM (two, with the activation still fused, once the storage is split
or the weights are int8)."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from internvl_engine import AutoModel
from internvl_engine.models.int8 import Int8Linear
from internvl_engine.models.internlm2 import FeedForward
from internvl_engine.models.weights import list_shards

from golden_utils import MODELS, checkpoint, rel_l2

INTERNLM2_MODELS = [name for name in MODELS if "4B" not in name]  # the 4B's Phi-3 has its own gate_up_proj


@lru_cache(maxsize=None)
def load(name: str, load_in_8bit: bool = False):
    return AutoModel.from_pretrained(checkpoint(name), torch_dtype=torch.float32, load_in_8bit=load_in_8bit)


def feed_forwards(model) -> list[FeedForward]:
    return [layer.feed_forward for layer in model.language_model.decoder_layers]


def activations(model, rows=13):
    gen = torch.Generator().manual_seed(rows)
    return torch.randn(1, rows, model.config.llm.hidden_size, generator=gen)


@pytest.mark.parametrize("name", INTERNLM2_MODELS)
def test_loaded_weights_keep_official_names_and_values(name):
    model = load(name)
    stored = {}
    for shard in list_shards(checkpoint(name)):
        stored.update(load_file(str(shard)))
    state = model.state_dict()
    assert set(state) == set(stored)
    for key, value in stored.items():
        assert torch.equal(state[key], value.float()), key
    for ff in feed_forwards(model):
        fused = ff.gate_up_weight()
        assert fused is not None and fused.shape == (2 * ff.w1.out_features, ff.w1.in_features)
        assert torch.equal(fused, torch.cat([ff.w1.weight, ff.w3.weight]))
        ff.fuse_gate_up()  # idempotent: the same storage
        assert ff.gate_up_weight().data_ptr() == fused.data_ptr()


@pytest.mark.parametrize("name", INTERNLM2_MODELS)
def test_torch_path_unchanged_and_triton_path_agrees(name):
    model = load(name)
    x = activations(model)
    for ff in feed_forwards(model):
        w1, w3, w2 = (m.weight.detach().clone() for m in (ff.w1, ff.w3, ff.w2))  # separate storages
        official = F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
        with torch.inference_mode():
            assert torch.equal(ff(x), official)
            assert rel_l2(ff(x, use_triton=True), official) < 1e-6


@pytest.mark.parametrize("name", INTERNLM2_MODELS[:1])
def test_split_storage_falls_back_to_two_gemms(name):
    model = AutoModel.from_pretrained(checkpoint(name), torch_dtype=torch.float32)
    ff = feed_forwards(model)[0]
    x = activations(model)
    with torch.inference_mode():
        expected = ff(x)
    ff._apply(lambda t: t.clone())  # what moving the model (.to / .cuda) does to the views
    assert ff.gate_up_weight() is None
    with torch.inference_mode():
        assert rel_l2(ff(x, use_triton=True), expected) < 1e-6
    ff.fuse_gate_up()
    assert ff.gate_up_weight() is not None


@pytest.mark.parametrize("name", INTERNLM2_MODELS[:1])
def test_int8_linears_keep_separate_gemms(name):
    model = load(name, load_in_8bit=True)
    for ff in feed_forwards(model):
        assert isinstance(ff.w1, Int8Linear) and isinstance(ff.w3, Int8Linear)
        assert ff.gate_up_weight() is None
    x = activations(model)
    with torch.inference_mode():
        for ff in feed_forwards(model):
            assert rel_l2(ff(x, use_triton=True), ff(x)) < 1e-6
