"""Paged-KV decode attention kernel vs a dense float64 reference and its PyTorch reference (Triton interpreter on
CPU, real kernel on CUDA), with and without a sliding window."""
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


def dense_reference(q, k_cache, v_cache, block_tables, seq_lens, scale=None, sliding_window=None):
    """Obviously correct, float64: gather each sequence's whole context, repeat KV heads, mask the keys before the
    window (positions < seq_len - sliding_window) by position, softmax."""
    num_seqs, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for s in range(num_seqs):
        length = int(seq_lens[s])
        ids = block_tables[s, : -(-length // block_size)].long()
        k = k_cache[ids].reshape(-1, num_kv_heads, head_dim)[:length].double().repeat_interleave(group, dim=1)
        v = v_cache[ids].reshape(-1, num_kv_heads, head_dim)[:length].double().repeat_interleave(group, dim=1)
        logits = torch.einsum("hd,lhd->hl", q[s].double(), k) * scale  # [H, L]
        if sliding_window is not None:  # the query sits at length - 1: it sees length - w ... length - 1
            before = torch.arange(length, device=q.device) <= length - 1 - sliding_window
            logits = logits.masked_fill(before[None, :], float("-inf"))
        out[s] = torch.einsum("hl,lhd->hd", torch.softmax(logits, dim=-1), v)
    return out


def check(q, k, v, table, lens, ref_inputs=None, sliding_window=None, **kwargs):
    """Error rule: |kernel - ref64| <= 2 |torch_lowp - ref64| + small_atol, where ref64 is the dense float64
    reference and torch_lowp paged_decode_ref in the input dtype. `ref_inputs` (k, v, table) replaces the kernel's
    cache for the references (an equivalent compact cache)."""
    out = paged_decode(q, k, v, table, lens, sliding_window=sliding_window, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    scale = kwargs.get("scale")
    if ref_inputs is not None:
        k, v, table = ref_inputs
    ref_lowp = paged_decode_ref(q, k, v, table, lens, scale=scale, sliding_window=sliding_window)
    ref64 = dense_reference(q, k, v, table, lens, scale, sliding_window)
    err_kernel = (out.double() - ref64).abs().max().item()
    err_torch = (ref_lowp.double() - ref64).abs().max().item()
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
    # Phi-3-mini (Mini-InternVL-4B): MHA with head_dim 96, padded to 128 with masks; and a GQA variant of it.
    pytest.param([40, 17, 3], 16, 4, 1, 96, None, id="phi3-mha-d96-auto"),
    pytest.param([33, 64], 16, 2, 4, 96, 3, id="gqa4-d96-split3"),
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


# Sliding window (Phi-3): (seq_lens, block_size, num_kv_heads, group, head_dim, num_splits, window). The splits
# divide each sequence's window [len - w, len) only, so windows start mid-block and mid-tile, and the short
# sequences leave most splits empty.
WINDOW_CASES = [
    pytest.param([37, 1, 64, 100], 16, 2, 6, 32, 4, 1, id="w1-gqa6-split4"),
    pytest.param([5, 48, 17, 70], 16, 3, 1, 32, 8, 5, id="w5-mha-split8"),
    # w 17 is not a multiple of the page: windows [83, 100) and [47, 64) start mid-block.
    pytest.param([33, 64, 100], 16, 2, 4, 96, 3, 17, id="w17-gqa4-d96-split3"),
    pytest.param([40, 17, 3], 16, 4, 1, 96, None, 17, id="w17-phi3-mha-d96-auto"),
    pytest.param([77, 50, 6], 32, 2, 2, 64, 2, 40, id="w40-gqa2-bs32-midblock"),
    pytest.param([20, 9], 16, 1, 3, 24, 2, 21, id="w21>context-gqa3-d24"),
    # MHA tiles of 32 tokens: the 70-key window of the 300-token sequence fills 3 of 8 splits, from key 230.
    pytest.param([300, 31], 16, 2, 1, 32, 8, 70, id="w70-mha-split8-three-splits"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seq_lens,block_size,num_kv_heads,group,head_dim,num_splits,window", WINDOW_CASES)
def test_sliding_window(seq_lens, block_size, num_kv_heads, group, head_dim, num_splits, window, dtype):
    case = make_case(seq_lens, block_size, num_kv_heads, group, head_dim, dtype, seed=11)
    check(*case, num_splits=num_splits, sliding_window=window)


def poison_before_windows(q, k, v, table, lens, window):
    """Appends a NaN block to both caches and points every table entry of a block wholly before a sequence's
    window at it: a kernel that loads any of those keys (even masked: 0 * NaN) returns NaN."""
    block_size = k.shape[1]
    nan = torch.full_like(k[:1], float("nan"))
    k, v, table = torch.cat([k, nan]), torch.cat([v, nan]), table.clone()
    for s, length in enumerate(lens.tolist()):
        table[s, : max(0, length - window) // block_size] = k.shape[0] - 1
    return q, k, v, table, lens


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sliding_window_auto_splits_skip_blocks(dtype):
    """Phi-3 shape (MHA, head_dim 96), a table long enough for the automatic choice to split; w 300: the query at
    999 sees [700, 1000), which the splits divide (>= 256 tokens each: two of them); every block wholly before
    the window is NaN (never loaded), and the result matches the references on the clean cache."""
    seq_lens, window = [1000, 290], 300
    assert choose_num_splits(2, 2, -(-1000 // 16) + 2, 16)[0] > 2
    clean = make_case(seq_lens, 16, 2, 1, 96, dtype, seed=12)
    q, k, v, table, lens = poison_before_windows(*clean, window)
    check(q, k, v, table, lens, ref_inputs=clean[1:4], sliding_window=window)


def test_sliding_window_many_splits():
    """48 splits of whole 64-token tiles (GQA 2): w 2500 over the 3000-token sequence fills 40 of them (the
    reduce pass merges them in two steps of SPLIT_TILE 32), w 50 one; the 30-token sequence, shorter than
    either window, fills one. Blocks before the windows are NaN."""
    clean = make_case([3000, 30], 16, 1, 2, 16, torch.float32, seed=13)
    for window in (50, 2500):
        check(*poison_before_windows(*clean, window), ref_inputs=clean[1:4], num_splits=48, sliding_window=window)


def valid_splits(span: int, num_splits: int, min_split_tokens: int, tile_n: int) -> int:
    """How many splits hold keys of a sequence attending to `span` keys (the kernels' rule, in Python)."""
    tokens = max(min_split_tokens, -(-(-(-span // num_splits)) // tile_n) * tile_n)
    return -(-span // tokens)


class NaNScratch:
    """Stands in for the split kernel: fills the scratch (acc, m, l) with NaN before each launch and keeps it."""

    def __init__(self, kernel) -> None:
        self.kernel, self.scratch = kernel, None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.scratch = args[6:9]  # acc [seqs, heads, splits, d], m and l [seqs, heads, splits]
            for tensor in self.scratch:
                tensor.fill_(float("nan"))
            return self.kernel[grid](*args, **kwargs)
        return launch


# (seq_lens, group, head_dim, num_splits, window): a grid sized for a long table (the CUDA graph's) over short
# contexts: most splits are empty.
EMPTY_SPLIT_CASES = [
    pytest.param([1, 37, 300, 1000, 2], 6, 32, None, None, id="gqa6-auto"),
    pytest.param([1, 37, 300, 1000, 2], 1, 32, None, None, id="mha-auto"),
    pytest.param([5, 130, 700], 2, 16, 16, None, id="gqa2-split16"),
    pytest.param([5, 130, 700], 1, 96, 16, 90, id="mha-d96-split16-w90"),
]


@pytest.mark.parametrize("seq_lens,group,head_dim,num_splits,window", EMPTY_SPLIT_CASES)
def test_empty_splits_store_nothing_and_are_not_read(monkeypatch, seq_lens, group, head_dim, num_splits, window):
    """The scratch of every split past a sequence's keys keeps its NaN sentinel (nothing stored there), the
    valid splits are written, and the result equals the references (pass 2 never read a NaN)."""
    from internvl_engine.kernels import paged_decode as module

    block_size, num_kv_heads = 16, 2
    case = make_case(seq_lens, block_size, num_kv_heads, group, head_dim, torch.float32, seed=21, extra_cols=250)
    table = case[3]
    splits = num_splits or choose_num_splits(len(seq_lens), num_kv_heads, table.shape[1], block_size)[0]
    assert splits >= 8
    sentinel = NaNScratch(module._paged_decode_split_kernel)
    monkeypatch.setattr(module, "_paged_decode_split_kernel", sentinel)
    check(*case, num_splits=num_splits, sliding_window=window)
    acc, m, l = sentinel.scratch
    assert acc.shape[2] == splits
    head_dim_pad = max(16, 1 << (head_dim - 1).bit_length())
    tile_n = module._launch_config(head_dim_pad, group > 1)[0]
    min_tokens = 0 if num_splits is not None else -(-module._MIN_SPLIT_TOKENS // tile_n) * tile_n
    empty = 0
    for s, length in enumerate(seq_lens):
        span = length if window is None else min(length, window)
        valid = valid_splits(span, splits, min_tokens, tile_n)
        assert 1 <= valid <= splits
        assert not m[s, :, :valid].isnan().any() and not acc[s, :, :valid].isnan().any()
        assert m[s, :, valid:].isnan().all() and l[s, :, valid:].isnan().all() and acc[s, :, valid:].isnan().all()
        empty += splits - valid
    assert empty > len(seq_lens) * splits // 2  # most of the grid had nothing to do


def test_window_longer_than_context_is_no_window():
    """A window >= the table's capacity takes the windowless kernels (bit-identical); one just past the longest
    sequence binds nowhere and gives the same answer."""
    q, k, v, table, lens = make_case([37, 100, 5], 16, 2, 6, 32, torch.float32, seed=14)
    cap = table.shape[1] * 16
    for num_splits in (1, 3):
        plain = paged_decode(q, k, v, table, lens, num_splits=num_splits)
        assert torch.equal(paged_decode(q, k, v, table, lens, num_splits=num_splits, sliding_window=cap), plain)
        wide = paged_decode(q, k, v, table, lens, num_splits=num_splits, sliding_window=101)
        torch.testing.assert_close(wide, plain, atol=1e-6, rtol=1e-6)
    ref = paged_decode_ref(q, k, v, table, lens)
    assert torch.equal(paged_decode_ref(q, k, v, table, lens, sliding_window=100), ref)


@pytest.mark.parametrize("window", [1, 5, 17, None])
def test_reference_matches_dense(window):
    """paged_decode_ref (the engine's CPU path) == the dense float64 reference to fp32 rounding."""
    case = make_case([37, 1, 64, 100], 16, 2, 6, 32, torch.float32, seed=15)
    torch.testing.assert_close(paged_decode_ref(*case, sliding_window=window),
                               dense_reference(*case, sliding_window=window).float(), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("window", [0, -4, 2.5, True, "8"], ids=str)
def test_sliding_window_must_be_positive_int(window):
    args = _bad()
    with pytest.raises(ValueError, match="sliding_window"):
        paged_decode(**args, sliding_window=window)
    with pytest.raises(ValueError, match="sliding_window"):
        paged_decode_ref(**args, sliding_window=window)


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
