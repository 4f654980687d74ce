"""Int8 weights in the bitsandbytes format: an int8 checkpoint computes exactly what the float model whose Linear
weights are int8 x SCB / 127 computes (weight-only int8), `load_in_8bit` on the float checkpoint gives the same
model, the Linears are held as int8, and malformed int8 checkpoints are refused by name."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from safetensors.torch import load_file, save_file

from internvl_engine import AutoModel, AutoTokenizer, load_image
from internvl_engine.models.int8 import Int8FormatError, Int8Linear, quantize_rows
from internvl_engine.models.presets import preset_config
from internvl_engine.models.weights import WeightLoadError
from internvl_engine.testing.int8_checkpoint import write_int8_checkpoint

from golden_utils import MODELS, checkpoint, golden_json, image_path, rel_l2


@lru_cache(maxsize=None)
def int8_folder(name: str):
    import tempfile
    from pathlib import Path

    return write_int8_checkpoint(checkpoint(name), Path(tempfile.mkdtemp(prefix="int8-")) / name)


@lru_cache(maxsize=None)
def int8_model(name: str):
    return AutoModel.from_pretrained(int8_folder(name), torch_dtype=torch.float32)


def dequantized_float_model(name: str):
    """The float checkpoint with every int8 Linear's weight replaced by int8 x SCB / 127 (the reference)."""
    quantized = int8_model(name)
    model = AutoModel.from_pretrained(checkpoint(name), torch_dtype=torch.float32)
    for layer in quantized.int8_linears:
        source = quantized.get_submodule(layer)
        model.get_submodule(layer).weight.data = source.weight.float() * source.SCB[:, None] / 127
    return model


@pytest.mark.parametrize("name", MODELS)
def test_int8_checkpoint_holds_int8_linears(name):
    model = int8_model(name)
    assert model.int8_linears and "mlp1.3" not in model.int8_linears  # transformers' load_in_8bit choice
    assert model.quantization_config["load_in_8bit"] is True
    for layer in model.int8_linears:
        module = model.get_submodule(layer)
        assert isinstance(module, Int8Linear)
        assert (module.weight.dtype, module.SCB.dtype, module.weight_format.dtype) == \
            (torch.int8, torch.float32, torch.uint8)
    assert isinstance(model.get_submodule("mlp1.3"), torch.nn.Linear)
    assert model.dtype == torch.float32 and model.weight_dtype == "int8 weight-only (float32 activations)"
    layers = [model.get_submodule(layer) for layer in model.int8_linears]
    held = sum(m.weight.numel() * m.weight.element_size() + m.SCB.numel() * 4 for m in layers)
    assert held < 0.3 * sum(m.weight.numel() * 4 for m in layers)  # a byte per weight, not four


@pytest.mark.parametrize("name", MODELS)
def test_logits_equal_the_dequantized_float_model(name):
    spec = golden_json(name)["chat"]["image_one_tile"]
    (image, max_num), = spec["call"]["images"]
    pixel_values = load_image(image_path(image), max_num=max_num)
    input_ids = torch.tensor(spec["input_ids"])
    reference = dequantized_float_model(name)(pixel_values, input_ids).logits
    quantized = int8_model(name)(pixel_values, input_ids).logits
    assert rel_l2(quantized, reference) < 1e-6
    plain = AutoModel.from_pretrained(checkpoint(name), torch_dtype=torch.float32)(pixel_values, input_ids).logits
    assert rel_l2(quantized, plain) > 1e-6  # the weights really are quantized


def test_greedy_chat_tokens_equal_the_dequantized_float_model():
    name = MODELS[0]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint(name))
    pixel_values = load_image(image_path("land800x600"), max_num=6)
    config = dict(max_new_tokens=12, do_sample=False)
    expected = dequantized_float_model(name).chat(tokenizer, pixel_values, "<image>\nDescribe it.", config)
    assert int8_model(name).chat(tokenizer, pixel_values, "<image>\nDescribe it.", config) == expected


def test_load_in_8bit_quantizes_the_float_checkpoint_the_same_way():
    name = MODELS[1]
    quantized = AutoModel.from_pretrained(checkpoint(name), torch_dtype=torch.float32, load_in_8bit=True)
    stored = int8_model(name)
    assert quantized.int8_linears == stored.int8_linears
    for layer in stored.int8_linears:
        a, b = quantized.get_submodule(layer), stored.get_submodule(layer)
        assert torch.equal(a.weight, b.weight) and torch.equal(a.SCB, b.SCB)
    again = AutoModel.from_pretrained(int8_folder(name), torch_dtype=torch.float32, load_in_8bit=True)
    assert again.int8_linears == stored.int8_linears  # on an int8 checkpoint it changes nothing


def test_quantize_rows_follows_the_bitsandbytes_rule():
    weight = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.5, -3.0]])
    q, scb = quantize_rows(weight)
    assert scb.tolist() == [1.0, 0.0, 3.0]
    assert q.tolist() == [[64, -127, 32], [0, 0, 0], [127, 64, -127]]  # round(W * 127 / SCB); 63.5 -> 64


def test_malformed_int8_checkpoints_are_refused(tmp_path):
    source = int8_folder(MODELS[1])
    target = tmp_path / "bad"
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    shard = next(target.glob("*.safetensors"))
    tensors = load_file(str(shard))
    name = next(n for n in tensors if n.endswith(".weight_format"))
    tensors[name] = torch.ones((), dtype=torch.uint8)  # an old bitsandbytes tile layout
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(Int8FormatError, match="weight_format"):
        AutoModel.from_pretrained(target)
    tensors[name] = torch.zeros((), dtype=torch.uint8)
    tensors["vision_model.embeddings.patch_embedding.SCB"] = torch.ones(3)  # a Conv2d cannot be int8
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(Int8FormatError, match="not a Linear"):
        AutoModel.from_pretrained(target)
    del tensors["vision_model.embeddings.patch_embedding.SCB"]
    del tensors[name.replace(".weight_format", ".SCB")]  # int8 weight without its scales
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(WeightLoadError):
        AutoModel.from_pretrained(target)


def bf16_weight_bytes(preset: str, int8: bool) -> int:
    """Bytes of a preset's weights in bf16, its Linears int8 (+ float32 SCB) when `int8`."""
    from internvl_engine.compat import InternVLChat
    from internvl_engine.models.int8 import convert_linears, default_int8_targets

    with torch.device("meta"):
        model = InternVLChat(preset_config(preset))
        if int8:
            convert_linears(model, default_int8_targets(model))
    return sum(p.numel() * (4 if name.endswith(".SCB") else p.element_size() if p.dtype in (torch.int8, torch.uint8)
                            else 2) for name, p in model.named_parameters())


def test_full_size_int8_weights_fit_the_target():
    assert bf16_weight_bytes("internvl-chat-v1-5", False) / 1e9 == pytest.approx(51, abs=1)
    assert bf16_weight_bytes("internvl-chat-v1-5", True) / 1e9 <= 27  # the target for V1.5-Int8


def test_random_int8_weights_are_in_range_and_scaled():
    from internvl_engine.compat import InternVLChat
    from internvl_engine.config import InternVLConfig
    from internvl_engine.models.int8 import convert_linears, default_int8_targets
    from internvl_engine.models.presets import randomize_

    with torch.device("meta"):
        model = InternVLChat(InternVLConfig.from_pretrained(checkpoint(MODELS[1])))
        convert_linears(model, default_int8_targets(model))
    model = randomize_(model.to_empty(device="cpu"), seed=1)
    layer = model.get_submodule("language_model.output")
    assert layer.weight.dtype == torch.int8 and int(layer.weight.abs().max()) <= 127
    assert 0.01 < float(layer.dequantized().std()) < 0.04


@pytest.mark.slow
def test_the_w8a16_kernel_path_gives_the_reference_path_tokens():
    """The int8 Linears on the Triton backend (the W8A16 GEMM; interpreter on CPU) answer as on the torch one."""
    name = MODELS[1]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint(name))
    config = dict(max_new_tokens=6, do_sample=False)
    answers = []
    for backend in ("torch", "triton"):
        model = AutoModel.from_pretrained(int8_folder(name), torch_dtype=torch.float32, backend=backend)
        assert all(model.get_submodule(layer).backend == backend for layer in model.int8_linears)
        answers.append(model.chat(tokenizer, None, "Hello, who are you?", config))
    assert answers[0] == answers[1]
