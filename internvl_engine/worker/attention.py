"""Attention for the LLM forward: paged over the KV cache (every engine step), or masked over a padded batch.

The decoder calls `attend(layer, q, k, v)` on whatever object it is given, so the model never owns a cache.

`PagedAttention`: one step's tokens from every scheduled request are concatenated into one sequence `[1, T]`.
Each layer writes its new K/V into the paged cache through `slot_mapping`, then attends per request: the rows
that decode one token go through `paged_decode` in one call (the Triton kernel on the "triton" backend, its
PyTorch reference otherwise); prefill chunks attend with PyTorch SDPA over their cached context.

`MaskedAttention`: the official full-sequence `forward` (teacher forcing, every position's logits) over a
padded `[batch, seq]` batch; nothing is cached.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class KVCache:
    """K/V for all layers: [num_blocks, block_size, num_kv_heads, head_dim] each (the kernel's layout)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size
        self.num_blocks = num_blocks

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def pad_block_tables(tables: list[list[int]], rows: int, width: int, fill: int = 0) -> torch.Tensor:
    """Ragged per-request block lists -> int32 [rows, width] (host), padded with `fill` (never read past a
    request's length, except the static decode's padding rows, which point at the scratch block)."""
    table = torch.full((rows, width), fill, dtype=torch.int32)
    for row, blocks in enumerate(tables):
        table[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    return table


@dataclass
class AttentionBatch:
    """Where this step's tokens go and what each request attends to (built by the model runner)."""

    slot_mapping: torch.Tensor  # [T] int64: flat slot (block * block_size + offset) of every new token
    query_starts: list[int]  # per request: index of its first new token in the flattened batch
    query_lens: list[int]  # per request: new tokens this step
    context_lens: list[int]  # per request: cached tokens after this step (includes the new ones)
    block_tables: torch.Tensor  # [requests, max_blocks] int32
    use_triton: bool = False


class PagedAttention:
    """The `cache` argument of the LLM forward for one engine step."""

    def __init__(self, cache: KVCache, batch: AttentionBatch) -> None:
        self.cache = cache
        self.batch = batch
        device = batch.slot_mapping.device
        self.decode_rows = [r for r, n in enumerate(batch.query_lens) if n == 1]
        self.prefill_rows = [r for r, n in enumerate(batch.query_lens) if n > 1]
        if self.decode_rows:
            rows = torch.tensor(self.decode_rows, device=device)
            self.decode_tokens = torch.tensor([batch.query_starts[r] for r in self.decode_rows], device=device)
            self.decode_tables = batch.block_tables.index_select(0, rows)
            self.decode_lens = torch.tensor([batch.context_lens[r] for r in self.decode_rows], dtype=torch.int32,
                                            device=device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [1, heads, T, d]; k, v [1, kv_heads, T, d] -> [1, heads, T, d]."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys.view(-1, *keys.shape[2:])[self.batch.slot_mapping] = k[0].transpose(0, 1)
        values.view(-1, *values.shape[2:])[self.batch.slot_mapping] = v[0].transpose(0, 1)
        out = torch.empty_like(q)
        if self.decode_rows:
            from ..kernels.paged_decode import paged_decode, paged_decode_ref

            queries = q[0].index_select(1, self.decode_tokens).transpose(0, 1)  # [n, heads, d]
            if self.batch.use_triton:
                result = paged_decode(queries, keys, values, self.decode_tables, self.decode_lens, validate=False)
            else:
                result = paged_decode_ref(queries, keys, values, self.decode_tables, self.decode_lens)
            out[0][:, self.decode_tokens] = result.transpose(0, 1)
        for row in self.prefill_rows:
            out[0][:, self._span(row)] = self._prefill(row, q, keys, values)
        return out

    def _span(self, row: int) -> slice:
        start = self.batch.query_starts[row]
        return slice(start, start + self.batch.query_lens[row])

    def _prefill(self, row: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Causal attention of a prefill chunk over everything cached for its request -> [heads, n, d]."""
        total, count = self.batch.context_lens[row], self.batch.query_lens[row]
        block_size = self.cache.block_size
        blocks = self.batch.block_tables[row, : -(-total // block_size)].long()
        context_k = keys[blocks].flatten(0, 1)[:total].transpose(0, 1)  # [kv_heads, total, d]
        context_v = values[blocks].flatten(0, 1)[:total].transpose(0, 1)
        query = q[0][:, self._span(row)]  # [heads, count, d]
        groups = query.shape[0] // context_k.shape[0]
        context_k = context_k.repeat_interleave(groups, dim=0)
        context_v = context_v.repeat_interleave(groups, dim=0)
        query_pos = torch.arange(total - count, total, device=q.device)
        mask = torch.arange(total, device=q.device)[None, :] <= query_pos[:, None]  # [count, total]
        # 4-D inputs: SDPA's fused CPU/GPU kernels take only those; 3-D ones fall back to the math path.
        return F.scaled_dot_product_attention(query[None], context_k[None], context_v[None], attn_mask=mask)[0]


class MaskedAttention:
    """Causal attention over a padded batch with no cache: the `cache` argument of the official `forward`."""

    def __init__(self, attention_mask: torch.Tensor) -> None:
        """attention_mask [batch, seq] (0 = padding, never attended to)."""
        valid = attention_mask.bool()
        seq = valid.shape[1]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=valid.device).tril()  # [seq, seq]
        mask = causal[None] & valid[:, None, :]  # [batch, seq, seq]
        # A padding query sees no key: let it attend causally so its softmax stays finite (its output is unused).
        mask = mask | (~mask.any(-1, keepdim=True) & causal[None])
        self.mask = mask.unsqueeze(1)  # [batch, 1, seq, seq]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [batch, heads, seq, d]; k, v [batch, kv_heads, seq, d] -> [batch, heads, seq, d]."""
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
