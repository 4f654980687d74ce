"""config.json for the tiny checkpoints: the release presets and the official config layout.

A `Preset` pairs an InternViT variant (`VisionSize`) with an InternLM2 variant (`LLMSize`) or a Phi-3 variant
(`Phi3Size`, Mini-InternVL-Chat-4B-V1.5) at tiny sizes, keeping each released model's structural switches.
`make_config` writes the config.json that the official InternVLChatConfig.to_dict() would write for it under
transformers 4.37, then deep-merges caller overrides (`REMOVE` as a value drops a key). The weights that match a
config are drawn by `checkpoint_builder`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import torch

from .tiny_phi3_tokenizer import NUM_ADDED_TOKENS


class _Remove:
    def __repr__(self) -> str:
        return "REMOVE"


REMOVE = _Remove()  # an override value meaning "drop this key" (None is a legitimate config value)


@dataclass(frozen=True)
class VisionSize:
    """The InternViT variant: its structural switches plus tiny sizes."""
    name_or_path: str
    norm_type: str
    qk_normalization: bool
    qkv_bias: bool
    initializer_factor: float
    initializer_range: float
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_hidden_layers: int = 2
    intermediate_size: int = 128


@dataclass(frozen=True)
class LLMSize:
    """The InternLM2 variant: GQA head counts, dynamic-NTK factor and tiny sizes."""
    name_or_path: str
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    rope_factor: float
    num_hidden_layers: int = 2


@dataclass(frozen=True)
class Phi3Size:
    """The Phi-3 variant (Mini-4B's LLM): head counts, `su` (LongRoPE) positions and tiny sizes.

    `original_max_position_embeddings` is where the long rotary factors start; tiny values let image prompts
    cross it. `max_position_embeddings` keeps the release's ratio to it (131072 / 4096 = 32)."""
    name_or_path: str
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    original_max_position_embeddings: int
    max_position_embeddings: int
    num_hidden_layers: int = 2


@dataclass(frozen=True)
class Preset:
    """One released model's structure at tiny size, plus the release's own config choices."""
    vision: VisionSize
    llm: LLMSize | Phi3Size
    ps_version: str | None  # None: omit the key, as the released InternVL-Chat-V1-5 config.json does (means v1)
    max_dynamic_patch: int

    @property
    def is_phi3(self) -> bool:
        """Phi-3 LLM: Llama-2 style tokenizer with Phi-3's added tokens, `phi3-chat` template."""
        return isinstance(self.llm, Phi3Size)


# The 300M tower of the Mini releases (LayerNorm, qkv bias, no q/k norm).
_VISION_300M = VisionSize("internvl-engine/tiny-random-InternViT-300M-448px-structure", norm_type="layer_norm",
                          qk_normalization=False, qkv_bias=True, initializer_factor=1.0, initializer_range=0.02,
                          num_attention_heads=2)


PRESETS: Mapping[str, Preset] = MappingProxyType({
    # InternViT-6B-448px-V1-5 (RMSNorm, q/k norm, no qkv bias) + InternLM2-Chat-20B (GQA 6:1, NTK factor 3).
    "internvl-chat-v1-5": Preset(
        VisionSize("internvl-engine/tiny-random-InternViT-6B-448px-V1-5-structure", norm_type="rms_norm",
                   qk_normalization=True, qkv_bias=False, initializer_factor=0.1, initializer_range=1e-10),
        LLMSize("internvl-engine/tiny-random-internlm2-chat-20b-structure", hidden_size=96, num_attention_heads=6,
                num_key_value_heads=2, intermediate_size=192, rope_factor=3.0),
        ps_version=None, max_dynamic_patch=12),
    # InternViT-300M-448px (LayerNorm, qkv bias) + InternLM2-Chat-1.8B (GQA 2:1, NTK factor 2).
    "mini-internvl-chat-2b-v1-5": Preset(
        _VISION_300M,
        LLMSize("internvl-engine/tiny-random-internlm2-chat-1_8b-structure", hidden_size=128, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=256, rope_factor=2.0),
        ps_version="v2", max_dynamic_patch=6),
    # InternViT-300M-448px + Phi-3-mini-128k-instruct (plain MHA like the release, untied head, su rotary). The
    # tiny tokenizer spells the default (Chinese) system message in more pieces than the golden's, so a one-tile
    # chat prompt is ~331 tokens: O = 340 keeps its prefill on the short factors and switches to the long ones a
    # few tokens into decoding, text prompts stay short, and multi-tile prompts are long from the prefill.
    "mini-internvl-chat-4b-v1-5": Preset(
        _VISION_300M,
        Phi3Size("internvl-engine/tiny-random-Phi-3-mini-128k-instruct-structure", hidden_size=128,
                 num_attention_heads=4, num_key_value_heads=4, intermediate_size=256,
                 original_max_position_embeddings=340, max_position_embeddings=340 * 32),
        ps_version="v2", max_dynamic_patch=12),
})


def su_rope_factors(head_dim: int) -> dict[str, list[float]]:
    """`su` rotary factor lists of length head_dim / 2 with the shape of Phi-3-mini-128k's: short factors rising
    gently from 1 to 1.5, long factors rising geometrically from 1.05 to 48.3 (the tiny golden's end points)."""
    n = head_dim // 2
    steps = [i / max(n - 1, 1) for i in range(n)]
    return {"long_factor": [round(1.05 * (48.3 / 1.05) ** t, 4) for t in steps],
            "short_factor": [round(1.0 + 0.5 * t * t, 4) for t in steps]}


def _pretrained_config_fields(dtype_name: str, bf16: bool, **specific: Any) -> dict[str, Any]:
    """The generic fields transformers 4.37's PretrainedConfig.to_dict() writes into every sub-config."""
    fields: dict[str, Any] = {
        "add_cross_attention": False, "bad_words_ids": None, "begin_suppress_tokens": None, "bos_token_id": None,
        "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None, "decoder_start_token_id": None,
        "diversity_penalty": 0.0, "do_sample": False, "early_stopping": False, "encoder_no_repeat_ngram_size": 0,
        "eos_token_id": None, "exponential_decay_length_penalty": None, "finetuning_task": None,
        "forced_bos_token_id": None, "forced_eos_token_id": None, "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
        "is_decoder": False, "is_encoder_decoder": False, "label2id": {"LABEL_0": 0, "LABEL_1": 1},
        "length_penalty": 1.0, "max_length": 20, "min_length": 0, "no_repeat_ngram_size": 0, "num_beam_groups": 1,
        "num_beams": 1, "num_return_sequences": 1, "output_attentions": False, "output_hidden_states": False,
        "output_scores": False, "pad_token_id": None, "prefix": None, "problem_type": None, "pruned_heads": {},
        "remove_invalid_values": False, "repetition_penalty": 1.0, "return_dict": True,
        "return_dict_in_generate": False, "sep_token_id": None, "suppress_tokens": None,
        "task_specific_params": None, "temperature": 1.0, "tf_legacy_loss": False, "tie_encoder_decoder": False,
        "tie_word_embeddings": True, "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torch_dtype": dtype_name,
        "torchscript": False, "transformers_version": "4.37.2", "typical_p": 1.0, "use_bfloat16": bf16,
    }
    fields.update(specific)
    return fields


def _deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if value is REMOVE:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def make_config(preset: str, *, vocab_size: int, dtype: torch.dtype = torch.bfloat16,
                overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """config.json for a preset, field for field as the official InternVLChatConfig.to_dict() writes it."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p, dtype_name = PRESETS[preset], str(dtype).removeprefix("torch.")
    bf16 = dtype == torch.bfloat16
    v = p.vision
    vision_config = _pretrained_config_fields(
        dtype_name, bf16, _name_or_path=v.name_or_path, architectures=["InternVisionModel"], attention_dropout=0.0,
        drop_path_rate=0.0, dropout=0.0, hidden_act="gelu", hidden_size=v.hidden_size, image_size=448,
        initializer_factor=v.initializer_factor, initializer_range=v.initializer_range,
        intermediate_size=v.intermediate_size, layer_norm_eps=1e-6, model_type="intern_vit_6b",
        norm_type=v.norm_type, num_attention_heads=v.num_attention_heads, num_channels=3,
        num_hidden_layers=v.num_hidden_layers, patch_size=14, qk_normalization=v.qk_normalization,
        qkv_bias=v.qkv_bias, use_flash_attn=True)
    if p.is_phi3:
        llm_config = _phi3_llm_config(p.llm, vocab_size, dtype_name, bf16)
    else:
        llm_config = _internlm2_llm_config(p.llm, vocab_size, dtype_name, bf16)
    config: dict[str, Any] = {
        "_commit_hash": None, "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                     "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
        "downsample_ratio": 0.5, "dynamic_image_size": True, "force_image_size": 448,
        "hidden_size": llm_config["hidden_size"], "llm_config": llm_config, "max_dynamic_patch": p.max_dynamic_patch,
        "min_dynamic_patch": 1, "model_type": "internvl_chat", "pad2square": False, "select_layer": -1,
        "template": "phi3-chat" if p.is_phi3 else "internlm2-chat",
        "tie_word_embeddings": False, "torch_dtype": dtype_name, "transformers_version": None,
        "use_backbone_lora": 0, "use_llm_lora": 0, "use_thumbnail": True, "vision_config": vision_config,
    }
    if p.ps_version is not None:
        config["ps_version"] = p.ps_version
    merged = _deep_merge(config, overrides or {})
    if "hidden_size" not in (overrides or {}):  # the official config mirrors the LLM width at the top level
        merged["hidden_size"] = merged["llm_config"]["hidden_size"]
    lc, llm_overrides = merged["llm_config"], (overrides or {}).get("llm_config") or {}
    if p.is_phi3 and "rope_scaling" not in llm_overrides:  # the factor lists follow an overridden head_dim
        lc["rope_scaling"] = {**su_rope_factors(lc["hidden_size"] // lc["num_attention_heads"]), "type": "su"}
    return merged


def _internlm2_llm_config(llm: LLMSize, vocab_size: int, dtype_name: str, bf16: bool) -> dict[str, Any]:
    """llm_config as the official InternLM2Config.to_dict() writes it."""
    return _pretrained_config_fields(
        dtype_name, bf16, _name_or_path=llm.name_or_path, architectures=["InternLM2ForCausalLM"],
        attn_implementation="eager",
        auto_map={"AutoConfig": "configuration_internlm2.InternLM2Config",
                  "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                  "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=2, hidden_act="silu", hidden_size=llm.hidden_size,
        initializer_range=0.02, intermediate_size=llm.intermediate_size, max_position_embeddings=32768,
        model_type="internlm2", num_attention_heads=llm.num_attention_heads,
        num_hidden_layers=llm.num_hidden_layers, num_key_value_heads=llm.num_key_value_heads, rms_norm_eps=1e-5,
        rope_scaling={"factor": llm.rope_factor, "type": "dynamic"}, rope_theta=1000000,
        tie_word_embeddings=False, use_cache=True, vocab_size=vocab_size)


def _phi3_llm_config(llm: Phi3Size, vocab_size: int, dtype_name: str, bf16: bool) -> dict[str, Any]:
    """llm_config as the official (InternVL's copy of) Phi3Config.to_dict() writes it: no `bias` key, `su` rope
    scaling with per-frequency factor lists, eos = pad = `<|endoftext|>` (the first added token)."""
    endoftext = vocab_size - NUM_ADDED_TOKENS  # the first added token, right after the sentencepiece vocab
    return _pretrained_config_fields(
        dtype_name, bf16, _name_or_path=llm.name_or_path, architectures=["Phi3ForCausalLM"], attention_dropout=0.0,
        attn_implementation="eager",
        auto_map={"AutoConfig": "configuration_phi3.Phi3Config", "AutoModel": "modeling_phi3.Phi3ForCausalLM",
                  "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"},
        bos_token_id=1, embd_pdrop=0.0, eos_token_id=endoftext, hidden_act="silu", hidden_size=llm.hidden_size,
        initializer_range=0.02, intermediate_size=llm.intermediate_size,
        max_position_embeddings=llm.max_position_embeddings, model_type="phi3",
        num_attention_heads=llm.num_attention_heads, num_hidden_layers=llm.num_hidden_layers,
        num_key_value_heads=llm.num_key_value_heads,
        original_max_position_embeddings=llm.original_max_position_embeddings, pad_token_id=endoftext,
        resid_pdrop=0.0, rms_norm_eps=1e-5,
        rope_scaling={**su_rope_factors(llm.hidden_size // llm.num_attention_heads), "type": "su"},
        rope_theta=10000.0, sliding_window=262144, tie_word_embeddings=False, use_cache=True, vocab_size=vocab_size)
