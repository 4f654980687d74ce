"""Build tiny random-weight checkpoints in the exact folder layout of the official InternVL 1.5 releases.

No checkpoint can be downloaded where the demo and the tests run, so one is generated: `config.json` with the
official field names, sharded bf16 safetensors with the official tensor names and shapes (plus the shard
index), and an InternLM2-style tokenizer (see `tiny_tokenizer`), or for the Phi-3 based Mini-4B a Llama-2 style
one with Phi-3's added tokens (see `tiny_phi3_tokenizer`). Only the sizes are tiny, so every code path that reads
a real checkpoint folder (sharding, GQA `wqkv` packing, Phi-3's fused `qkv_proj` / `gate_up_proj` and `su`
rotary, RMSNorm vs LayerNorm ViT, q/k norm, qkv bias, pixel-shuffle version, added tokens) is exercised by the
same files.
This module draws the weights, shards them and writes and caches the folder; the presets and config.json itself
come from `tiny_config`, whose names are re-exported here.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from .tiny_config import PRESETS, REMOVE, LLMSize, Phi3Size, Preset, VisionSize, make_config
from .tiny_phi3_tokenizer import PHI3_TOKENS, write_phi3_tokenizer
from .tiny_tokenizer import write_tokenizer

__all__ = [
    "BUILDER_VERSION", "END_ROW_SCALE", "LLMSize", "MARKER", "PRESETS", "Phi3Size", "Preset", "REMOVE", "TensorSpec",
    "VisionSize", "build_tiny_checkpoint", "default_demo_checkpoint_dir", "ensure_tiny_checkpoint",
    "ensure_tiny_tokenizer", "make_config", "tensor_specs", "write_preset_tokenizer",
]

# Bumped whenever the builder's output changes, so cached demo checkpoints from an older builder are rebuilt.
BUILDER_VERSION = "1"
MARKER = ".internvl_engine_complete"
_OWNED_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "model.safetensors.index.json", MARKER)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the state dict and how to draw it: normal(mean, std), or uniform[low, high] if `uniform`;
    then each (row, factor) of `row_scales` multiplies that row of the drawn values."""
    name: str
    shape: tuple[int, ...]
    mean: float = 0.0
    std: float = 0.0
    uniform: tuple[float, float] | None = None
    row_scales: tuple[tuple[int, float], ...] = ()


def _linear(name: str, out_features: int, in_features: int, bias: bool) -> list[TensorSpec]:
    # std 1/sqrt(fan_in) keeps each layer's output at unit scale at these tiny widths; the usual 0.02 would
    # make attention uniform and the logits flat, so every prompt would produce the same text.
    specs = [TensorSpec(f"{name}.weight", (out_features, in_features), std=1.0 / math.sqrt(in_features))]
    if bias:
        specs.append(TensorSpec(f"{name}.bias", (out_features,), std=0.05))
    return specs


def _norm(name: str, dim: int, bias: bool) -> list[TensorSpec]:
    # Gains near 1 with some noise, so a wrong norm (or a norm applied twice) changes the outputs visibly.
    specs = [TensorSpec(f"{name}.weight", (dim,), mean=1.0, std=0.1)]
    if bias:
        specs.append(TensorSpec(f"{name}.bias", (dim,), std=0.05))
    return specs


def tensor_specs(config: Mapping[str, Any]) -> list[TensorSpec]:
    """Every tensor of the official InternVLChatModel state dict for `config`, in the model's module order."""
    vc, lc = config["vision_config"], config["llm_config"]
    c, inter, patch = vc["hidden_size"], vc["intermediate_size"], vc["patch_size"]
    layer_norm = vc["norm_type"] == "layer_norm"
    num_positions = (vc["image_size"] // patch) ** 2 + 1
    specs = [
        TensorSpec("vision_model.embeddings.class_embedding", (1, 1, c), std=0.5),
        TensorSpec("vision_model.embeddings.patch_embedding.weight", (c, vc["num_channels"], patch, patch),
                   std=1.0 / math.sqrt(vc["num_channels"] * patch * patch)),
        TensorSpec("vision_model.embeddings.patch_embedding.bias", (c,), std=0.05),
        TensorSpec("vision_model.embeddings.position_embedding", (1, num_positions, c), std=0.3),
    ]
    for i in range(vc["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}"
        # Module order of the official InternVisionEncoderLayer: attn (qkv, q/k norm, proj), mlp, norms, ls.
        specs += _linear(f"{p}.attn.qkv", 3 * c, c, vc["qkv_bias"])
        if vc["qk_normalization"]:
            # The official q/k norms are RMSNorms over the full width whatever `norm_type` is.
            specs += _norm(f"{p}.attn.q_norm", c, bias=False) + _norm(f"{p}.attn.k_norm", c, bias=False)
        specs += _linear(f"{p}.attn.proj", c, c, bias=True)
        specs += _linear(f"{p}.mlp.fc1", inter, c, bias=True) + _linear(f"{p}.mlp.fc2", c, inter, bias=True)
        specs += _norm(f"{p}.norm1", c, layer_norm) + _norm(f"{p}.norm2", c, layer_norm)
        # Layer scale in [0.25, 0.75]: small enough to keep the residual stream bounded over the layers.
        specs += [TensorSpec(f"{p}.{ls}", (c,), uniform=(0.25, 0.75)) for ls in ("ls1", "ls2")]

    if (lc.get("architectures") or ["InternLM2ForCausalLM"])[0] == "Phi3ForCausalLM":
        specs += _phi3_specs(lc)
    else:
        specs += _internlm2_specs(lc)

    projector_in = int(c * round(1 / config["downsample_ratio"]) ** 2)
    specs += _norm("mlp1.0", projector_in, bias=True)
    specs += _linear("mlp1.1", lc["hidden_size"], projector_in, bias=True)
    specs += _linear("mlp1.3", lc["hidden_size"], lc["hidden_size"], bias=True)
    return specs


def _internlm2_specs(lc: Mapping[str, Any]) -> list[TensorSpec]:
    """InternLM2ForCausalLM under `language_model.`: packed `wqkv`, w1/w2/w3 MLP, `output` head."""
    hidden, vocab, bias = lc["hidden_size"], lc["vocab_size"], lc.get("bias", False)
    heads, kv_heads = lc["num_attention_heads"], lc["num_key_value_heads"]
    head_dim = hidden // heads
    specs = []
    specs.append(TensorSpec("language_model.model.tok_embeddings.weight", (vocab, hidden), std=1.0))
    for i in range(lc["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}"
        specs += _linear(f"{p}.attention.wqkv", (heads + 2 * kv_heads) * head_dim, hidden, bias)
        specs += _linear(f"{p}.attention.wo", hidden, heads * head_dim, bias)
        specs += _linear(f"{p}.feed_forward.w1", lc["intermediate_size"], hidden, bias=False)
        specs += _linear(f"{p}.feed_forward.w2", hidden, lc["intermediate_size"], bias=False)
        specs += _linear(f"{p}.feed_forward.w3", lc["intermediate_size"], hidden, bias=False)
        specs += _norm(f"{p}.attention_norm", hidden, bias=False) + _norm(f"{p}.ffn_norm", hidden, bias=False)
    specs += _norm("language_model.model.norm", hidden, bias=False)
    # A wider output head than 1/sqrt(H) gives logits a spread of a few units, so greedy text varies.
    specs.append(TensorSpec("language_model.output.weight", (vocab, hidden), std=2.5 / math.sqrt(hidden)))
    return specs


# The `<|end|>` row of Phi-3's output head is scaled by this, so that random-weight answers end (chat() stops at
# `<|end|>` only) after a few to a few dozen tokens instead of always running to max_new_tokens.
END_ROW_SCALE = 3.0


def _phi3_specs(lc: Mapping[str, Any]) -> list[TensorSpec]:
    """Phi3ForCausalLM under `language_model.`, in the official module order (attention `o_proj` before
    `qkv_proj`, the norms after the MLP): fused `qkv_proj` (all q heads, then k, then v) and `gate_up_proj`
    (gate rows, then up rows), no biases, untied `lm_head`."""
    hidden, vocab, inter = lc["hidden_size"], lc["vocab_size"], lc["intermediate_size"]
    heads, kv_heads = lc["num_attention_heads"], lc["num_key_value_heads"]
    head_dim = hidden // heads
    specs = [TensorSpec("language_model.model.embed_tokens.weight", (vocab, hidden), std=1.0)]
    for i in range(lc["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}"
        specs += _linear(f"{p}.self_attn.o_proj", hidden, heads * head_dim, bias=False)
        specs += _linear(f"{p}.self_attn.qkv_proj", (heads + 2 * kv_heads) * head_dim, hidden, bias=False)
        specs += _linear(f"{p}.mlp.gate_up_proj", 2 * inter, hidden, bias=False)
        specs += _linear(f"{p}.mlp.down_proj", hidden, inter, bias=False)
        specs += _norm(f"{p}.input_layernorm", hidden, bias=False)
        specs += _norm(f"{p}.post_attention_layernorm", hidden, bias=False)
    specs += _norm("language_model.model.norm", hidden, bias=False)
    # `<|end|>` is the 8th added token, counted from `<|endoftext|>` (eos) right after the sentencepiece vocab.
    end = lc["eos_token_id"] + PHI3_TOKENS.index("<|end|>") - PHI3_TOKENS.index("<|endoftext|>")
    scales = ((end, END_ROW_SCALE),) if 0 <= end < vocab else ()
    specs.append(TensorSpec("language_model.lm_head.weight", (vocab, hidden), std=2.5 / math.sqrt(hidden),
                            row_scales=scales))
    return specs


def _draw(spec: TensorSpec, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """A tensor from its own generator, keyed by (seed, name): values do not depend on sharding or tensor order."""
    digest = hashlib.sha256(f"{seed}:{spec.name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    if spec.uniform is not None:
        low, high = spec.uniform
        values = torch.rand(spec.shape, generator=gen) * (high - low) + low
    else:
        values = torch.randn(spec.shape, generator=gen) * spec.std + spec.mean
    for row, factor in spec.row_scales:
        values[row] *= factor
    return values.to(dtype).contiguous()


def _split_shards(specs: list[TensorSpec], num_shards: int, itemsize: int) -> list[list[TensorSpec]]:
    """Contiguous runs of whole tensors of roughly equal byte size, none empty."""
    if not 1 <= num_shards <= len(specs):
        raise ValueError(f"num_shards must be between 1 and {len(specs)}, got {num_shards}")
    sizes = [math.prod(s.shape) * itemsize for s in specs]
    total, shards, start, done = sum(sizes), [], 0, 0
    for k in range(1, num_shards):
        end = start + 1
        # Grow the shard while it stays under its share and enough tensors remain for the shards after it.
        while end < len(specs) - (num_shards - k) and done + sum(sizes[start:end + 1]) <= total * k / num_shards:
            end += 1
        shards.append(specs[start:end])
        done += sum(sizes[start:end])
        start = end
    shards.append(specs[start:])
    return shards


def build_tiny_checkpoint(folder: str | os.PathLike[str], *, preset: str = "internvl-chat-v1-5", seed: int = 0,
                          num_shards: int = 2, dtype: torch.dtype = torch.bfloat16, overwrite: bool = False,
                          config_overrides: Mapping[str, Any] | None = None) -> Path:
    """Write a complete tiny checkpoint folder and return its path.

    `config_overrides` is deep-merged into config.json before the weights are drawn (use `REMOVE` as a value to
    drop a key), so the tensors always match the written config. The tokenizer fixes `llm_config.vocab_size`
    unless an override sets it. Raises FileExistsError if `folder` is non-empty and `overwrite` is false.
    """
    folder = Path(folder)
    if preset not in PRESETS or num_shards < 1:  # fail before writing anything
        raise ValueError(f"need a preset in {sorted(PRESETS)} and num_shards >= 1, got {preset!r}, {num_shards}")
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{folder} is not empty; pass overwrite=True to replace the checkpoint in it")
        # Delete only what a build writes (stale shards included), never unrelated files a user keeps there.
        for stale in [*(folder / name for name in _OWNED_FILES), *folder.glob("model*.safetensors")]:
            stale.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)

    vocab_size = write_preset_tokenizer(folder, preset)
    config = make_config(preset, vocab_size=vocab_size, dtype=dtype, overrides=config_overrides)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    specs = tensor_specs(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _split_shards(specs, num_shards, itemsize)
    names = (["model.safetensors"] if num_shards == 1 else
             [f"model-{i:05d}-of-{num_shards:05d}.safetensors" for i in range(1, num_shards + 1)])
    weight_map: dict[str, str] = {}
    for shard_name, shard_specs in zip(names, shards):
        # Only this shard's tensors are alive at once.
        tensors = {spec.name: _draw(spec, seed, dtype) for spec in shard_specs}
        save_file(tensors, str(folder / shard_name), metadata={"format": "pt"})
        weight_map.update((name, shard_name) for name in tensors)
        del tensors
    if num_shards > 1:
        index = {"metadata": {"total_size": sum(math.prod(s.shape) for s in specs) * itemsize},
                 "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return folder


def write_preset_tokenizer(folder: str | os.PathLike[str], preset: str = "internvl-chat-v1-5") -> int:
    """Write the tokenizer files of `preset`'s LLM family into `folder`; return the full vocab size."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return (write_phi3_tokenizer if PRESETS[preset].is_phi3 else write_tokenizer)(Path(folder))


def cache_dir() -> Path:
    """Where demo checkpoints live: $INTERNVL_ENGINE_CACHE if set, else ~/.cache/internvl_engine."""
    root = os.environ.get("INTERNVL_ENGINE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "internvl_engine"


def default_demo_checkpoint_dir(preset: str = "internvl-chat-v1-5", seed: int = 0) -> Path:
    """The demo checkpoint's folder under `cache_dir()`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return cache_dir() / f"demo-{preset}-seed{seed}"


def _is_complete(folder: Path) -> bool:
    marker = folder / MARKER
    return marker.is_file() and marker.read_text(encoding="utf-8").strip() == BUILDER_VERSION


def _build_once(target: Path, build) -> Path:
    """Build `target` with `build(tmp)` in a temporary sibling folder and rename it into place, the marker written
    last, so an interrupted or concurrent build never leaves a half-written folder that looks complete."""
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        (tmp / MARKER).write_text(BUILDER_VERSION + "\n", encoding="utf-8")
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:
            if not _is_complete(target):  # not another process's finished build: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def ensure_tiny_checkpoint(preset: str = "internvl-chat-v1-5", seed: int = 0,
                           folder: str | os.PathLike[str] | None = None) -> Path:
    """The demo checkpoint for (preset, seed), built on first use and reused afterwards."""
    target = Path(folder) if folder is not None else default_demo_checkpoint_dir(preset, seed)
    return _build_once(target, lambda tmp: build_tiny_checkpoint(tmp, preset=preset, seed=seed, overwrite=True))


def ensure_tiny_tokenizer(folder: str | os.PathLike[str] | None = None, *, preset: str = "internvl-chat-v1-5"
                          ) -> Path:
    """A folder with only the tiny tokenizer's files (no weights), for random-weight presets: the InternLM2-style
    one, or for a Phi-3 preset (Mini-4B) the Phi-3 one, whose added tokens the `phi3-chat` template needs."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    phi3 = PRESETS[preset].is_phi3
    target = Path(folder) if folder is not None else cache_dir() / ("tiny-tokenizer-phi3" if phi3 else "tiny-tokenizer")
    return _build_once(target, lambda tmp: write_preset_tokenizer(tmp, preset))
