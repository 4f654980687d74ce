"""Full-size presets have the released models' shapes; random weights are deterministic and finite."""
from __future__ import annotations

import pytest
import torch

from internvl_engine.config import InternVLConfig
from internvl_engine.engine.llm import LLM
from internvl_engine.compat import InternVLChat
from internvl_engine.models.presets import preset_config, randomize_

from golden_utils import MODELS, checkpoint


@pytest.mark.parametrize("name,billions,vit_layers,llm_layers,ps_version", [
    ("internvl-chat-v1-5", 25.5, 45, 48, "v1"),
    ("mini-internvl-chat-2b-v1-5", 2.2, 24, 24, "v2"),
])
def test_full_size_shapes(name, billions, vit_layers, llm_layers, ps_version):
    config = preset_config(name)
    with torch.device("meta"):
        model = InternVLChat(config)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.05)
    assert (config.vision.num_hidden_layers, config.llm.num_hidden_layers) == (vit_layers, llm_layers)
    assert config.ps_version == ps_version and config.num_image_token == 256
    if name == "internvl-chat-v1-5":  # bf16 KV per token: 48 layers x 2 x 8 heads x 128 x 2 bytes = 192 KiB
        llm = config.llm
        assert llm.num_hidden_layers * 2 * llm.num_key_value_heads * llm.head_dim * 2 == 192 * 1024


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("internvl-9000")
    with pytest.raises(ValueError, match="preset"):
        LLM(None)


def test_random_weights_are_deterministic_and_finite():
    config = InternVLConfig.from_pretrained(checkpoint(MODELS[0]))
    first, second = (randomize_(InternVLChat(config), seed=3) for _ in range(2))
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name
    layer_scale = first.vision_model.encoder.layers[0].ls1
    assert torch.equal(layer_scale, torch.full_like(layer_scale, 0.1))
    first.img_context_token_id = 1002
    logits = first(torch.randn(1, 3, 448, 448), torch.tensor([[1] + [1002] * 256 + [7]])).logits
    assert torch.isfinite(logits).all()
