"""Frozen model configuration parsed from an official InternVL checkpoint's config.json.

A field that the official config classes default is optional here and takes the same default (the released
InternVL-Chat-V1-5 config.json predates `ps_version`, so it runs pixel shuffle v1). Fields with no meaningful
official default — sizes, layer counts, head counts, vocabulary — are required, and a missing or malformed
one raises `ConfigError` naming it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping


# The released models this engine serves, by the names of their presets (tiny checkpoints and real shapes).
MODEL_PRESETS = ("internvl-chat-v1-5", "mini-internvl-chat-2b-v1-5", "mini-internvl-chat-4b-v1-5")


class ConfigError(ValueError):
    """config.json is missing, unreadable, or has a missing / invalid field."""


_MISSING = object()


def _get(section: Mapping[str, Any], name: str, where: str, kind: type | tuple[type, ...], default: Any = _MISSING):
    if name not in section or section[name] is None:
        if default is _MISSING:
            raise ConfigError(f"config.json: required field '{where}{name}' is missing")
        return default
    value = section[name]
    # bool is an int subclass: refuse True where a count is expected.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(f"config.json: field '{where}{name}' must be {kind}, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"config.json: field '{where}{name}' must be {kind}, got {value!r}")
    return value


def _positive(value: int, name: str) -> int:
    if value < 1:
        raise ConfigError(f"config.json: field '{name}' must be >= 1, got {value}")
    return value


@dataclass(frozen=True)
class VisionConfig:
    """InternViT: 6B (RMSNorm, q/k norm over the whole width) or 300M (LayerNorm, qkv bias)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = False
    qk_normalization: bool = True
    norm_type: str = "rms_norm"
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VisionConfig":
        w = "vision_config."
        cfg = cls(
            hidden_size=_positive(_get(d, "hidden_size", w, int), w + "hidden_size"),
            num_hidden_layers=_positive(_get(d, "num_hidden_layers", w, int), w + "num_hidden_layers"),
            num_attention_heads=_positive(_get(d, "num_attention_heads", w, int), w + "num_attention_heads"),
            intermediate_size=_positive(_get(d, "intermediate_size", w, int), w + "intermediate_size"),
            image_size=_get(d, "image_size", w, int, 448),
            patch_size=_get(d, "patch_size", w, int, 14),
            num_channels=_get(d, "num_channels", w, int, 3),
            qkv_bias=_get(d, "qkv_bias", w, bool, False),
            qk_normalization=_get(d, "qk_normalization", w, bool, True),
            norm_type=_get(d, "norm_type", w, str, "rms_norm"),
            layer_norm_eps=float(_get(d, "layer_norm_eps", w, (int, float), 1e-6)),
            hidden_act=_get(d, "hidden_act", w, str, "gelu"),
        )
        if cfg.norm_type not in ("rms_norm", "layer_norm"):
            raise ConfigError(f"config.json: '{w}norm_type' must be 'rms_norm' or 'layer_norm', got {cfg.norm_type!r}")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ConfigError(f"config.json: '{w}hidden_size' ({cfg.hidden_size}) is not divisible by "
                              f"'num_attention_heads' ({cfg.num_attention_heads})")
        return cfg


@dataclass(frozen=True)
class RopeScaling:
    """Rotary scaling: InternLM2's 'dynamic' (NTK, active past max_position_embeddings) or 'linear' (`factor`);
    Phi-3's 'su' (LongRoPE, alias 'longrope'): per-frequency `short_factor` / `long_factor` lists."""

    type: str
    factor: float = 1.0
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()


LLM_ARCHITECTURES = ("InternLM2ForCausalLM", "Phi3ForCausalLM")
# The official config classes' defaults where they differ by architecture (InternLM2Config, Phi3Config).
_PHI3_DEFAULTS = dict(max_position_embeddings=4096, rms_norm_eps=1e-5, bias=False, bos_token_id=1, eos_token_id=32000,
                      pad_token_id=32000)


@dataclass(frozen=True)
class LLMConfig:
    """The language model: InternLM2 (V1.5, Mini-2B) or Phi-3 (Mini-4B)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    hidden_act: str = "silu"
    bias: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    tie_word_embeddings: bool = False
    architecture: str = "InternLM2ForCausalLM"
    original_max_position_embeddings: int | None = None  # Phi-3 'su': where the long factors start
    sliding_window: int | None = None  # Phi-3: a query at p sees keys p - w + 1 ... p

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def max_context_length(self) -> int:
        """Longest sequence served: max_position_embeddings, times the dynamic/linear scaling factor when scaled
        (Phi-3's su scaling is already counted in its max_position_embeddings)."""
        factor = self.rope_scaling.factor if self.rope_scaling is not None else 1.0
        return int(self.max_position_embeddings * max(factor, 1.0))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LLMConfig":
        w = "llm_config."
        architectures = d.get("architectures") or ["InternLM2ForCausalLM"]
        architecture = architectures[0]
        if architecture not in LLM_ARCHITECTURES:
            raise ConfigError(f"config.json: '{w}architectures' is {architecture!r}; this engine supports "
                              f"{' and '.join(LLM_ARCHITECTURES)} (the InternVL 1.5 LLMs)")
        phi3 = architecture == "Phi3ForCausalLM"
        default = (lambda name, value: _PHI3_DEFAULTS.get(name, value)) if phi3 else (lambda name, value: value)
        heads = _positive(_get(d, "num_attention_heads", w, int), w + "num_attention_heads")
        kv_heads = _positive(_get(d, "num_key_value_heads", w, int, heads), w + "num_key_value_heads")
        max_positions = _get(d, "max_position_embeddings", w, int, default("max_position_embeddings", 2048))
        original = _get(d, "original_max_position_embeddings", w, int, max_positions) if phi3 else None
        sliding_window = _get(d, "sliding_window", w, int, None) if phi3 else None
        cfg = cls(
            vocab_size=_positive(_get(d, "vocab_size", w, int), w + "vocab_size"),
            hidden_size=_positive(_get(d, "hidden_size", w, int), w + "hidden_size"),
            intermediate_size=_positive(_get(d, "intermediate_size", w, int), w + "intermediate_size"),
            num_hidden_layers=_positive(_get(d, "num_hidden_layers", w, int), w + "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=max_positions,
            rms_norm_eps=float(_get(d, "rms_norm_eps", w, (int, float), default("rms_norm_eps", 1e-6))),
            rope_theta=float(_get(d, "rope_theta", w, (int, float), 10000.0)),
            rope_scaling=_rope_scaling(d.get("rope_scaling"), w, phi3, heads, _get(d, "hidden_size", w, int)),
            hidden_act=_get(d, "hidden_act", w, str, "silu"),
            bias=_get(d, "bias", w, bool, default("bias", True)),
            bos_token_id=_get(d, "bos_token_id", w, int, default("bos_token_id", 1)),
            eos_token_id=_get(d, "eos_token_id", w, int, default("eos_token_id", 2)),
            pad_token_id=_get(d, "pad_token_id", w, int, default("pad_token_id", 0)),
            tie_word_embeddings=_get(d, "tie_word_embeddings", w, bool, False),
            architecture=architecture,
            original_max_position_embeddings=original,
            sliding_window=sliding_window,
        )
        if sliding_window is not None and sliding_window < 1:
            raise ConfigError(f"config.json: '{w}sliding_window' must be >= 1, got {sliding_window}")
        if cfg.hidden_size % heads or heads % kv_heads:
            raise ConfigError(f"config.json: '{w}hidden_size' ({cfg.hidden_size}) must be divisible by "
                              f"num_attention_heads ({heads}), which must be divisible by num_key_value_heads ({kv_heads})")
        return cfg


def _rope_scaling(scaling: Any, w: str, phi3: bool, heads: int, hidden: int) -> RopeScaling | None:
    if scaling is None:
        return None
    kinds = ("su", "longrope") if phi3 else ("dynamic", "linear")
    if not isinstance(scaling, Mapping) or scaling.get("type") not in kinds:
        raise ConfigError(f"config.json: '{w}rope_scaling' must have type {' or '.join(map(repr, kinds))}, got "
                          f"{scaling!r}")
    if not phi3:
        return RopeScaling(type=scaling["type"], factor=float(_get(scaling, "factor", w + "rope_scaling.",
                                                                   (int, float))))
    lists = {}
    for name in ("short_factor", "long_factor"):
        values = _get(scaling, name, w + "rope_scaling.", list)
        if len(values) != hidden // heads // 2 or not all(isinstance(v, (int, float)) and v > 0 for v in values):
            raise ConfigError(f"config.json: '{w}rope_scaling.{name}' must hold head_dim / 2 = {hidden // heads // 2} "
                              f"positive numbers, got {len(values)} values")
        lists[name] = tuple(float(v) for v in values)
    return RopeScaling(type="su", **lists)


@dataclass(frozen=True)
class InternVLConfig:
    """The whole InternVL-Chat model: vision tower, pixel-shuffle projector, LLM, and image/prompt settings."""

    vision: VisionConfig
    llm: LLMConfig
    downsample_ratio: float = 0.5
    ps_version: str = "v1"
    select_layer: int = -1
    template: str | None = None
    force_image_size: int | None = None
    dynamic_image_size: bool = False
    use_thumbnail: bool = False
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    system_message: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def image_size(self) -> int:
        return self.force_image_size or self.vision.image_size

    @property
    def num_image_token(self) -> int:
        """Visual tokens per 448x448 tile after pixel shuffle: (448/14)^2 * 0.5^2 = 256."""
        return int((self.image_size // self.vision.patch_size) ** 2 * (self.downsample_ratio ** 2))

    @property
    def shuffle_factor(self) -> int:
        return int(round(1 / self.downsample_ratio))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "InternVLConfig":
        for section in ("vision_config", "llm_config"):
            if not isinstance(d.get(section), Mapping):
                raise ConfigError(f"config.json: required section '{section}' is missing")
        cfg = cls(
            vision=VisionConfig.from_dict(d["vision_config"]),
            llm=LLMConfig.from_dict(d["llm_config"]),
            downsample_ratio=float(_get(d, "downsample_ratio", "", (int, float), 0.5)),
            ps_version=_get(d, "ps_version", "", str, "v1"),
            select_layer=_get(d, "select_layer", "", int, -1),
            template=_get(d, "template", "", str, None),
            force_image_size=_get(d, "force_image_size", "", int, None),
            dynamic_image_size=_get(d, "dynamic_image_size", "", bool, False),
            use_thumbnail=_get(d, "use_thumbnail", "", bool, False),
            min_dynamic_patch=_get(d, "min_dynamic_patch", "", int, 1),
            max_dynamic_patch=_get(d, "max_dynamic_patch", "", int, 6),
            system_message=_get(d, "system_message", "", str, None),
            extra=dict(d),
        )
        if cfg.ps_version not in ("v1", "v2"):
            raise ConfigError(f"config.json: 'ps_version' must be 'v1' or 'v2', got {cfg.ps_version!r}")
        if cfg.downsample_ratio != 0.5:
            raise ConfigError(f"config.json: 'downsample_ratio' {cfg.downsample_ratio} is not supported (InternVL 1.5 uses 0.5)")
        if not -cfg.vision.num_hidden_layers - 1 <= cfg.select_layer <= cfg.vision.num_hidden_layers:
            raise ConfigError(f"config.json: 'select_layer' {cfg.select_layer} is out of range for "
                              f"{cfg.vision.num_hidden_layers} vision layers")
        if not 1 <= cfg.min_dynamic_patch <= cfg.max_dynamic_patch:
            raise ConfigError(f"config.json: need 1 <= min_dynamic_patch <= max_dynamic_patch, got "
                              f"{cfg.min_dynamic_patch}, {cfg.max_dynamic_patch}")
        return cfg

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "InternVLConfig":
        folder = Path(path)
        if not folder.is_dir():
            raise ConfigError(f"checkpoint folder {str(folder)!r} does not exist or is not a directory")
        file = folder / "config.json"
        if not file.is_file():
            raise ConfigError(f"{file}: config.json not found in the checkpoint folder")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{file}: cannot parse config.json: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: config.json must hold a JSON object")
        return cls.from_dict(data)

    def with_max_position_embeddings(self, value: int) -> "InternVLConfig":
        """A copy with another rotary scaling threshold (used to exercise dynamic NTK on short prompts)."""
        return replace(self, llm=replace(self.llm, max_position_embeddings=value))
