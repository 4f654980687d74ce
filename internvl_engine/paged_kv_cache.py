"""A paged KV cache for the chat loop: K/V in fixed-size blocks addressed through per-sequence block tables.

Layout per layer: `[num_blocks, block_size, num_kv_heads, head_dim]`, the layout the paged-decode kernel
reads. Left padding is never stored: row b keeps only its real tokens, so its length is its own.
Decode steps (one new token per row) go through `paged_decode` (Triton on the "triton" backend, its PyTorch
reference otherwise); prefill attends with PyTorch SDPA over the row's cached tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class PagedKVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str, block_size: int = 16,
                 use_triton: bool = False) -> None:
        blocks_per_row = -(-capacity // block_size)
        num_blocks = batch * blocks_per_row
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # [batch, blocks_per_row] int32; rows own disjoint blocks (interleaved, so a row's blocks are not
        # contiguous in memory and the kernel really follows the table).
        table = torch.arange(num_blocks, dtype=torch.int32, device=device).view(blocks_per_row, batch).t()
        self.block_tables = table.contiguous()
        self.seq_lens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.block_size = block_size
        self.capacity = blocks_per_row * block_size
        self.use_triton = use_triton
        self._valid: torch.Tensor | None = None
        self._slots: torch.Tensor | None = None
        self._new_lens: torch.Tensor | None = None

    def begin_forward(self, valid_new: torch.Tensor) -> None:
        """valid_new [batch, new] bool (False = left padding, never stored)."""
        valid_new = valid_new.to(self.seq_lens.device)
        new_lens = valid_new.sum(dim=1, dtype=torch.int32)  # [batch]
        end = self.seq_lens + new_lens
        if int(end.max()) > self.capacity:
            raise ValueError(f"paged KV cache capacity {self.capacity} exceeded")
        # Position of each valid new token inside its row: seq_len + (rank among the row's valid tokens).
        rank = valid_new.long().cumsum(dim=1) - 1  # [batch, new]
        positions = self.seq_lens.long()[:, None] + rank
        block = self.block_tables.long().gather(1, (positions.clamp(min=0) // self.block_size))
        slots = block * self.block_size + positions.clamp(min=0) % self.block_size  # [batch, new]
        self._valid, self._slots, self._new_lens = valid_new, slots[valid_new], new_lens

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [batch, heads, new, d]; k, v [batch, kv_heads, new, d] -> [batch, heads, new, d]."""
        keys, values = self.keys[layer], self.values[layer]
        flat_k = keys.view(-1, *keys.shape[2:])  # [num_blocks * block_size, kv_heads, d]
        flat_v = values.view(-1, *values.shape[2:])
        flat_k[self._slots] = k.transpose(1, 2)[self._valid]
        flat_v[self._slots] = v.transpose(1, 2)[self._valid]
        lens = self.seq_lens + self._new_lens
        if q.shape[2] == 1 and bool(self._valid.all()):
            return self._decode(layer, q, lens)
        return self._prefill(layer, q, lens)

    def _decode(self, layer: int, q: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        from .kernels.paged_decode import paged_decode, paged_decode_ref

        if self.use_triton:
            # The cache built the tables and lengths itself: skip the validation that reads them (a host sync
            # per layer per token on a GPU).
            out = paged_decode(q[:, :, 0], self.keys[layer], self.values[layer], self.block_tables, lens,
                               validate=False)
        else:
            out = paged_decode_ref(q[:, :, 0], self.keys[layer], self.values[layer], self.block_tables, lens)
        return out.unsqueeze(2)  # [batch, heads, 1, d]

    def _prefill(self, layer: int, q: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        batch, heads, new, d = q.shape
        out = torch.zeros_like(q)
        for row in range(batch):
            total, count = int(lens[row]), int(self._new_lens[row])
            if count == 0:
                continue
            blocks = self.block_tables[row, : -(-total // self.block_size)].long()
            keys = self.keys[layer][blocks].flatten(0, 1)[:total].transpose(0, 1)  # [kv_heads, total, d]
            values = self.values[layer][blocks].flatten(0, 1)[:total].transpose(0, 1)
            groups = heads // keys.shape[0]
            keys = keys.repeat_interleave(groups, dim=0)
            values = values.repeat_interleave(groups, dim=0)
            query = q[row][:, self._valid[row]]  # [heads, count, d]
            query_pos = torch.arange(total - count, total, device=q.device)
            mask = torch.arange(total, device=q.device)[None, :] <= query_pos[:, None]
            attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask)
            out[row][:, self._valid[row]] = attended
        return out

    def rope_lengths(self) -> list[int]:
        """Each row's own KV length once this forward is stored (padding is not stored)."""
        return (self.seq_lens + self._new_lens).tolist()

    def end_forward(self) -> None:
        self.seq_lens += self._new_lens
        self._valid = self._slots = self._new_lens = None
