"""A fused KV cache past the int32 offset range, for the paged kernels' int64-offset tests."""
from __future__ import annotations

from typing import NamedTuple

import torch


class HugeCache(NamedTuple):
    k: torch.Tensor  # [num_blocks, block_size, kv, d] view of the fused cache
    v: torch.Tensor
    table: torch.Tensor  # int32 [2, 4]: blocks past 2**31 elements, then -1
    compact_k: torch.Tensor  # the same blocks copied into a small cache, for the references
    compact_v: torch.Tensor
    compact_table: torch.Tensor


def huge_cache(kv: int, d: int, device: str, block_size: int = 16) -> HugeCache:
    """Sequence 0 uses 3 blocks and sequence 1 two, some beyond element 2**31 (memory is allocated lazily: only
    the blocks in the table are touched)."""
    row = block_size * 2 * kv * d
    num_blocks = 2**31 // row + 64
    cache = torch.empty(num_blocks, block_size, 2 * kv, d, dtype=torch.float16, device=device)
    k, v = cache[:, :, :kv], cache[:, :, kv:]
    assert k.stride(0) * (num_blocks - 1) > 2**31
    gen = torch.Generator().manual_seed(7)
    table = torch.tensor([[num_blocks - 1, num_blocks - 40, 2**31 // row + 1, -1], [3, num_blocks - 7, -1, -1]],
                         dtype=torch.int32, device=device)
    compact_table = torch.tensor([[0, 1, 2, -1], [3, 4, -1, -1]], dtype=torch.int32, device=device)
    used = torch.cat([table[0, :3], table[1, :2]]).long()
    compact = torch.randn(len(used), block_size, 2 * kv, d, generator=gen).to(torch.float16).to(device)
    cache[used] = compact
    return HugeCache(k, v, table, compact[:, :, :kv], compact[:, :, kv:], compact_table)
