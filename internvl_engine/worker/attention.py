"""Attention for the LLM forward: paged over the KV cache (every engine step), or masked over a padded batch.

The decoder calls `attend(layer, q, k, v)` on whatever object it is given, so the model never owns a cache.

`PagedAttention`: one step's tokens from every scheduled request are concatenated into one sequence `[1, T]`.
Each layer writes its new K/V into the paged cache through `slot_mapping`, then attends per request: the rows
that decode one token go through `paged_decode` in one call, and every prefill chunk (causal over its cached
prefix and itself, GQA without repeating K/V) through `paged_prefill` in one call: the Triton kernels on the
"triton" backend, their memory-bounded PyTorch references otherwise (no [heads, chunk, context] score tensor
is ever held whole, so a 10K-token image prompt prefills on the CPU too).

`MaskedAttention`: the official full-sequence `forward` (teacher forcing, every position's logits) over a
padded `[batch, seq]` batch; nothing is cached.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .staging import to_device


class KVCache:
    """K/V for all layers: [num_blocks, block_size, num_kv_heads, head_dim] each (the kernel's layout).

    `sliding_window`: the model's (Phi-3): a query at position p attends keys p - w + 1 ... p; None: all."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, sliding_window: int | None = None) -> None:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.sliding_window = sliding_window

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


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
        decodes, prefills = self.decode_rows, self.prefill_rows
        # One host->device copy for every per-request list (no host sync; see staging.to_device).
        (decode_rows, self.decode_tokens, decode_lens, prefill_rows, prefill_starts, prefill_lens,
         prefill_context) = to_device(device, [
            decodes, [batch.query_starts[r] for r in decodes], [batch.context_lens[r] for r in decodes],
            prefills, *([values[r] for r in prefills]
                        for values in (batch.query_starts, batch.query_lens, batch.context_lens))])
        if decodes:
            every_row = len(decodes) == len(batch.query_lens)  # a decode-only step: the table as it is
            self.decode_tables = batch.block_tables if every_row else batch.block_tables.index_select(0, decode_rows)
            self.decode_lens = decode_lens.to(torch.int32)
        if prefills:
            self.prefill_tables = batch.block_tables.index_select(0, prefill_rows)
            self.prefill_starts, self.prefill_lens, self.prefill_context = (
                values.to(torch.int32) for values in (prefill_starts, prefill_lens, prefill_context))
            self.max_prefill_len = max(batch.query_lens[r] for r in prefills)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [1, heads, T, d]; k, v [1, kv_heads, T, d] -> [1, heads, T, d]."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys.view(-1, *keys.shape[2:])[self.batch.slot_mapping] = k[0].transpose(0, 1)
        values.view(-1, *values.shape[2:])[self.batch.slot_mapping] = v[0].transpose(0, 1)
        out = torch.empty_like(q)
        if self.decode_rows:
            from ..kernels.paged_decode import paged_decode, paged_decode_ref

            queries = q[0].index_select(1, self.decode_tokens).transpose(0, 1)  # [n, heads, d]
            window = self.cache.sliding_window
            if self.batch.use_triton:
                result = paged_decode(queries, keys, values, self.decode_tables, self.decode_lens, validate=False,
                                      sliding_window=window)
            else:
                result = paged_decode_ref(queries, keys, values, self.decode_tables, self.decode_lens,
                                          sliding_window=window)
            out[0][:, self.decode_tokens] = result.transpose(0, 1)
        if self.prefill_rows:
            from ..kernels.paged_prefill import paged_prefill, paged_prefill_ref

            queries, into = q[0].transpose(0, 1), out[0].transpose(0, 1)  # [T, heads, d] views
            args = (queries, keys, values, self.prefill_tables, self.prefill_starts, self.prefill_lens,
                    self.prefill_context)
            if self.batch.use_triton:
                paged_prefill(*args, self.max_prefill_len, out=into, validate=False,
                              sliding_window=self.cache.sliding_window)
            else:
                paged_prefill_ref(*args, out=into, sliding_window=self.cache.sliding_window)
        return out


class MaskedAttention:
    """Causal attention over a padded batch with no cache: the `cache` argument of the official `forward`.

    Memory-bounded: queries go in blocks whose scores stay under `max_score_elements`, GQA by grouping the query
    heads of each KV head (K/V are never repeated), and each block's mask is built from the padding mask on the
    fly (no [seq, seq] mask is kept).
    """

    def __init__(self, attention_mask: torch.Tensor, max_score_elements: int = 1 << 24,
                 sliding_window: int | None = None) -> None:
        """attention_mask [batch, seq] (0 = padding, never attended to); sliding_window: a query at sequence index
        i sees keys i - w + 1 ... i (as transformers' eager Phi-3 mask); None: all of them."""
        self.valid = attention_mask.bool()  # [batch, seq]
        self.max_score_elements = max_score_elements
        self.sliding_window = sliding_window

    def _mask(self, start: int, stop: int) -> torch.Tensor:
        """[batch, stop - start, seq] bool: query rows [start, stop) may attend to each key."""
        seq = self.valid.shape[1]
        keys = torch.arange(seq, device=self.valid.device)
        queries = torch.arange(start, stop, device=self.valid.device)[:, None]
        causal = keys[None, :] <= queries  # [rows, seq]
        if self.sliding_window is not None:
            causal &= keys[None, :] > queries - self.sliding_window
        mask = causal[None] & self.valid[:, None, :]
        # A padding query sees no key: let it attend causally so its softmax stays finite (its output is unused).
        return mask | (~mask.any(-1, keepdim=True) & causal[None])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [batch, heads, seq, d]; k, v [batch, kv_heads, seq, d] -> [batch, heads, seq, d]."""
        batch, heads, seq, dim = q.shape
        kv_heads = k.shape[1]
        groups = heads // kv_heads
        rows = max(1, self.max_score_elements // max(1, batch * heads * seq))
        out = torch.empty_like(q)
        for start in range(0, seq, rows):
            stop = min(seq, start + rows)
            count = stop - start
            grouped = q[:, :, start:stop].reshape(batch, kv_heads, groups * count, dim)  # heads of one KV head
            mask = self._mask(start, stop)[:, None, None].expand(batch, 1, groups, count, seq)
            result = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask.reshape(batch, 1, groups * count,
                                                                                           seq))
            out[:, :, start:stop] = result.reshape(batch, heads, count, dim)
        return out
