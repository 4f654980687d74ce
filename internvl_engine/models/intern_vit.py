"""InternViT (6B: RMSNorm + q/k norm + layer scale; 300M: LayerNorm + qkv bias).

Parameter names equal the official state dict under `vision_model.`, so weights load without renaming.
Every tile attends only to itself (1025 tokens: class token + 32x32 patches), so tiles from any number of
images and requests batch along the first axis.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .layers import RMSNorm, activation, make_norm, norm_triton


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        side = cfg.num_patches_per_side
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, side * side + 1, cfg.hidden_size))

    def _patch_position_embedding(self, height: int, width: int) -> torch.Tensor:
        # Bicubic resize of the learned 32x32 grid to the patch grid (identity at 448x448), in float32 as official.
        side = self.cfg.num_patches_per_side
        table = self.position_embedding[:, 1:, :]
        grid = table.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        return grid.reshape(1, -1, height * width).permute(0, 2, 1).to(table.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [tiles, 3, 448, 448] -> embeddings [tiles, 1025, C]."""
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))  # [tiles, C, 32, 32]
        tiles, _, height, width = patches.shape
        patches = patches.flatten(2).transpose(1, 2)  # [tiles, 1024, C]
        cls = self.class_embedding.expand(tiles, 1, -1).to(dtype)
        positions = torch.cat([self.position_embedding[:, :1, :],
                               self._patch_position_embedding(height, width)], dim=1)
        return torch.cat([cls, patches], dim=1) + positions.to(dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.qk_normalization = cfg.qk_normalization
        if cfg.qk_normalization:
            # Over the whole width (all heads concatenated), not per head.
            self.q_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
            self.k_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, use_triton: bool = False) -> torch.Tensor:
        tiles, tokens, width = x.shape
        qkv = self.qkv(x).reshape(tiles, tokens, 3, width)  # split as (3, heads, head_dim)
        q, k, v = qkv.unbind(2)  # each [tiles, tokens, C]
        if self.qk_normalization:
            # On the triton path one kernel each, reading the strided q / k views of qkv in place.
            q = norm_triton(self.q_norm, q) if use_triton else self.q_norm(q)
            k = norm_triton(self.k_norm, k) if use_triton else self.k_norm(k)
        # [tiles, heads, tokens, head_dim]
        q, k, v = (t.reshape(tiles, tokens, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if use_triton:
            from ..kernels.vit_attention import vit_attention

            out = vit_attention(q, k, v)  # [tiles, heads, tokens, d] view of [tiles, tokens, heads, d] memory
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # non-causal, scale head_dim ** -0.5
        return self.proj(out.transpose(1, 2).reshape(tiles, tokens, width))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.act = activation(cfg.hidden_act)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg.norm_type, cfg.hidden_size, cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.ls1 = nn.Parameter(torch.ones(cfg.hidden_size))
        self.norm2 = make_norm(cfg.norm_type, cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)
        self.ls2 = nn.Parameter(torch.ones(cfg.hidden_size))

    def forward(self, x: torch.Tensor, use_triton: bool = False) -> torch.Tensor:
        if use_triton:
            hidden, mlp_out = self.forward_fused(x, norm_triton(self.norm1, x).to(x.dtype))
            return hidden + mlp_out * self.ls2
        x = x + self.attn(self.norm1(x).to(x.dtype), use_triton) * self.ls1
        return x + self.mlp(self.norm2(x).to(x.dtype)) * self.ls2

    def forward_fused(self, x: torch.Tensor, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The triton path, given x [tiles, tokens, C] and normed = norm1(x) -> (x + ls1 * attn, mlp_out).

        The ls1 residual add is fused into norm2's kernel; the caller adds ls2 * mlp_out, fused into the next
        layer's norm1 (`InternVisionModel`), so the residual stream is read and written once per norm."""
        attn = self.attn(normed, use_triton=True)
        normed, x = norm_triton(self.norm2, attn, residual=x, layer_scale=self.ls1)
        return x, self.mlp(normed.to(x.dtype))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class InternVisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1,
                return_all_hidden_states: bool = False, use_triton: bool = False
                ) -> torch.Tensor | list[torch.Tensor]:
        """pixel_values [tiles, 3, H, W] -> hidden states [tiles, 1025, C] of `select_layer`.

        Hidden state 0 is the embeddings and i the output of layer i-1 (official `hidden_states`), so
        select_layer -1 is the last layer (no final norm). Layers after the selected one are not run.
        """
        num_layers = len(self.encoder.layers)
        index = select_layer if select_layer >= 0 else num_layers + 1 + select_layer
        hidden = self.embeddings(pixel_values)
        states = [hidden]
        last = num_layers if return_all_hidden_states else index
        layers = self.encoder.layers[:last]
        if use_triton:
            states += self._fused_layer_outputs(hidden, layers)
        else:
            for layer in layers:
                hidden = layer(hidden)
                states.append(hidden)
        return states if return_all_hidden_states else states[index]

    @staticmethod
    def _fused_layer_outputs(hidden: torch.Tensor, layers: nn.ModuleList) -> list[torch.Tensor]:
        """The layers on the triton path -> each one's output. Layer i's `x + ls2 * mlp_out` is fused into layer
        i + 1's norm1 (the kernel writes the sum, which is layer i's output, and its norm); the last layer's
        add runs in torch."""
        outputs: list[torch.Tensor] = []
        if not layers:
            return outputs
        normed = norm_triton(layers[0].norm1, hidden).to(hidden.dtype)
        for i, layer in enumerate(layers):
            mid, mlp_out = layer.forward_fused(hidden, normed)
            if i + 1 < len(layers):
                normed, hidden = norm_triton(layers[i + 1].norm1, mlp_out, residual=mid, layer_scale=layer.ls2)
                normed = normed.to(hidden.dtype)
            else:
                hidden = mid + mlp_out * layer.ls2
            outputs.append(hidden)
        return outputs
