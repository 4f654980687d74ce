"""InternLM2 decoder (packed `wqkv` with GQA, rotary with dynamic-NTK scaling, SwiGLU MLP).

Positions and the KV cache are inputs of `forward`, never module state, so the same module serves the
simple `chat` loop and a continuous-batching engine. Parameter names equal the official state dict under
`language_model.`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LLMConfig
from .causal_lm import CausalLM, KVCacheLike
from .layers import RMSNorm, RotaryEmbedding, activation, apply_rotary, norm_triton, uses_triton


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.groups = cfg.num_key_value_groups
        self.head_dim = cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                              bias=cfg.bias)
        self.wo = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=cfg.bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCacheLike) -> torch.Tensor:
        batch, seq, _ = x.shape
        # wqkv rows are grouped per KV head: `groups` query heads, then one key head, then one value head.
        qkv = self.wqkv(x).view(batch, seq, self.num_kv_heads, self.groups + 2, self.head_dim)
        q = qkv[:, :, :, : self.groups].reshape(batch, seq, self.num_heads, self.head_dim)
        k = qkv[:, :, :, -2]  # [batch, seq, kv_heads, d]
        v = qkv[:, :, :, -1]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # heads before seq
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        out = cache.attend(self.layer_index, q, k, v)  # [batch, heads, seq, d]
        return self.wo(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))


class FeedForward(nn.Module):
    """w2(silu(w1 x) * w3 x). On the triton backend, one GEMM over w1 and w3 (when `fuse_gate_up` has placed them
    in one storage) and the fused silu * up kernel; the torch reference keeps the official two GEMMs."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = activation(cfg.hidden_act)
        self.fusable_activation = cfg.hidden_act in ("silu", "swish")

    def fuse_gate_up(self) -> None:
        """Place the float w1 and w3 weights in one [2I, H] storage (w1's rows, then w3's): the parameters keep
        their names, shapes and values (views of it), and the triton path multiplies by both in one GEMM.
        Called once after loading (a transient copy of one layer's w1 + w3); int8 or meta weights are left alone.
        Moving the model later (`.to`) gives the views separate storages again: the triton path then runs the
        two GEMMs and still fuses the activation."""
        w1, w3 = self.w1, self.w3
        if type(w1) is not nn.Linear or type(w3) is not nn.Linear or self.gate_up_weight() is not None:
            return
        gate, up = w1.weight, w3.weight
        if gate.is_meta or up.is_meta or gate.dtype != up.dtype or gate.device != up.device:
            return
        fused = torch.cat([gate.detach(), up.detach()])  # [2I, H]
        w1.weight = nn.Parameter(fused[: gate.shape[0]], requires_grad=gate.requires_grad)
        w3.weight = nn.Parameter(fused[gate.shape[0]:], requires_grad=up.requires_grad)

    def gate_up_weight(self) -> torch.Tensor | None:
        """[2I, H]: w1's and w3's weights as one matrix (a view), when they are consecutive rows of one
        storage; else None."""
        if type(self.w1) is not nn.Linear or type(self.w3) is not nn.Linear:
            return None
        gate, up = self.w1.weight, self.w3.weight
        if (gate.dtype != up.dtype or gate.device != up.device or gate.is_meta or not gate.is_contiguous()
                or not up.is_contiguous() or gate.shape[1:] != up.shape[1:]
                or gate.untyped_storage().data_ptr() != up.untyped_storage().data_ptr()
                or up.storage_offset() != gate.storage_offset() + gate.numel()):
            return None
        return gate.as_strided((gate.shape[0] + up.shape[0], gate.shape[1]), (gate.shape[1], 1))

    def forward(self, x: torch.Tensor, use_triton: bool = False) -> torch.Tensor:
        if use_triton and self.fusable_activation:
            from ..kernels.silu_mul import silu_mul, silu_mul_pair

            weight = self.gate_up_weight()
            if weight is not None:
                return self.w2(silu_mul(F.linear(x, weight)))  # [..., 2I] -> [..., I]
            return self.w2(silu_mul_pair(self.w1(x), self.w3(x)))  # int8 w1 / w3: two GEMMs
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_index: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg, layer_index)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCacheLike) -> torch.Tensor:
        if uses_triton(cache):
            # One kernel per norm; the attention residual add is fused into ffn_norm (x, attn [batch, seq, H]).
            attn = self.attention(norm_triton(self.attention_norm, x), cos, sin, cache)
            normed, x = norm_triton(self.ffn_norm, attn, residual=x)
            return x + self.feed_forward(normed, use_triton=True)
        x = x + self.attention(self.attention_norm(x), cos, sin, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class InternLM2Model(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class InternLM2ForCausalLM(CausalLM):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = InternLM2Model(cfg)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings, cfg.rope_scaling)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.model.norm

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.tok_embeddings(input_ids)
