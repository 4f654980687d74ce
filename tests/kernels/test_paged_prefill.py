"""Paged-KV prefill attention kernel vs a dense float64 reference and its PyTorch reference (Triton interpreter on
CPU, the real kernel on CUDA): chunks over cached prefixes that end mid-block, several chunks with gaps in one
call, GQA 6:1 / 8:1, MQA, MHA, head_dim 96, permuted block tables with garbage tails, tiles smaller and larger
than pages; Phi-3's sliding window (windows shorter than a tile, than a query block, not a multiple of the page,
longer than the context; chunks over prefixes longer than the window)."""
from __future__ import annotations

import pytest
import torch

from internvl_engine.kernels import paged_prefill as mod
from internvl_engine.kernels.paged_prefill import _paged_prefill, paged_prefill, paged_prefill_ref

from huge_cache import huge_cache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter's bf16 x bf16 tl.dot is wrong, so bf16 runs only on the real compiler.
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if torch.cuda.is_available() else [])
SMALL_ATOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 2e-5}
SENTINEL = 7.0  # pre-filled into a caller's `out`: rows outside every chunk must keep it


def make_case(chunks, block_size, num_kv_heads, group, head_dim, dtype, seed=0, gap=3, spare_blocks=3,
              extra_cols=3):
    """chunks: [(cached prefix, new tokens)]. Returns (q, k_cache, v_cache, block_tables, query_starts,
    query_lens, context_lens). q is the engine's layout (a transposed view of [heads, T, head_dim]) with `gap`
    rows before, between and after the chunks; each chunk's blocks are a random permutation of the physical
    blocks, and the table tail past each chunk's context holds -1 or huge garbage ids (reading one would fault
    or mismatch)."""
    gen = torch.Generator().manual_seed(seed)
    contexts = [p + n for p, n in chunks]
    need = [-(-length // block_size) for length in contexts]
    num_blocks = sum(need) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.randint(2**20, 2**30, (len(chunks), max(need) + extra_cols), generator=gen, dtype=torch.int32)
    table[:, ::2] = -1
    used = 0
    for c, nb in enumerate(need):
        table[c, :nb] = perm[used: used + nb].to(torch.int32)
        used += nb
    starts, row = [], 0
    for _, n in chunks:
        row += gap
        starts.append(row)
        row += n
    num_q_heads = num_kv_heads * group
    q = torch.randn(num_q_heads, row + gap, head_dim, generator=gen).transpose(0, 1)  # [T, heads, d], strided
    k = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    ints = [torch.tensor(x, dtype=torch.int32) for x in (starts, [n for _, n in chunks], contexts)]
    return [t.to(dtype).to(DEVICE) for t in (q, k, v)] + [t.to(DEVICE) for t in [table] + ints]


def dense_reference(q, k_cache, v_cache, block_tables, query_starts, query_lens, context_lens, scale=None,
                    sliding_window=None):
    """Obviously correct, float64: gather each chunk's context, repeat KV heads, mask by position (causal, and
    keys <= position - sliding_window with a window), softmax. Rows outside every chunk are 0."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for c in range(len(query_lens)):
        start, n, total = int(query_starts[c]), int(query_lens[c]), int(context_lens[c])
        ids = block_tables[c, : -(-total // block_size)].long()
        k = k_cache[ids].reshape(-1, num_kv_heads, head_dim)[:total].double().repeat_interleave(group, dim=1)
        v = v_cache[ids].reshape(-1, num_kv_heads, head_dim)[:total].double().repeat_interleave(group, dim=1)
        logits = torch.einsum("nhd,lhd->hnl", q[start: start + n].double(), k) * scale  # [H, n, L]
        pos = torch.arange(total - n, total, device=q.device)
        causal = torch.arange(total, device=q.device)[None, :] <= pos[:, None]  # [n, L]
        if sliding_window is not None:
            causal &= torch.arange(total, device=q.device)[None, :] > pos[:, None] - sliding_window
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        out[start: start + n] = torch.einsum("hnl,lhd->nhd", probs, v)
    return out


def chunk_rows(query_starts, query_lens, num_tokens):
    rows = torch.zeros(num_tokens, dtype=torch.bool)
    for start, n in zip(query_starts.tolist(), query_lens.tolist()):
        rows[start: start + n] = True
    return rows


def check(case, config=None, scale=None, out=None, max_query_len=None, ref_case=None, sliding_window=None):
    """Error rule on the chunks' rows: |kernel - ref64| <= 2 |torch_lowp - ref64| + small_atol, where torch_lowp
    is paged_prefill_ref in the input dtype. The other rows: 0 in a fresh `out`, untouched in a given one.
    `ref_case` (k, v, table) replaces the kernel's cache for the references (an equivalent compact cache)."""
    q, k, v, table, starts, lens, ctx = case
    mql = int(lens.max()) if max_query_len is None else max_query_len
    given = out is not None
    result = _paged_prefill(q, k, v, table, starts, lens, ctx, mql, scale, out, True, config, sliding_window)
    assert result.shape == q.shape and result.dtype == q.dtype
    if given:
        assert result is out
    if ref_case is not None:
        k, v, table = ref_case
    ref64 = dense_reference(q, k, v, table, starts, lens, ctx, scale, sliding_window)
    ref_lowp = paged_prefill_ref(q, k, v, table, starts, lens, ctx, scale=scale, sliding_window=sliding_window)
    rows = chunk_rows(starts, lens, q.shape[0]).to(q.device)
    err_kernel = (result.double() - ref64)[rows].abs().max().item()
    err_torch = (ref_lowp.double() - ref64)[rows].abs().max().item()
    assert err_kernel <= 2 * err_torch + SMALL_ATOL[q.dtype], (err_kernel, err_torch)
    others = result[~rows]
    assert torch.equal(others, torch.full_like(others, SENTINEL if given else 0.0))
    return result


# (chunks as [(cached prefix, new tokens)], block_size, num_kv_heads, group, head_dim)
CASES = [
    pytest.param([(37, 1)], 16, 2, 6, 32, id="len1-prefix-midblock-gqa6"),
    pytest.param([(0, 113)], 16, 2, 8, 32, id="len113-noprefix-gqa8"),
    pytest.param([(50, 113)], 32, 1, 4, 16, id="len113-prefix-midblock-mqa-bs32"),
    pytest.param([(0, 5), (19, 60), (64, 1), (7, 40)], 8, 2, 6, 16, id="4chunks-gaps-gqa6-bs8"),
    pytest.param([(21, 30), (0, 17), (40, 2)], 16, 3, 1, 32, id="3chunks-mha"),
    pytest.param([(10, 37)], 16, 2, 1, 96, id="phi3-d96-mha"),
    pytest.param([(3, 20), (30, 9)], 16, 1, 48, 16, id="mqa-48heads"),
    pytest.param([(17, 40)], 16, 2, 6, 128, id="gqa6-d128"),
    pytest.param([(0, 24), (33, 3)], 32, 2, 2, 64, id="gqa2-d64-bs32"),
    pytest.param([(29, 20), (50, 7)], 24, 1, 3, 16, id="gqa3-bs24-not-pow2"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunks,block_size,num_kv_heads,group,head_dim", CASES)
def test_matches_reference(chunks, block_size, num_kv_heads, group, head_dim, dtype):
    check(make_case(chunks, block_size, num_kv_heads, group, head_dim, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunk_1023_over_midblock_prefix(dtype):
    """A 1023-token chunk (16 query blocks of 64 tokens x 2 heads, the last one ragged) over a 100-token prefix
    that ends mid-block."""
    check(make_case([(100, 1023)], 16, 1, 2, 16, dtype, seed=1))


# Small tiles: several query blocks per chunk, key tiles smaller than pages (BLOCK_N 16 on 32-token pages) and
# spanning pages (on 8-token pages), and BLOCK_Q = BLOCK_M // group = 2 (GQA 6 -> 12 of 16 rows used).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunks,block_size,num_kv_heads,group,head_dim,config", [
    pytest.param([(45, 40), (0, 9)], 32, 1, 6, 16, (16, 16, 4, 1), id="gqa6-bs32-tile16x16"),
    pytest.param([(13, 50), (70, 1)], 8, 2, 1, 16, (32, 16, 4, 1), id="mha-bs8-tile32x16"),
    pytest.param([(20, 33)], 16, 1, 8, 96, (64, 32, 4, 1), id="gqa8-d96-tile64x32"),
])
def test_small_tiles(chunks, block_size, num_kv_heads, group, head_dim, config, dtype):
    check(make_case(chunks, block_size, num_kv_heads, group, head_dim, dtype, seed=2), config=config)


def test_every_diagonal_alignment():
    """16 chunks over prefixes 0..15 with 16 x 16 tiles (MHA: 16 tokens per query block): every residue of a
    block's first position modulo BLOCK_N, so the unmasked / diagonal split of the key loop is hit at each offset,
    including a diagonal that starts exactly on a tile boundary and one that ends on it."""
    chunks = [(prefix, 37) for prefix in range(16)]
    check(make_case(chunks, 8, 1, 1, 16, torch.float32, seed=9, gap=1), config=(16, 16, 4, 1))


def test_long_permuted_table_and_out_given():
    """A 64-column table mostly garbage; a caller's strided `out` (the engine's transposed view): only the chunks'
    rows change; a max_query_len above the longest chunk only adds programs that exit at once."""
    case = make_case([(150, 30), (5, 64), (0, 1)], 16, 2, 6, 16, torch.float16, seed=4, gap=5, extra_cols=60,
                     spare_blocks=40)
    q = case[0]
    out = torch.full((q.shape[1], q.shape[0], q.shape[2]), SENTINEL, dtype=q.dtype, device=DEVICE).transpose(0, 1)
    check(case, out=out, max_query_len=300)


def test_custom_scale_and_contiguous_q():
    q, *rest = make_case([(33, 20), (0, 31)], 16, 2, 3, 32, torch.float32, seed=5)
    check([q.contiguous()] + rest, scale=0.37)


def test_strided_fused_kv_cache():
    """K/V as two halves of one [blocks, bs, 2 * kv, d] cache, q sliced out of a wider qkv row."""
    q, k, v, *rest = make_case([(20, 30)], 16, 2, 2, 32, torch.float16, seed=6)
    kv = torch.cat([k, v], dim=2)
    qkv = torch.zeros(q.shape[0], q.shape[1] + 4, 48, dtype=q.dtype, device=DEVICE)
    qkv[:, : q.shape[1], :32] = q
    check([qkv[:, : q.shape[1], :32], kv[:, :, :2], kv[:, :, 2:]] + rest)


def test_int64_offsets():
    """A fused KV cache with > 2**31 elements and blocks beyond the int32 offset range; the references run on a
    compact copy of those blocks."""
    kv, d, group = 1, 16, 2
    cache = huge_cache(kv, d, DEVICE)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(60, kv * group, d, generator=gen).to(torch.float16).to(DEVICE)
    ints = [torch.tensor(x, dtype=torch.int32, device=DEVICE) for x in ([0, 40], [40, 17], [40, 20])]
    check([q, cache.k, cache.v, cache.table] + ints, ref_case=(cache.compact_k, cache.compact_v, cache.compact_table))


def test_no_chunks_and_default_entry_point():
    q, k, v, table, starts, lens, ctx = make_case([(4, 9)], 16, 1, 2, 16, torch.float32)
    empty = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    out = paged_prefill(q, k, v, table[:0], empty, empty, empty, 0)
    assert out.shape == q.shape and not out.any()
    torch.testing.assert_close(paged_prefill(q, k, v, table, starts, lens, ctx, 9, validate=False),
                               paged_prefill_ref(q, k, v, table, starts, lens, ctx), atol=2e-5, rtol=1e-5)


def test_reference_matches_dense_fp32_and_is_memory_bounded(monkeypatch):
    """paged_prefill_ref (the engine's CPU path) == the dense float64 reference to fp32 rounding, and with a tiny
    max_score_elements it gives the same answer while no SDPA call sees more score elements than allowed."""
    case = make_case([(70, 45), (0, 23), (9, 1)], 16, 2, 6, 32, torch.float32, seed=8)
    dense = dense_reference(*case).float()
    full = paged_prefill_ref(*case)
    torch.testing.assert_close(full, dense, atol=2e-6, rtol=1e-5)
    sizes, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(query, key, value, **kwargs):
        sizes.append(query.shape[1] * query.shape[2] * key.shape[2])  # kv_heads * (group * rows) * keys
        return sdpa(query, key, value, **kwargs)

    monkeypatch.setattr(mod.F, "scaled_dot_product_attention", recording_sdpa)
    limit = 12 * 115 * 4  # num_q_heads 12, context <= 115: 4-row blocks
    blocked = paged_prefill_ref(*case, max_score_elements=limit)
    assert max(sizes) <= limit and len(sizes) > 10
    torch.testing.assert_close(blocked, full, atol=1e-6, rtol=1e-6)
    sizes.clear()
    one_row = paged_prefill_ref(*case, max_score_elements=1)  # below one row: one query row per call
    assert max(sizes) <= 12 * 115 and len(sizes) == 45 + 23 + 1
    torch.testing.assert_close(one_row, full, atol=1e-6, rtol=1e-6)


def test_reference_keeps_input_dtype_and_out():
    q, k, v, table, starts, lens, ctx = make_case([(5, 7)], 16, 1, 2, 16, torch.float16)
    out = torch.full(q.shape, SENTINEL, dtype=q.dtype, device=DEVICE)
    result = paged_prefill_ref(q, k, v, table, starts, lens, ctx, out=out)
    assert result is out and result.dtype == torch.float16
    rows = chunk_rows(starts, lens, q.shape[0]).to(DEVICE)
    assert torch.equal(out[~rows], torch.full_like(out[~rows], SENTINEL))
    assert paged_prefill_ref(q.float(), k.float(), v.float(), table, starts, lens, ctx).dtype == torch.float32


# Sliding window (Phi-3): (chunks, block_size, num_kv_heads, group, head_dim, window), default tiles.
WINDOW_CASES = [
    pytest.param([(37, 20), (0, 9)], 16, 2, 6, 32, 1, id="w1-gqa6"),  # each row sees only its own key
    pytest.param([(21, 30), (0, 17), (40, 2)], 16, 3, 1, 32, 5, id="w5-3chunks-mha"),
    pytest.param([(10, 37)], 16, 2, 1, 96, 17, id="w17-phi3-d96-mha"),  # 17: not a multiple of the page
    pytest.param([(100, 40), (3, 20)], 16, 1, 4, 96, 17, id="w17-gqa4-d96-prefix>window"),
    pytest.param([(29, 20), (50, 7)], 24, 1, 3, 16, 40, id="w40-gqa3-bs24-midblock"),
    pytest.param([(200, 60)], 16, 2, 2, 64, 100, id="w100-gqa2-d64-prefix>window"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunks,block_size,num_kv_heads,group,head_dim,window", WINDOW_CASES)
def test_sliding_window(chunks, block_size, num_kv_heads, group, head_dim, window, dtype):
    check(make_case(chunks, block_size, num_kv_heads, group, head_dim, dtype, seed=11), sliding_window=window)


# Small tiles: several query blocks per chunk and key tiles of 16 / 32, so each block's key loop has a skipped head,
# window-edge tiles, unmasked tiles and a diagonal that the window edge may cross; rows late in a block whose first
# visited tiles are wholly before their window (w 5 with 16-token query blocks).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunks,block_size,num_kv_heads,group,head_dim,config,window", [
    pytest.param([(45, 40), (0, 9)], 32, 1, 6, 16, (16, 16, 4, 1), 5, id="w5-gqa6-bs32-tile16x16"),
    pytest.param([(13, 50), (70, 1)], 8, 2, 1, 16, (32, 16, 4, 1), 17, id="w17-mha-bs8-tile32x16"),
    pytest.param([(120, 33)], 16, 1, 8, 96, (64, 32, 4, 1), 60, id="w60-gqa8-d96-tile64x32"),
    pytest.param([(100, 50)], 16, 1, 1, 32, (16, 16, 4, 1), 5, id="w5-mha-tile16x16"),
])
def test_sliding_window_small_tiles(chunks, block_size, num_kv_heads, group, head_dim, config, window, dtype):
    check(make_case(chunks, block_size, num_kv_heads, group, head_dim, dtype, seed=12), config=config,
          sliding_window=window)


@pytest.mark.parametrize("window", [1, 17, 40])
def test_sliding_window_every_alignment(window):
    """As test_every_diagonal_alignment, with a window: 16 chunks over prefixes 24..39 with 16 x 16 tiles, so
    every residue of the window's start and end modulo BLOCK_N (w 1: the diagonal only; 17: the edge runs through
    the diagonal; 40: edge tiles, then unmasked tiles, then the diagonal)."""
    chunks = [(prefix, 37) for prefix in range(24, 40)]
    check(make_case(chunks, 8, 1, 1, 16, torch.float32, seed=9, gap=1), config=(16, 16, 4, 1), sliding_window=window)


def poison_before_windows(case, window, block_n):
    """Appends a NaN block to both caches and points each chunk's table entries for blocks wholly before its first
    key tile (the first query's window start rounded down to BLOCK_N) at it: a kernel that loads any of those keys
    (even masked: 0 * NaN) returns NaN."""
    q, k, v, table, starts, lens, ctx = case
    block_size = k.shape[1]
    nan = torch.full_like(k[:1], float("nan"))
    k, v, table = torch.cat([k, nan]), torch.cat([v, nan]), table.clone()
    for c, (n, total) in enumerate(zip(lens.tolist(), ctx.tolist())):
        first_tile = max(0, total - n - window + 1) // block_n * block_n
        table[c, : first_tile // block_size] = k.shape[0] - 1
    return [q, k, v, table, starts, lens, ctx]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sliding_window_skips_tiles_before_window(dtype):
    """Chunked prefill over prefixes much longer than the window: the blocks before every window are NaN and must
    never be loaded; the result matches the references on the clean cache."""
    clean = make_case([(300, 40), (150, 70), (0, 20)], 16, 2, 2, 32, dtype, seed=13)
    for config, window in (((16, 16, 4, 1), 17), ((32, 32, 4, 1), 60)):
        check(poison_before_windows(clean, window, config[1]), config=config, ref_case=clean[1:4],
              sliding_window=window)


def test_window_longer_than_context_is_no_window():
    """A window >= the table's capacity takes the windowless kernel (bit-identical); one just past the longest
    context binds nowhere and gives the same answer."""
    case = make_case([(50, 30), (5, 24)], 16, 2, 2, 32, torch.float32, seed=14)
    cap = case[3].shape[1] * 16
    for config in (None, (32, 16, 4, 1)):
        plain = _paged_prefill(*case, 30, None, None, True, config)
        assert torch.equal(_paged_prefill(*case, 30, None, None, True, config, cap), plain)
        wide = _paged_prefill(*case, 30, None, None, True, config, 81)
        torch.testing.assert_close(wide, plain, atol=1e-6, rtol=1e-6)
    assert torch.equal(paged_prefill_ref(*case, sliding_window=80), paged_prefill_ref(*case))


@pytest.mark.parametrize("window", [1, 5, 17, 60])
def test_reference_window_matches_dense(window):
    """paged_prefill_ref with a window == the dense float64 reference to fp32 rounding, also in row blocks (each
    block takes keys from its own first window start)."""
    case = make_case([(70, 45), (0, 23), (9, 1)], 16, 2, 6, 32, torch.float32, seed=8)
    dense = dense_reference(*case, sliding_window=window).float()
    torch.testing.assert_close(paged_prefill_ref(*case, sliding_window=window), dense, atol=2e-6, rtol=1e-5)
    blocked = paged_prefill_ref(*case, max_score_elements=12 * 115 * 4, sliding_window=window)
    torch.testing.assert_close(blocked, dense, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("window", [0, -4, 2.5, True, "8"], ids=str)
def test_sliding_window_must_be_positive_int(window):
    args = _bad()
    with pytest.raises(ValueError, match="sliding_window"):
        paged_prefill(**args, sliding_window=window)
    del args["max_query_len"]
    with pytest.raises(ValueError, match="sliding_window"):
        paged_prefill_ref(**args, sliding_window=window)


def _bad(**changes):
    q, k, v, table, starts, lens, ctx = make_case([(20, 5), (0, 9)], 16, 2, 2, 16, torch.float16)
    args = dict(q=q, k_cache=k, v_cache=v, block_tables=table, query_starts=starts, query_lens=lens,
                context_lens=ctx, max_query_len=9)
    args.update({name: fn(args) for name, fn in changes.items()})
    return args


@pytest.mark.parametrize("changes,match", [
    (dict(q=lambda a: a["q"][:, :3]), "multiple of num_kv_heads"),
    (dict(q=lambda a: a["q"][..., :8]), "head_dim mismatch"),
    (dict(q=lambda a: a["q"][0]), "must be"),
    (dict(v_cache=lambda a: a["v_cache"][:, :8]), "v_cache shape"),
    (dict(k_cache=lambda a: a["k_cache"].float()), "dtype mismatch"),
    (dict(q=lambda a: a["q"].double(), k_cache=lambda a: a["k_cache"].double(),
          v_cache=lambda a: a["v_cache"].double()), "unsupported dtype"),
    (dict(block_tables=lambda a: a["block_tables"].long()), "int32"),
    (dict(query_starts=lambda a: a["query_starts"].long()), "int32"),
    (dict(context_lens=lambda a: a["context_lens"].long()), "int32"),
    (dict(block_tables=lambda a: a["block_tables"][:1]), "block_tables must be"),
    (dict(query_lens=lambda a: a["query_lens"][:1]), "one length"),
    (dict(context_lens=lambda a: a["context_lens"][None]), "one length"),
    (dict(query_lens=lambda a: a["query_lens"] * 0), "query_lens must be >= 1"),
    (dict(query_lens=lambda a: a["context_lens"] + 1, max_query_len=lambda a: 100), "<= context_lens"),
    (dict(context_lens=lambda a: a["context_lens"] * 0 + a["block_tables"].shape[1] * 16 + 1,
          query_lens=lambda a: a["query_lens"] * 0 + 1), "context_lens must be <="),
    (dict(query_starts=lambda a: a["query_starts"] - 4), "chunk rows"),
    (dict(query_starts=lambda a: a["query_starts"] + a["q"].shape[0]), "chunk rows"),
    (dict(max_query_len=lambda a: 8), "max_query_len 8 < max"),
    (dict(max_query_len=lambda a: -1), "max_query_len must be"),
    (dict(max_query_len=lambda a: torch.tensor(9)), "max_query_len must be"),
    (dict(out=lambda a: torch.empty_like(a["q"]).float()), "out must be"),
    (dict(out=lambda a: torch.empty_like(a["q"])[:-1]), "out must be"),
], ids=["heads", "head_dim", "q-rank", "v-shape", "dtype-mix", "dtype-f64", "table-int64", "starts-int64",
        "ctx-int64", "table-rows", "lens-len", "ctx-rank", "zero-len", "len>ctx", "ctx>cap", "start<0",
        "rows>T", "max_query_len-small", "max_query_len-neg", "max_query_len-tensor", "out-dtype", "out-shape"])
def test_validation_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        paged_prefill(**_bad(**changes))


def test_reference_validates_too():
    args = _bad(query_lens=lambda a: a["query_lens"] * 0)
    del args["max_query_len"]
    with pytest.raises(ValueError, match="query_lens must be >= 1"):
        paged_prefill_ref(**args)
    args = _bad()
    del args["max_query_len"]
    with pytest.raises(ValueError, match="max_score_elements"):
        paged_prefill_ref(**args, max_score_elements=0)


def test_bad_tile_config():
    q, k, v, table, starts, lens, ctx = make_case([(4, 9)], 16, 1, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="power of two"):
        _paged_prefill(q, k, v, table, starts, lens, ctx, 9, None, None, True, (24, 16, 4, 1))
    with pytest.raises(ValueError, match="whole group"):
        _paged_prefill(q, k, v, table, starts, lens, ctx, 9, None, None, True, (16, 16, 4, 1))
