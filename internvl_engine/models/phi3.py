"""Phi-3 decoder (Mini-InternVL-Chat-4B-V1.5's LLM): fused `qkv_proj` and `gate_up_proj`, RMSNorm, and the `su`
(LongRoPE) rotary, behind the same interface as `InternLM2ForCausalLM` (`embed`, `forward`, `logits`, `rotary`).

Parameter names equal the official state dict under `language_model.`. `qkv_proj` rows are all query heads,
then all key heads, then all value heads (head_dim rows each; query head h reads KV head h // group); the
first `intermediate` rows of `gate_up_proj` are the gate: MLP = down(up * silu(gate)).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import LLMConfig
from .causal_lm import CausalLM, KVCacheLike
from .layers import RMSNorm, activation, apply_rotary, norm_triton, uses_triton


class SuRotaryEmbedding(nn.Module):
    """Phi-3's `su` rotary: inv_freq[i] = 1 / (factor[i] * theta^(2i/d)) with the long factors for a forward
    whose longest sequence (max position + 1) exceeds original_max_position_embeddings, the short ones
    otherwise; cos and sin both scaled by sqrt(1 + ln(M/O) / ln(O)) (1 when M <= O).

    The official module decides per forward call over the whole batch. Here the caller passes that length per
    token (`rope_lengths`, see `Request.rope_length`: the prompt's padded length for prompt tokens, position + 1
    for outputs), so each token is rotated as in its own `chat` call, and keys keep the rotation they were
    written with.
    """

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        scaling = cfg.rope_scaling
        self.head_dim = cfg.head_dim
        self.theta = cfg.rope_theta
        self.original = cfg.original_max_position_embeddings or cfg.max_position_embeddings
        self.short_factor = scaling.short_factor if scaling is not None else (1.0,) * (cfg.head_dim // 2)
        self.long_factor = scaling.long_factor if scaling is not None else self.short_factor
        ratio = cfg.max_position_embeddings / self.original
        self.scale = 1.0 if ratio <= 1.0 else math.sqrt(1 + math.log(ratio) / math.log(self.original))
        self._inv_freqs: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # built once per device

    # The regime is a tensor op on per-token lengths (no host sync), so a static decode step (a CUDA graph) can
    # take rows in either regime from a rope-length buffer.
    static_rope_lengths = True

    def variant(self, seq_len: int) -> str | None:
        """Which rotation a forward over `seq_len` tokens uses: None for the short factors, "su-long" otherwise
        (keys rotated differently must not share prefix-cache blocks, nor static decode graphs)."""
        return "su-long" if seq_len > self.original else None

    def _inv_freq(self, factors: tuple[float, ...], device: torch.device) -> torch.Tensor:
        # [d/2] float32, in the official order: 1 / (factor * base ** (2i / d)).
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (torch.tensor(factors, dtype=torch.float32, device=device) * self.theta ** exponent)

    def cos_sin(self, positions: torch.Tensor, rope_lengths: list[int] | torch.Tensor | tuple[torch.Tensor, int],
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [batch, seq] -> cos, sin [batch, 1, seq, head_dim] in `dtype` (scaled).

        rope_lengths: per row (list), per token ([batch, seq] tensor), or per token with its maximum as the host
        knows it ((tensor, max) pair): then a batch whose tokens are all short takes the short factors directly."""
        device = positions.device
        if device not in self._inv_freqs:  # outside any graph capture: the first (eager) step builds them
            self._inv_freqs[device] = (self._inv_freq(self.short_factor, device),
                                       self._inv_freq(self.long_factor, device))
        short, long = self._inv_freqs[device]
        if isinstance(rope_lengths, tuple):
            rope_lengths, longest = rope_lengths
            if longest <= self.original:
                rope_lengths = [longest]  # every token short: one row of short factors
        if isinstance(rope_lengths, torch.Tensor):
            use_long = (rope_lengths.to(device) > self.original)[..., None]  # [batch, seq, 1]
        else:
            regimes = {n > self.original for n in rope_lengths}  # decided on the host: no tensor from a list
            if len(regimes) == 1:
                use_long = torch.full((1, 1, 1), regimes.pop(), device=device)
            else:
                use_long = torch.tensor([n > self.original for n in rope_lengths], device=device)[:, None, None]
        inv = torch.where(use_long, long, short)  # [batch, seq or 1, d/2]
        freqs = positions.to(torch.float32).unsqueeze(-1) * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.scale, emb.sin() * self.scale
        return cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)


class Phi3Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                                  bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCacheLike) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                                          self.num_kv_heads * self.head_dim], dim=-1)
        q = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)  # [batch, heads, seq, d]
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        out = cache.attend(self.layer_index, q, k, v)  # [batch, heads, seq, d]
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))


class Phi3MLP(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = activation(cfg.hidden_act)
        self.fusable_activation = cfg.hidden_act in ("silu", "swish")

    def forward(self, x: torch.Tensor, use_triton: bool = False) -> torch.Tensor:
        if use_triton and self.fusable_activation:
            from ..kernels.silu_mul import silu_mul

            return self.down_proj(silu_mul(self.gate_up_proj(x)))  # [..., 2I] -> [..., I] in one kernel
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.act(gate))


class Phi3DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Phi3Attention(cfg, layer_index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Phi3MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCacheLike) -> torch.Tensor:
        if uses_triton(cache):
            # One kernel per norm; the attention residual add is fused into post_attention_layernorm.
            attn = self.self_attn(norm_triton(self.input_layernorm, x), cos, sin, cache)
            normed, x = norm_triton(self.post_attention_layernorm, attn, residual=x)
            return x + self.mlp(normed, use_triton=True)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Phi3Model(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Phi3DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Phi3ForCausalLM(CausalLM):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Phi3Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = SuRotaryEmbedding(cfg)

    @property
    def output(self) -> nn.Linear:
        """The output head (InternLM2's name for it, which the wiring reads for dtype and device)."""
        return self.lm_head

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.model.norm

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)
