"""Pixel shuffle (v1 / v2 token order) and the `mlp1` projector from ViT width to LLM width."""
from __future__ import annotations

import torch
from torch import nn


def pixel_shuffle(x: torch.Tensor, scale_factor: float, ps_version: str) -> torch.Tensor:
    """x [tiles, 32, 32, C] -> [tiles, 16, 16, 4C] in the official element order.

    v1 skips the final spatial transpose (a transposed token order that the V1.5 weights were trained with).
    """
    n, w, h, c = x.shape
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))  # [n, 32, 16, 2C]
    x = x.permute(0, 2, 1, 3).contiguous()  # [n, 16, 32, 2C]
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    if ps_version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()  # [n, 16, 16, 4C] with the two spatial axes swapped back
    return x


def drop_cls_and_shuffle(vit_hidden: torch.Tensor, scale_factor: float, ps_version: str) -> torch.Tensor:
    """ViT output [tiles, 1025, C] -> [tiles, 256, 4C] (class token dropped, patch grid row-major)."""
    patches = vit_hidden[:, 1:, :]
    side = int(patches.shape[1] ** 0.5)
    grid = patches.reshape(patches.shape[0], side, side, -1)
    shuffled = pixel_shuffle(grid, scale_factor, ps_version)
    return shuffled.reshape(shuffled.shape[0], -1, shuffled.shape[-1])


class Projector(nn.Sequential):
    """`mlp1` = LayerNorm(4C) -> Linear(4C, H) -> GELU -> Linear(H, H); indices 0, 1, 3 hold the weights."""

    def __init__(self, in_features: int, llm_hidden: int) -> None:
        super().__init__(
            nn.LayerNorm(in_features),
            nn.Linear(in_features, llm_hidden),
            nn.GELU(),
            nn.Linear(llm_hidden, llm_hidden),
        )

    def after_norm(self, normed: torch.Tensor) -> torch.Tensor:
        """The projector past its LayerNorm (for the fused pixel-unshuffle + LayerNorm kernel)."""
        return self[3](self[2](self[1](normed)))

