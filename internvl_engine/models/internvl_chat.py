"""InternVLChatModel: InternViT -> pixel shuffle -> mlp1 -> InternLM2 or Phi-3, wired like the official model.

The module only wires layers. Generation is the engine's (`engine/`, over `worker/`); the model-card API
(`chat`, `batch_chat`, `generate`, `forward`) is a subclass in `compat/` that submits requests to the engine.
"""
from __future__ import annotations

import importlib.util

import torch
from torch import nn

from ..config import InternVLConfig
from .intern_vit import InternVisionModel
from .internlm2 import InternLM2ForCausalLM
from .phi3 import Phi3ForCausalLM
from .projector import Projector, drop_cls_and_shuffle


BACKENDS = ("auto", "torch", "triton")
REFERENCE_TILES_PER_SLICE = 8  # tiles per ViT pass on the PyTorch path (activations of 8 tiles at a time)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


class InternVLChatModel(nn.Module):
    def __init__(self, config: InternVLConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = InternVisionModel(config.vision)
        vit_out = config.vision.hidden_size * config.shuffle_factor ** 2
        self.mlp1 = Projector(vit_out, config.llm.hidden_size)
        llm_class = Phi3ForCausalLM if config.llm.architecture == "Phi3ForCausalLM" else InternLM2ForCausalLM
        self.language_model = llm_class(config.llm)
        self.num_image_token = config.num_image_token
        self.template = config.template
        self.system_message: str | None = config.system_message
        self.img_context_token_id: int | None = None
        self.backend = "auto"
        self.int8_linears: list[str] = []  # Linears holding int8 weights (an int8 checkpoint, or load_in_8bit)
        self.quantization_config: dict | None = None  # config.json's, as the checkpoint states it

    @property
    def weight_dtype(self) -> str:
        """How the weights are held: the model dtype, or int8 weight-only with activations in it."""
        dtype = str(self.dtype).replace("torch.", "")
        return f"int8 weight-only ({dtype} activations)" if self.int8_linears else dtype

    def set_backend(self, backend: str) -> "InternVLChatModel":
        """"torch" (the reference), "triton" (the kernels), or "auto" (triton on CUDA, torch elsewhere)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        for name in self.int8_linears:
            self.get_submodule(name).backend = backend
        return self

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "triton" if self.device.type == "cuda" and triton_available() else "torch"

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.final_norm.weight.dtype  # a norm: never int8

    @property
    def device(self) -> torch.device:
        return self.language_model.final_norm.weight.device

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [tiles, 3, 448, 448] -> visual tokens [tiles, 256, llm_hidden].

        Tiles are independent: the PyTorch reference path runs them in slices of REFERENCE_TILES_PER_SLICE, so
        41 tiles never hold every tile's attention scores and MLP activations at once (the Triton path's
        attention keeps no scores, and the engine hands the ViT at most max_vit_tiles_per_step tiles anyway).
        """
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.vision.num_channels:
            raise ValueError(f"pixel_values must be [tiles, 3, H, W], got {list(pixel_values.shape)}")
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        if self.resolved_backend() == "triton":
            return self._features(pixel_values, use_triton=True)
        return torch.cat([self._features(pixel_values[start: start + REFERENCE_TILES_PER_SLICE], use_triton=False)
                          for start in range(0, pixel_values.shape[0], REFERENCE_TILES_PER_SLICE)])

    def _features(self, pixel_values: torch.Tensor, use_triton: bool) -> torch.Tensor:
        hidden = self.vision_model(pixel_values, select_layer=self.config.select_layer, use_triton=use_triton)
        if not use_triton:
            shuffled = drop_cls_and_shuffle(hidden, self.config.downsample_ratio, self.config.ps_version)
            return self.mlp1(shuffled)
        from ..kernels.pixel_unshuffle import pixel_unshuffle_layernorm

        norm = self.mlp1[0]
        normed = pixel_unshuffle_layernorm(hidden, norm.weight, norm.bias, norm.eps, self.config.ps_version)
        return self.mlp1.after_norm(normed)

    def embed_inputs(self, input_ids: torch.Tensor, vit_embeds: torch.Tensor | None) -> torch.Tensor:
        """input_ids [batch, seq] -> embeddings [batch, seq, H] with `<IMG_CONTEXT>` rows replaced in order."""
        embeds = self.language_model.embed(input_ids.to(self.device))
        if vit_embeds is None:
            return embeds
        if self.img_context_token_id is None:
            raise ValueError("img_context_token_id is unknown: load the model with AutoModel.from_pretrained "
                             "or set model.img_context_token_id")
        selected = input_ids.to(self.device) == self.img_context_token_id
        flat = vit_embeds.reshape(-1, vit_embeds.shape[-1])
        if int(selected.sum()) != flat.shape[0]:
            raise ValueError(f"the prompt has {int(selected.sum())} <IMG_CONTEXT> tokens but the images give "
                             f"{flat.shape[0]} visual tokens ({flat.shape[0] // self.num_image_token} tiles)")
        embeds = embeds.clone()
        embeds[selected] = flat.to(embeds.dtype)
        return embeds
