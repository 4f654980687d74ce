"""The LLM's attention objects against a dense reference: the padded-batch `MaskedAttention` (official `forward`)
and the engine's `PagedAttention` (decode rows and prefill chunks over the paged cache), on awkward shapes."""
from __future__ import annotations

import pytest
import torch

from internvl_engine.worker.attention import AttentionBatch, KVCache, MaskedAttention, PagedAttention


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """q [heads, n, d], k/v [kv_heads, m, d], allowed [n, m] -> [heads, n, d] in float64."""
    groups = q.shape[0] // k.shape[0]
    k, v = k.double().repeat_interleave(groups, 0), v.double().repeat_interleave(groups, 0)
    scores = q.double() @ k.transpose(1, 2) / q.shape[-1] ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("heads, kv_heads", [(6, 1), (8, 2), (4, 4)])
def test_masked_attention_in_query_blocks_equals_the_dense_computation(heads, kv_heads):
    gen = torch.Generator().manual_seed(0)
    batch, seq, dim = 3, 37, 16
    q = torch.randn(batch, heads, seq, dim, generator=gen)
    k, v = (torch.randn(batch, kv_heads, seq, dim, generator=gen) for _ in range(2))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    mask[2, :36] = 0  # one real token
    whole = MaskedAttention(mask).attend(0, q, k, v)
    blocked = MaskedAttention(mask, max_score_elements=batch * heads * seq * 3).attend(0, q, k, v)  # 3-row blocks
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-6)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for row in range(batch):
        allowed = causal & mask[row].bool()[None, :]
        real = mask[row].bool()
        expected = dense(q[row], k[row], v[row], allowed | (~allowed.any(-1, keepdim=True) & causal))
        torch.testing.assert_close(blocked[row][:, real].double(), expected[:, real], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("heads, kv_heads", [(6, 2), (4, 4), (8, 1)])
def test_paged_attention_mixes_decodes_and_prefill_chunks_over_cached_prefixes(use_triton, heads, kv_heads):
    gen = torch.Generator().manual_seed(1)
    dim, block_size, num_blocks = 16, 4, 40
    # (cached prefix, new tokens): a chunk over a prefix ending mid-block, a decode, a first chunk, a 1-token prefix
    requests = [(5, 7), (9, 1), (0, 6), (1, 13)]
    cache = KVCache(1, num_blocks, block_size, kv_heads, dim, torch.float32, torch.device("cpu"))
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables, full_k, full_v, slots, starts = [], [], [], [], []
    total_new = 0
    for prefix, new in requests:
        length = prefix + new
        blocks = [free.pop() for _ in range(-(-length // block_size))]
        tables.append(blocks)
        k, v = (torch.randn(length, kv_heads, dim, generator=gen) for _ in range(2))
        full_k.append(k)
        full_v.append(v)
        for position in range(length):
            slot = blocks[position // block_size] * block_size + position % block_size
            if position < prefix:  # cached by earlier steps
                cache.keys[0].view(-1, kv_heads, dim)[slot] = k[position]
                cache.values[0].view(-1, kv_heads, dim)[slot] = v[position]
            else:
                slots.append(slot)
        starts.append(total_new)
        total_new += new
    q = torch.randn(1, heads, total_new, dim, generator=gen)
    new_k = torch.cat([k[p:] for k, (p, _) in zip(full_k, requests)]).permute(1, 0, 2)[None]  # [1, kv, T, d]
    new_v = torch.cat([v[p:] for v, (p, _) in zip(full_v, requests)]).permute(1, 0, 2)[None]
    width = max(len(t) for t in tables) + 2
    block_tables = torch.full((len(requests), width), -1, dtype=torch.int32)
    for row, blocks in enumerate(tables):
        block_tables[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    batch = AttentionBatch(torch.tensor(slots), starts, [n for _, n in requests], [p + n for p, n in requests],
                           block_tables, use_triton=use_triton)
    out = PagedAttention(cache, batch).attend(0, q, new_k, new_v)
    for (prefix, new), start, k, v in zip(requests, starts, full_k, full_v):
        positions = torch.arange(prefix, prefix + new)
        allowed = torch.arange(prefix + new)[None, :] <= positions[:, None]
        expected = dense(q[0, :, start: start + new], k.transpose(0, 1), v.transpose(0, 1), allowed)
        torch.testing.assert_close(out[0, :, start: start + new].double(), expected, rtol=1e-4, atol=1e-5)
