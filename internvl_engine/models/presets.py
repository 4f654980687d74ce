"""Full-size configurations of the released checkpoints, and random-weight models built directly on a device.

`--preset internvl-chat-v1-5 --random-weights` lets a GPU benchmark run the real shapes (25.5B parameters)
without the 51 GB download: parameters are allocated on the target device and filled there in place.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..config import InternVLConfig
from .int8 import convert_linears, default_int8_targets
from .internvl_chat import InternVLChatModel

_V15 = {
    "vision_config": {"hidden_size": 3200, "num_hidden_layers": 45, "num_attention_heads": 25,
                      "intermediate_size": 12800, "image_size": 448, "patch_size": 14, "norm_type": "rms_norm",
                      "qk_normalization": True, "qkv_bias": False, "layer_norm_eps": 1e-6, "hidden_act": "gelu"},
    "llm_config": {"architectures": ["InternLM2ForCausalLM"], "vocab_size": 92553, "hidden_size": 6144,
                   "num_hidden_layers": 48, "num_attention_heads": 48, "num_key_value_heads": 8,
                   "intermediate_size": 16384, "max_position_embeddings": 32768, "rope_theta": 1000000,
                   "rope_scaling": {"type": "dynamic", "factor": 2.0}, "rms_norm_eps": 1e-5, "bias": False,
                   "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
    "select_layer": -1, "template": "internlm2-chat", "downsample_ratio": 0.5, "dynamic_image_size": True,
    "use_thumbnail": True, "max_dynamic_patch": 12, "min_dynamic_patch": 1, "force_image_size": 448,
}

_MINI_2B = {
    "vision_config": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                      "intermediate_size": 4096, "image_size": 448, "patch_size": 14, "norm_type": "layer_norm",
                      "qk_normalization": False, "qkv_bias": True, "layer_norm_eps": 1e-6, "hidden_act": "gelu"},
    "llm_config": {"architectures": ["InternLM2ForCausalLM"], "vocab_size": 92553, "hidden_size": 2048,
                   "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 8,
                   "intermediate_size": 8192, "max_position_embeddings": 32768, "rope_theta": 1000000,
                   "rope_scaling": {"type": "dynamic", "factor": 2.0}, "rms_norm_eps": 1e-5, "bias": False,
                   "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
    "select_layer": -1, "ps_version": "v2", "template": "internlm2-chat", "downsample_ratio": 0.5,
    "dynamic_image_size": True, "use_thumbnail": True, "max_dynamic_patch": 12, "min_dynamic_patch": 1,
    "force_image_size": 448,
}

# Phi-3-mini-128k's sizes; the 48 su factor lists here are stand-ins with the real lists' shape (short near 1,
# long growing to ~48), not Microsoft's values: for random-weight benchmarks only the shapes matter.
_MINI_4B = {
    "vision_config": _MINI_2B["vision_config"],
    "llm_config": {"architectures": ["Phi3ForCausalLM"], "vocab_size": 32020, "hidden_size": 3072,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                   "intermediate_size": 8192, "max_position_embeddings": 131072,
                   "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
                   "rope_scaling": {"type": "su", "short_factor": [1.0 + 0.01 * i for i in range(48)],
                                    "long_factor": [1.0 + 47.0 * (i / 47) ** 2 for i in range(48)]},
                   "rms_norm_eps": 1e-5, "hidden_act": "silu", "sliding_window": 262144, "bos_token_id": 1,
                   "eos_token_id": 32000, "pad_token_id": 32000},
    "select_layer": -1, "ps_version": "v2", "template": "phi3-chat", "downsample_ratio": 0.5,
    "dynamic_image_size": True, "use_thumbnail": True, "max_dynamic_patch": 12, "min_dynamic_patch": 1,
    "force_image_size": 448,
}

PRESETS = {"internvl-chat-v1-5": _V15, "mini-internvl-chat-2b-v1-5": _MINI_2B, "mini-internvl-chat-4b-v1-5": _MINI_4B}


def preset_config(name: str) -> InternVLConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return InternVLConfig.from_dict(PRESETS[name])


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, progress: bool = False) -> torch.nn.Module:
    """Fill every parameter in place on its own device: norms and layer scales near 1 / 0.1, the rest
    N(0, 0.02), so activations stay finite at full depth. Deterministic for a seed and device (with or without
    `progress`, a tqdm bar on stderr over the bytes filled: the parameters and their draws keep their order)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    parameters = list(model.named_parameters())
    total = sum(param.numel() * param.element_size() for _, param in parameters)
    with tqdm(total=total, desc="random weights", unit="B", unit_scale=True, unit_divisor=1024,
              disable=not progress) as bar:
        for name, param in parameters:
            _fill_(name, param, generator, device)
            bar.update(param.numel() * param.element_size())
    return model


def _fill_(name: str, param: torch.nn.Parameter, generator: torch.Generator, device: torch.device) -> None:
    leaf = name.rsplit(".", 1)[-1]
    if param.dtype == torch.int8:  # int8 rows spanning [-127, 127]: with SCB 0.035, weights of std ~0.02
        param.copy_(torch.randint(-127, 128, param.shape, generator=generator, device=device, dtype=torch.int8))
    elif leaf == "SCB":
        param.fill_(0.035)
    elif leaf == "weight_format":
        param.zero_()
    elif leaf in ("ls1", "ls2"):
        param.fill_(0.1)
    elif "norm" in name and leaf == "weight" or name.startswith("mlp1.0.") and leaf == "weight":
        param.fill_(1.0)
    elif leaf == "bias":
        param.zero_()
    else:
        param.normal_(0.0, 0.02, generator=generator)


def build_random_model(name: str, dtype: torch.dtype, device: torch.device | str, seed: int = 0,
                       model_class: type[InternVLChatModel] = InternVLChatModel, int8: bool = False,
                       progress: bool = True) -> InternVLChatModel:
    """The preset's model with random weights, allocated directly on `device` (no host copy); with `int8`, its
    Linears int8 as `load_in_8bit` would make them (the real footprint of an Int8 checkpoint). `progress`: a tqdm
    bar "random weights" on stderr while the parameters are filled (full-size presets take tens of seconds on a
    CPU); False for none. The weights are the same either way."""
    config = preset_config(name)
    with torch.device("meta"):
        model = model_class(config)
    targets = default_int8_targets(model) if int8 else []
    convert_linears(model, targets)
    model = model.to(dtype=dtype)  # meta -> dtype is free (floating parameters only)
    for target in targets:  # keep the int8 layers' own dtypes (SCB float32)
        layer = model.get_submodule(target)
        layer.SCB = torch.nn.Parameter(torch.empty_like(layer.SCB, dtype=torch.float32), requires_grad=False)
    model = model.to_empty(device=device)  # one allocation
    model.int8_linears = targets
    return randomize_(model, seed, progress=progress).eval()
