"""A paged KV cache for the `chat` loop's padded batches, on the engine's paged attention.

The chat loop feeds `[batch, new]` rows with left padding; the engine's `PagedAttention` works on one flattened
sequence of real tokens. This adapter keeps per-row block tables and lengths, drops the padding (it is never
stored, so each row's length is its own), and runs the engine's attention over the flattened valid tokens:
decode steps go through `paged_decode` (Triton on the "triton" backend), prefill through SDPA over the blocks.
"""
from __future__ import annotations

import torch

from .engine_attention import AttentionBatch, EngineKVCache, PagedAttention


class PagedKVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str, block_size: int = 16,
                 use_triton: bool = False) -> None:
        blocks_per_row = -(-capacity // block_size)
        self.cache = EngineKVCache(num_layers, batch * blocks_per_row, block_size, num_kv_heads, head_dim, dtype,
                                   torch.device(device))
        # [batch, blocks_per_row] int32; rows own disjoint, interleaved blocks (so the kernel must follow the table)
        table = torch.arange(batch * blocks_per_row, dtype=torch.int32, device=device).view(blocks_per_row, batch)
        self.block_tables = table.t().contiguous()
        self.seq_lens = [0] * batch
        self.block_size = block_size
        self.capacity = blocks_per_row * block_size
        self.use_triton = use_triton
        self._valid: torch.Tensor | None = None
        self._attention: PagedAttention | None = None
        self._new_lens: list[int] = []

    def begin_forward(self, valid_new: torch.Tensor) -> None:
        """valid_new [batch, new] bool (False = left padding, never stored)."""
        device = self.block_tables.device
        self._valid = valid_new.to(device)
        self._new_lens = self._valid.sum(dim=1).tolist()
        ends = [length + new for length, new in zip(self.seq_lens, self._new_lens)]
        if max(ends) > self.capacity:
            raise ValueError(f"paged KV cache capacity {self.capacity} exceeded")
        slots, starts, total = [], [], 0
        for row, (start, end) in enumerate(zip(self.seq_lens, ends)):
            blocks = self.block_tables[row].tolist()
            slots += [blocks[p // self.block_size] * self.block_size + p % self.block_size for p in range(start, end)]
            starts.append(total)
            total += end - start
        batch = AttentionBatch(torch.tensor(slots, dtype=torch.long, device=device), starts, self._new_lens, ends,
                               self.block_tables, use_triton=self.use_triton)
        self._attention = PagedAttention(self.cache, batch)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [batch, heads, new, d]; k, v [batch, kv_heads, new, d] -> [batch, heads, new, d] (zeros on padding)."""
        valid = self._valid

        def flatten(x: torch.Tensor) -> torch.Tensor:  # [batch, h, new, d] -> [1, h, valid tokens, d]
            return x.transpose(1, 2)[valid].transpose(0, 1).unsqueeze(0)

        attended = self._attention.attend(layer, flatten(q), flatten(k), flatten(v))  # [1, heads, T, d]
        out = torch.zeros_like(q.transpose(1, 2))  # [batch, new, heads, d]
        out[valid] = attended[0].transpose(0, 1)
        return out.transpose(1, 2)

    def rope_lengths(self) -> list[int]:
        """Each row's own KV length once this forward is stored (padding is not stored)."""
        return [length + new for length, new in zip(self.seq_lens, self._new_lens)]

    def end_forward(self) -> None:
        self.seq_lens = self.rope_lengths()
        self._valid = self._attention = None
