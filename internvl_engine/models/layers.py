"""Small modules shared by the vision tower and the LLM, written to match the official numerics.

The official RMSNorm normalises in float32, casts back to the input dtype, and only then multiplies by the
weight; the rotary tables are built in float32 and cast to the activation dtype before use. Both orders matter
for bf16 agreement with the official model, so they are kept here verbatim in behaviour.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RopeScaling


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def make_norm(norm_type: str, hidden_size: int, eps: float) -> nn.Module:
    if norm_type == "rms_norm":
        return RMSNorm(hidden_size, eps)
    return nn.LayerNorm(hidden_size, eps=eps)


def uses_triton(cache: object) -> bool:
    """Whether an LLM forward runs on the "triton" backend. The model runner's attention objects carry the
    model's backend switch (`PagedAttention` in its `AttentionBatch`, the static decode's attention directly);
    any other `cache` (`MaskedAttention`: the official full-sequence forward) runs the torch reference."""
    flag = getattr(cache, "use_triton", None)
    if flag is None:
        flag = getattr(getattr(cache, "batch", None), "use_triton", False)
    return bool(flag)


def norm_triton(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None,
                layer_scale: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`norm` (an RMSNorm or nn.LayerNorm over the last dim) of x -> out, or of h = residual + x * layer_scale ->
    (out, h), in one Triton kernel with the torch modules' numerics (kernels/rms_norm.py, kernels/layer_norm.py)."""
    if isinstance(norm, RMSNorm):
        from ..kernels.rms_norm import rms_norm

        return rms_norm(x, norm.weight, norm.eps, residual, layer_scale)
    if isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1 and norm.weight is not None:
        from ..kernels.layer_norm import layer_norm

        return layer_norm(x, norm.weight, norm.bias, norm.eps, residual, layer_scale)
    raise TypeError(f"no Triton kernel for {norm!r}")


def activation(name: str):
    """The activations the checkpoints name: 'gelu' is the exact (erf) GELU, as in transformers' ACT2FN."""
    table = {
        "gelu": F.gelu,
        "silu": F.silu,
        "swish": F.silu,
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(table)}")
    return table[name]


class RotaryEmbedding(nn.Module):
    """Rotate-half rotary embedding with InternLM2's dynamic-NTK or linear scaling.

    The official dynamic module is stateful (its base only grows across calls). Here the base is a pure
    function of the sequence length that the caller passes per row (`rope_lengths`): the number of tokens in
    that row's KV cache after this forward, which is exactly what a fresh official module uses at each step.
    """

    def __init__(self, head_dim: int, theta: float, max_position_embeddings: int,
                 scaling: RopeScaling | None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.max_position_embeddings = max_position_embeddings
        self.scaling = scaling

    def inv_freq(self, base: float, device: torch.device) -> torch.Tensor:
        # [head_dim / 2] float32; `base ** exponent` as a python-scalar power, like the official module.
        exponent = torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim
        return 1.0 / (base ** exponent)

    # The dynamic-NTK base is picked on the host from the lengths: a static decode step takes unscaled rows only.
    static_rope_lengths = False

    def variant(self, seq_len: int) -> str | None:
        """Which rotation a forward over `seq_len` tokens uses: None for the base theta, else a key naming it
        (keys rotated differently must not share prefix-cache blocks, nor static decode graphs)."""
        base = self.base_for_length(seq_len)
        return None if base == self.theta else f"ntk-base:{base!r}"

    def base_for_length(self, seq_len: int) -> float:
        if self.scaling is None or self.scaling.type != "dynamic" or seq_len <= self.max_position_embeddings:
            return self.theta
        factor = self.scaling.factor
        ratio = factor * seq_len / self.max_position_embeddings - (factor - 1)
        return self.theta * ratio ** (self.head_dim / (self.head_dim - 2))

    def cos_sin(self, positions: torch.Tensor, rope_lengths: list[int] | torch.Tensor | tuple[torch.Tensor, int],
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [batch, seq] int64 -> cos, sin [batch, 1, seq, head_dim] in `dtype`.

        rope_lengths: one KV length per row (list), or per token ([batch, seq] tensor, for a flattened batch
        of several requests), or per token with its maximum as the host knows it ((tensor, max) pair: the engine
        step's form, which never reads the device); it only matters past max_position_embeddings (dynamic NTK)."""
        device = positions.device
        if isinstance(rope_lengths, tuple):
            rope_lengths, longest = rope_lengths
        elif isinstance(rope_lengths, torch.Tensor):
            longest = int(rope_lengths.max()) if rope_lengths.numel() else 0  # a host sync: pass the pair instead
        if isinstance(rope_lengths, torch.Tensor):
            if self.base_for_length(longest) == self.theta:
                inv = self.inv_freq(self.theta, device)[None, None]  # [1, 1, d/2]: no token is scaled
            else:
                # Lengths up to max_position_embeddings keep theta (entry 0); entry i is the base of length first + i.
                first = self.max_position_embeddings
                table = torch.tensor([self.theta] + [self.base_for_length(n) for n in range(first + 1, longest + 1)],
                                     dtype=torch.float32)
                table = (table.pin_memory() if device.type == "cuda" else table).to(device, non_blocking=True)
                bases = table[(rope_lengths.long() - first).clamp(min=0)]  # [batch, seq]
                exponent = torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim
                inv = 1.0 / (bases[..., None] ** exponent)  # [batch, seq, d/2]
        else:
            bases = [self.base_for_length(n) for n in rope_lengths]
            if len(set(bases)) == 1:
                inv = self.inv_freq(bases[0], device)[None, None]  # [1, 1, d/2]
            else:
                inv = torch.stack([self.inv_freq(b, device) for b in bases])[:, None]  # [batch, 1, d/2]
        t = positions.to(torch.float32)
        if self.scaling is not None and self.scaling.type == "linear":
            t = t / self.scaling.factor
        freqs = t.unsqueeze(-1) * inv  # [batch, seq, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [batch, heads, seq, head_dim]; cos/sin [batch, 1, seq, head_dim]."""
    return x * cos + rotate_half(x) * sin


def softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
