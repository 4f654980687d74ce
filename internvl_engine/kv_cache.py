"""A contiguous per-batch KV cache for the simple generation loop (`chat` / `batch_chat`).

The decoder never owns its cache: each forward receives one, and calls `attend(layer, q, k, v)`, which
stores the new keys/values and returns the attention output. A paged cache for continuous batching plugs
in through the same method.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class DenseKVCache:
    """K/V [layers] x [batch, kv_heads, capacity, head_dim]; rows share one time axis (left padding)."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (batch, num_kv_heads, capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.capacity = capacity
        self.length = 0
        self._num_new = 0
        self._mask: torch.Tensor | None = None

    def begin_forward(self, valid_new: torch.Tensor) -> None:
        """valid_new [batch, new] bool: False marks left padding. Builds this step's attention mask."""
        num_new = valid_new.shape[1]
        end = self.length + num_new
        if end > self.capacity:
            raise ValueError(f"KV cache capacity {self.capacity} exceeded ({end} tokens)")
        self.key_valid[:, self.length:end] = valid_new
        query_pos = torch.arange(self.length, end, device=valid_new.device)
        key_pos = torch.arange(end, device=valid_new.device)
        causal = key_pos[None, :] <= query_pos[:, None]  # [new, end]
        mask = causal[None] & self.key_valid[:, None, :end]  # [batch, new, end]
        # A padding query row sees no key: let it attend causally so the softmax stays finite (its output
        # is never used).
        empty = ~mask.any(-1, keepdim=True)
        mask = mask | (empty & causal[None])
        self._mask = mask.unsqueeze(1)  # [batch, 1, new, end]
        self._num_new = num_new

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [batch, heads, new, d]; k, v [batch, kv_heads, new, d] -> [batch, heads, new, d]."""
        end = self.length + self._num_new
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        keys = self.keys[layer][:, :, :end]
        values = self.values[layer][:, :, :end]
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            keys = keys.repeat_interleave(groups, dim=1)
            values = values.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self._mask)

    def rope_lengths(self) -> list[int]:
        """Each row's KV length once this forward is stored (all rows share the padded time axis, as in the
        official batch, so the dynamic-NTK base is the same for every row)."""
        return [self.length + self._num_new] * self.key_valid.shape[0]

    def end_forward(self) -> None:
        self.length += self._num_new
        self._num_new = 0
        self._mask = None

    def reorder(self, keep: torch.Tensor) -> None:
        """Keep only rows `keep` (indices), e.g. when finished sequences leave a batch."""
        self.keys = [k.index_select(0, keep) for k in self.keys]
        self.values = [v.index_select(0, keep) for v in self.values]
        self.key_valid = self.key_valid.index_select(0, keep)
