"""Paged-KV decode attention kernel vs its PyTorch reference (Triton interpreter on CPU, real kernel on CUDA)."""
from __future__ import annotations

import pytest
import torch

from internvl_engine.kernels.paged_decode import choose_num_splits, paged_decode, paged_decode_ref

from huge_cache import huge_cache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter's bf16 x bf16 tl.dot is wrong, so bf16 runs only on the real compiler.
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if torch.cuda.is_available() else [])
SMALL_ATOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 2e-5}


def make_case(seq_lens, block_size, num_kv_heads, group, head_dim, dtype, seed=0, spare_blocks=3, extra_cols=2):
    """Random q and caches; each sequence's blocks are a random permutation of the physical blocks, and the
    table tail past each sequence's end holds -1 or huge garbage ids (reading one would fault or mismatch)."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + spare_blocks
    max_blocks = max(need) + extra_cols
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.randint(2**20, 2**30, (len(seq_lens), max_blocks), generator=gen, dtype=torch.int32)
    table[:, ::2] = -1
    used = 0
    for s, nb in enumerate(need):
        table[s, :nb] = perm[used: used + nb].to(torch.int32)
        used += nb
    num_q_heads = num_kv_heads * group
    q = torch.randn(len(seq_lens), num_q_heads, head_dim, generator=gen)
    k = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return [t.to(dtype).to(DEVICE) for t in (q, k, v)] + [table.to(DEVICE), lens.to(DEVICE)]


def check(q, k, v, table, lens, ref_inputs=None, **kwargs):
    """Error rule: |kernel - ref32| <= 2 |torch_lowp - ref32| + small_atol. `ref_inputs` (k, v, table) replaces
    the kernel's cache for the references (an equivalent compact cache)."""
    out = paged_decode(q, k, v, table, lens, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    scale = kwargs.get("scale")
    if ref_inputs is not None:
        k, v, table = ref_inputs
    ref_lowp = paged_decode_ref(q, k, v, table, lens, scale=scale)
    ref32 = paged_decode_ref(q.float(), k.float(), v.float(), table, lens, scale=scale)
    err_kernel = (out.float() - ref32).abs().max().item()
    err_torch = (ref_lowp.float() - ref32).abs().max().item()
    assert err_kernel <= 2 * err_torch + SMALL_ATOL[q.dtype], (err_kernel, err_torch)
    return out


# (seq_lens, block_size, num_kv_heads, group, head_dim, num_splits)
CASES = [
    pytest.param([1], 16, 2, 6, 128, None, id="b1-len1-gqa6-d128-auto"),
    pytest.param([37, 1, 64, 100], 16, 2, 6, 64, 2, id="ragged-gqa6-d64-split2"),
    pytest.param([33, 96, 7], 32, 2, 5, 32, 1, id="bs32-gqa5-d32-split1"),
    pytest.param([70], 32, 1, 5, 16, 9, id="b1-gqa5-d16-split9>blocks"),
    pytest.param([5, 48, 17], 16, 3, 1, 32, 8, id="mha-d32-split8-empty"),
    pytest.param([16, 32], 16, 2, 6, 16, 7, id="exact-multiples-split7"),
    pytest.param([45, 3], 32, 2, 1, 128, None, id="mha-d128-bs32-auto"),
    pytest.param([20, 9], 16, 1, 3, 24, 2, id="gqa3-d24-padded"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seq_lens,block_size,num_kv_heads,group,head_dim,num_splits", CASES)
def test_matches_reference(seq_lens, block_size, num_kv_heads, group, head_dim, num_splits, dtype):
    case = make_case(seq_lens, block_size, num_kv_heads, group, head_dim, dtype)
    check(*case, num_splits=num_splits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_auto_splits_long_context(dtype):
    """Batch 1 with a context long enough for the automatic choice to split (and a ragged last split)."""
    seq_lens, block_size = [1000], 16
    assert choose_num_splits(1, 1, -(-1000 // block_size) + 2, block_size)[0] > 1
    check(*make_case(seq_lens, block_size, 1, 2, 16, dtype))


def test_splits_agree_and_custom_scale():
    """num_splits 1, 2, 5 and auto give the same answer to fp32 rounding, with a non-default scale."""
    case = make_case([150, 31], 16, 2, 6, 32, torch.float32, seed=3)
    outs = [check(*case, num_splits=ns, scale=0.3) for ns in (1, 2, 5, None)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=2e-6, rtol=1e-5)


def test_strided_q_and_fused_kv_cache():
    """q sliced out of a wider qkv row and K/V as two halves of one [blocks, bs, 2*kv, d] cache."""
    q, k, v, table, lens = make_case([40, 13], 16, 2, 6, 32, torch.float16, seed=5)
    qkv = torch.zeros(q.shape[0], q.shape[1] + 4, 48, dtype=q.dtype, device=DEVICE)
    qkv[:, : q.shape[1], :32] = q
    kv = torch.cat([k, v], dim=2)
    check(qkv[:, : q.shape[1], :32], kv[:, :, :2], kv[:, :, 2:], table, lens, num_splits=2)


def test_choose_num_splits():
    # InternLM2-20B, batch 1, 16K context, block 16: fills 132 SMs twice, splits of whole 64-token tiles.
    ns, bps = choose_num_splits(1, 8, 16384 // 16, 16, 132)
    assert 8 * ns >= 2 * 132 and bps * 16 >= 256 and bps % 4 == 0 and ns * bps >= 1024 > (ns - 1) * bps
    assert choose_num_splits(64, 8, 1024, 16, 132) == (1, 1024)  # the batch fills the GPU alone
    assert choose_num_splits(1, 8, 8, 16, 132) == (1, 8)  # too short to split


def test_int64_offsets():
    """A fused KV cache with > 2**31 elements and blocks beyond the int32 offset range; the references run on a
    compact copy of those blocks."""
    kv, d, group = 2, 16, 6
    cache = huge_cache(kv, d, DEVICE)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, kv * group, d, generator=gen).to(torch.float16).to(DEVICE)
    lens = torch.tensor([40, 17], dtype=torch.int32, device=DEVICE)
    k, v, table = cache.k, cache.v, cache.table
    ref_inputs = (cache.compact_k, cache.compact_v, cache.compact_table)
    for num_splits in (1, 2):
        check(q, k, v, table, lens, ref_inputs=ref_inputs, num_splits=num_splits)


def _bad(**changes):
    q, k, v, table, lens = make_case([20, 5], 16, 2, 2, 16, torch.float16)
    args = dict(q=q, k_cache=k, v_cache=v, block_tables=table, seq_lens=lens)
    args.update({name: fn(args) for name, fn in changes.items()})
    return args


@pytest.mark.parametrize("changes,match", [
    (dict(q=lambda a: a["q"][:, :3]), "multiple of num_kv_heads"),
    (dict(q=lambda a: a["q"][..., :8]), "head_dim mismatch"),
    (dict(q=lambda a: a["q"][0]), "must be"),
    (dict(v_cache=lambda a: a["v_cache"][:, :8]), "v_cache shape"),
    (dict(k_cache=lambda a: a["k_cache"].float()), "dtype mismatch"),
    (dict(block_tables=lambda a: a["block_tables"].long()), "int32"),
    (dict(seq_lens=lambda a: a["seq_lens"].long()), "int32"),
    (dict(block_tables=lambda a: a["block_tables"][:1]), "block_tables must be"),
    (dict(seq_lens=lambda a: a["seq_lens"][:1]), "seq_lens must be"),
    (dict(seq_lens=lambda a: a["seq_lens"] * 0 + a["block_tables"].shape[1] * 16 + 1), "seq_lens must lie"),
    (dict(seq_lens=lambda a: a["seq_lens"] * 0), "seq_lens must lie"),
], ids=["heads", "head_dim", "q-rank", "v-shape", "dtype", "table-int64", "lens-int64", "table-rows",
        "lens-len", "too-long", "zero-len"])
def test_validation_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        paged_decode(**_bad(**changes))


def test_num_splits_must_be_positive():
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode(**_bad(), num_splits=0)
