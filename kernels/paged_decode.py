"""Paged KV-cache attention for decoding: one query token per sequence, GQA-grouped, split-K (flash-decoding).

Semantics (== `paged_decode_ref`): for sequence s and query head h, with kv = h // (num_q_heads // num_kv_heads),
token t of s lives at k_cache[block_tables[s, t // block_size], t % block_size, kv] (same for V), and
    out[s, h] = softmax(scale * q[s, h] . K[s, lo:seq_lens[s], kv]^T) @ V[s, lo:seq_lens[s], kv]
with lo = 0, or with a sliding window of w tokens (Phi-3's `sliding_window`: the query, at position
seq_lens[s] - 1, sees only its last w keys) lo = max(0, seq_lens[s] - w). Block-table entries past
cdiv(seq_lens[s], block_size) are never read (they may be -1 or garbage), nor those wholly before lo.

Design. Pass 1 grid (num_seqs, num_kv_heads, num_splits): one program owns ALL query heads of one KV head (a
[GROUP_PAD >= 16, head_dim] query tile) and one split of the context, so each K/V tile is loaded once per KV head
and q.K^T, P.V are tl.dot tensor-core products; MHA (group 1) instead uses a broadcast-multiply-sum on a single
query row (a dot would waste 15/16 of it). Tiles of TILE_N tokens are gathered through the block table token by
token (so tiles need not align with pages), online softmax in fp32 (exp2, scale folded into log2 units). Splits
write fp32 partials (unnormalised acc, running max, sum of exps); pass 2 (one program per (sequence, query
head)) merges the splits with the log-sum-exp rule. With a single split pass 1 normalises and writes `out`
itself (no scratch, no pass 2). All block-id * stride offsets are int64 (caches with > 2**31 elements work).

Splits are sized per sequence ON THE DEVICE from its own seq_len: its attended keys [lo, seq_len) are cut into
splits of max(min_split_tokens, cdiv(span, num_splits) rounded up to whole tiles) tokens, so the valid splits of a
sequence are [0, cdiv(span, that)) <= num_splits. The grid is fixed by shapes alone (no host sync; a CUDA graph
captured for the longest context replays for any), a short context still spreads over several programs, and a
split past its sequence's keys returns at once: it loads and stores nothing, and pass 2, which recomputes the
same size, reads only the valid splits. num_splits=None picks the count from block_tables.shape[1] so that
num_seqs * num_kv_heads * num_splits >= 2 * SMs for the longest sequence the table holds, with splits of at
least _MIN_SPLIT_TOKENS tokens; a given num_splits divides each sequence evenly (no minimum).

Sliding window (a constexpr path: without one the kernels are exactly the windowless ones): lo = seq_len - w, and
the splits divide [lo, seq_len) only, so no tile wholly before the window is loaded (the first split starts at lo
itself, not on a page or tile boundary: tokens are gathered one by one anyway, and no lane falls before lo, so no
extra mask). A window >= the table's capacity (max_blocks * block_size) can never bind and takes the windowless
kernels (e.g. Mini-InternVL-4B's 262144-token window over a 131072-token context).

Full-size shapes (head_dim 128, block_size 16 or 32, fp16/bf16):
    InternLM2-20B (InternVL-Chat-V1.5): q [batch, 48, 128], caches [num_blocks, block_size, 8, 128]
    InternLM2-1.8B (Mini-InternVL-2B):  q [batch, 16, 128], caches [num_blocks, block_size, 8, 128]
    Phi-3-mini (Mini-InternVL-4B):      q [batch, 32, 96],  caches [num_blocks, block_size, 32, 96]  (MHA)
Bytes moved per call (memory bound; report GB/s):
    sum(seq_lens) * num_kv_heads * head_dim * 2 (K and V) * elem  +  2 * num_seqs * num_q_heads * head_dim * elem
(+ split scratch: (head_dim + 2) * 4 bytes per (sequence, query head, valid split), written and read when > 1 split).
FLOPs (for reference): 4 * sum(seq_lens) * num_q_heads * head_dim.
"""
from __future__ import annotations

import math
from numbers import Integral

import torch
import triton
import triton.language as tl

_MIN_SPLIT_TOKENS = 256  # a split shorter than this costs more in scratch traffic / pass 2 than it gains
_DEFAULT_SMS = 132  # H100 SXM; used off-GPU (interpreter) where no device can be queried
_SPLIT_TILE = 32  # splits merged per iteration of pass 2


@triton.jit
def _window_start(seq_len, window, HAS_WINDOW: tl.constexpr):
    """First key the query (at seq_len - 1) attends to: seq_len - window, or 0."""
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    else:
        lo = seq_len * 0
    return lo


@triton.jit
def _split_tokens(span, num_splits, min_split_tokens, TILE_N: tl.constexpr):
    """Tokens per split of a sequence attending to `span` keys: span / num_splits rounded up to whole tiles, at
    least min_split_tokens. Decided per sequence on the device, so a grid fixed for the longest possible context
    (a CUDA graph's) spreads a short context over as many splits as it fills."""
    even = tl.cdiv(tl.cdiv(span, num_splits), TILE_N) * TILE_N
    return tl.maximum(even, min_split_tokens)


@triton.jit
def _paged_decode_split_kernel(
    q_ptr,  # [num_seqs, num_q_heads, head_dim]
    k_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    bt_ptr,  # [num_seqs, max_blocks] int32
    seq_lens_ptr,  # [num_seqs] int32
    out_ptr,  # [num_seqs, num_q_heads, head_dim]; written only when WRITE_OUT (single split)
    acc_ptr,  # [num_seqs, num_q_heads, num_splits, head_dim] fp32 scratch (unnormalised P.V); unless WRITE_OUT
    m_ptr,  # [num_seqs, num_q_heads, num_splits] fp32 scratch: running max of the logits in log2 units
    l_ptr,  # [num_seqs, num_q_heads, num_splits] fp32 scratch: sum of exp2(logit - max)
    qk_scale,  # scale * log2(e)
    min_split_tokens,  # multiple of TILE_N: no split is shorter (0: the context is divided evenly)
    window,  # sliding window in tokens (read only when HAS_WINDOW)
    stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_bts, stride_btb,
    stride_os, stride_oh, stride_od,
    stride_as, stride_ah, stride_ap,  # acc scratch (last dim contiguous)
    stride_ms, stride_mh,  # m / l scratch (last dim contiguous)
    head_dim,
    group,  # query heads per KV head
    BLOCK_SIZE: tl.constexpr,  # tokens per KV block (page)
    TILE_N: tl.constexpr,  # tokens per loop iteration (power of two)
    GROUP_PAD: tl.constexpr,  # >= 16 power of two when USE_DOT, else 1
    HEAD_DIM_PAD: tl.constexpr,  # power of two >= max(16, head_dim)
    USE_DOT: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    lo = _window_start(seq_len, window, HAS_WINDOW)
    tokens_per_split = _split_tokens(seq_len - lo, tl.num_programs(2), min_split_tokens, TILE_N)
    start = lo + split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)
    if start >= end:
        return  # past this sequence's context: nothing is loaded or stored (pass 2 never reads this split)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    n = tl.arange(0, TILE_N)
    g_mask = g < group
    d_mask = d < head_dim
    heads = kvh * group + g  # [GROUP_PAD] query heads of this KV head (int64)
    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [GROUP_PAD, HEAD_DIM_PAD]
    if not USE_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    bt_row = bt_ptr + seq * stride_bts
    for t0 in range(start, end, TILE_N):
        tok = t0 + n  # [TILE_N]
        tok_mask = tok < end  # every tile has >= 1 valid token, so the row max below is finite
        # Physical block of each token; masked lanes never touch the (possibly garbage) table tail.
        blk = tl.load(bt_row + (tok // BLOCK_SIZE) * stride_btb, mask=tok_mask, other=0).to(tl.int64)
        slot = (tok % BLOCK_SIZE).to(tl.int64)
        kv_mask = tok_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + (blk * stride_kb + slot * stride_kt + kvh * stride_kh)[:, None] + d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)  # [TILE_N, HEAD_DIM_PAD]
        if USE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [GROUP_PAD, TILE_N]; ieee only affects fp32
        else:
            s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)  # [1, TILE_N]
        s = tl.where(tok_mask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)  # 0 on the first tile (m_i = -inf)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + (blk * stride_vb + slot * stride_vt + kvh * stride_vh)[:, None] + d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)  # [TILE_N, HEAD_DIM_PAD]
        if USE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)  # [1, HEAD_DIM_PAD]
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    row_mask = g_mask[:, None] & d_mask[None, :]
    if WRITE_OUT:
        out = acc / l_i[:, None]  # a single split holds every attended token, >= 1: l_i > 0
        tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + d[None, :] * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=row_mask)
    else:
        tl.store(acc_ptr + seq * stride_as + heads[:, None] * stride_ah + split * stride_ap + d[None, :], acc,
                 mask=row_mask)
        ml_off = seq * stride_ms + heads * stride_mh + split
        tl.store(m_ptr + ml_off, m_i, mask=g_mask)
        tl.store(l_ptr + ml_off, l_i, mask=g_mask)


@triton.jit
def _paged_decode_reduce_kernel(
    acc_ptr,  # [num_seqs, num_q_heads, num_splits, head_dim] fp32
    m_ptr,  # [num_seqs, num_q_heads, num_splits] fp32
    l_ptr,  # [num_seqs, num_q_heads, num_splits] fp32
    seq_lens_ptr,  # [num_seqs] int32
    out_ptr,  # [num_seqs, num_q_heads, head_dim]
    min_split_tokens,  # as in pass 1
    num_splits,
    window,  # sliding window in tokens (read only when HAS_WINDOW)
    stride_as, stride_ah, stride_ap,
    stride_ms, stride_mh,
    stride_os, stride_oh, stride_od,
    head_dim,
    SPLIT_TILE: tl.constexpr,  # power of two
    HEAD_DIM_PAD: tl.constexpr,
    TILE_N: tl.constexpr,  # pass 1's
    HAS_WINDOW: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + seq)
    # Pass 1's split size for this sequence: splits [0, n_valid) hold its tokens (>= 1 each, so no merge sees
    # an empty partial); the others stored nothing and are not read. n_valid <= num_splits by construction.
    span = seq_len - _window_start(seq_len, window, HAS_WINDOW)
    n_valid = tl.cdiv(span, _split_tokens(span, num_splits, min_split_tokens, TILE_N))
    sp = tl.arange(0, SPLIT_TILE)
    d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = d < head_dim
    ml_row = seq * stride_ms + head * stride_mh
    acc_row = acc_ptr + seq * stride_as + head * stride_ah
    m_run = tl.full([1], float("-inf"), dtype=tl.float32)
    l_run = tl.zeros([1], dtype=tl.float32)
    o_run = tl.zeros([HEAD_DIM_PAD], dtype=tl.float32)
    for s0 in range(0, n_valid, SPLIT_TILE):  # online log-sum-exp over chunks of splits
        s_idx = s0 + sp
        s_mask = s_idx < n_valid  # each chunk starts on a valid split, so m_new is finite
        m = tl.load(m_ptr + ml_row + s_idx, mask=s_mask, other=float("-inf"))  # [SPLIT_TILE]
        l = tl.load(l_ptr + ml_row + s_idx, mask=s_mask, other=0.0)
        a = tl.load(acc_row + s_idx[:, None] * stride_ap + d[None, :], mask=s_mask[:, None] & d_mask[None, :],
                    other=0.0)  # [SPLIT_TILE, HEAD_DIM_PAD]
        m_new = tl.maximum(m_run, tl.max(m, axis=0))  # [1]
        w = tl.where(s_mask, tl.exp2(m - m_new), 0.0)  # [SPLIT_TILE]
        alpha = tl.exp2(m_run - m_new)
        l_run = l_run * alpha + tl.sum(w * l, axis=0)
        o_run = o_run * alpha + tl.sum(w[:, None] * a, axis=0)
        m_run = m_new
    out = o_run / l_run
    tl.store(out_ptr + seq * stride_os + head * stride_oh + d * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=d_mask)


def _launch_config(head_dim_pad: int, use_dot: bool) -> tuple[int, int]:
    """(TILE_N, num_warps). From sm_90 cubins built offline (ptxas resource usage, not timed): these keep the
    dot path at <= ~128 registers with no spills and cp.async-pipelined K/V loads, and the MHA broadcast path
    (no pipelining, registers hold a [TILE_N, head_dim] product) at ~80 registers."""
    if not use_dot:
        return 32, 4
    return (64, 4) if head_dim_pad <= 128 else (32, 8)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_blocks: int, block_size: int,
                      num_sms: int = _DEFAULT_SMS) -> tuple[int, int]:
    """Automatic split count -> (num_splits, blocks_per_split), from the table width (no device sync).

    Aims at num_seqs * num_kv_heads * num_splits >= 2 * num_sms with each split >= _MIN_SPLIT_TOKENS tokens and,
    where the splits are longer than one tile, a whole number of TILE_N-token tiles.
    """
    base = max(1, num_seqs * num_kv_heads)
    want = -(-2 * num_sms // base)
    min_blocks = max(1, -(-_MIN_SPLIT_TOKENS // block_size))
    if want <= 1 or max_blocks < 2 * min_blocks:
        return 1, max_blocks
    blocks = max(min_blocks, max_blocks // want)
    tile_blocks = max(1, _launch_config(128, True)[0] // block_size)
    blocks = max(tile_blocks, blocks // tile_blocks * tile_blocks)
    return -(-max_blocks // blocks), blocks


def check_sliding_window(sliding_window) -> None:
    """sliding_window must be None (no window) or a host int >= 1 (a query at p sees keys p - w + 1 ... p)."""
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, Integral)
                                       or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or an int >= 1; got {sliding_window!r}")


def _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, num_splits, validate, sliding_window=None):
    check_sliding_window(sliding_window)
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be [num_seqs, heads, head_dim] and k_cache [num_blocks, block_size, kv_heads, "
                         f"head_dim]; got {tuple(q.shape)} and {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    num_seqs, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, kd = k_cache.shape
    if kd != head_dim:
        raise ValueError(f"head_dim mismatch: q has {head_dim}, caches have {kd}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"num_q_heads {num_q_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported dtype {q.dtype}; expected float16, bfloat16 or float32")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"dtype mismatch: q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError(f"block_tables and seq_lens must be int32; got {block_tables.dtype}, {seq_lens.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be [num_seqs={num_seqs}, max_blocks]; got {tuple(block_tables.shape)}")
    if seq_lens.shape != (num_seqs,):
        raise ValueError(f"seq_lens must be [num_seqs={num_seqs}]; got {tuple(seq_lens.shape)}")
    if len({t.device for t in (q, k_cache, v_cache, block_tables, seq_lens)}) != 1:
        raise ValueError("q, k_cache, v_cache, block_tables and seq_lens must be on one device")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1; got {num_splits}")
    if validate and num_seqs > 0:
        cap = block_tables.shape[1] * block_size
        lo, hi = int(seq_lens.min()), int(seq_lens.max())  # the only data-dependent check (a host sync on GPU)
        if lo < 1 or hi > cap:
            raise ValueError(f"seq_lens must lie in [1, max_blocks * block_size = {cap}]; got min {lo}, max {hi}")


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float | None = None, num_splits: int | None = None,
                 validate: bool = True, sliding_window: int | None = None) -> torch.Tensor:
    """Decode attention over a paged KV cache -> [num_seqs, num_q_heads, head_dim] in q's dtype.

    num_splits: the grid's splits per (sequence, KV head). None picks it from the shapes (see `choose_num_splits`;
    each split then holds >= _MIN_SPLIT_TOKENS tokens); an int divides each sequence's keys into at most that
    many whole-tile splits. Either way a sequence uses only the splits its own seq_len fills (decided on the
    device); the others return at once.
    validate=False skips the seq_lens range check, the only one that reads tensor data (host sync on GPU).
    sliding_window: None (attend to the whole context) or an int w >= 1: the query, at position seq_lens[s] - 1,
    attends to keys [max(0, seq_lens[s] - w), seq_lens[s]) only.
    Any strides are accepted (e.g. q sliced from a fused qkv, K/V views of one fused cache).
    """
    _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, num_splits, validate, sliding_window)
    num_seqs, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    max_blocks = block_tables.shape[1]
    group = num_q_heads // num_kv_heads
    out = torch.empty((num_seqs, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_seqs == 0 or num_q_heads == 0:
        return out
    if scale is None:
        scale = head_dim ** -0.5
    if sliding_window is not None and sliding_window >= max_blocks * block_size:
        sliding_window = None  # longer than any sequence the table can hold: never binds
    has_window = sliding_window is not None

    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    use_dot = group > 1
    tile_n, num_warps = _launch_config(head_dim_pad, use_dot)
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else _DEFAULT_SMS
        num_splits, _ = choose_num_splits(num_seqs, num_kv_heads, max_blocks, block_size, sms)
        min_split_tokens = -(-_MIN_SPLIT_TOKENS // tile_n) * tile_n
    else:
        min_split_tokens = 0
    group_pad = max(16, triton.next_power_of_2(group)) if use_dot else 1
    write_out = num_splits == 1
    if write_out:  # dummies: never dereferenced
        acc = m = l = out.new_empty((1, 1, 1, 1), dtype=torch.float32)
    else:
        acc = torch.empty((num_seqs, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        m = torch.empty((num_seqs, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
    _paged_decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, acc, m, l,
        float(scale) * math.log2(math.e), min_split_tokens, sliding_window if has_window else 0,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1),
        head_dim, group,
        BLOCK_SIZE=block_size, TILE_N=tile_n, GROUP_PAD=group_pad, HEAD_DIM_PAD=head_dim_pad,
        USE_DOT=use_dot, WRITE_OUT=write_out, HAS_WINDOW=has_window, num_warps=num_warps,
    )
    if not write_out:
        _paged_decode_reduce_kernel[(num_seqs, num_q_heads)](
            acc, m, l, seq_lens, out, min_split_tokens, num_splits, sliding_window if has_window else 0,
            acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1), *out.stride(),
            head_dim, SPLIT_TILE=min(_SPLIT_TILE, triton.next_power_of_2(num_splits)), HEAD_DIM_PAD=head_dim_pad,
            TILE_N=tile_n, HAS_WINDOW=has_window, num_warps=4,
        )
    return out


def paged_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float | None = None,
                     sliding_window: int | None = None) -> torch.Tensor:
    """PyTorch reference in the input dtype: gather each sequence's blocks, repeat KV heads, softmax attention
    over its keys [max(0, seq_len - sliding_window), seq_len) (all of them without a window)."""
    check_sliding_window(sliding_window)
    num_seqs, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    for s in range(num_seqs):
        length = int(seq_lens[s])
        lo = 0 if sliding_window is None else max(0, length - sliding_window)
        ids = block_tables[s, lo // block_size: -(-length // block_size)].long()  # the window's blocks only
        first = lo % block_size  # position lo within the gathered blocks
        k = k_cache[ids].reshape(-1, num_kv_heads, head_dim)[first: first + length - lo]  # [L, kv_heads, D]
        v = v_cache[ids].reshape(-1, num_kv_heads, head_dim)[first: first + length - lo]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [L, H, D]
        logits = torch.einsum("hd,lhd->hl", q[s], k) * scale  # [H, L]
        out[s] = torch.einsum("hl,lhd->hd", torch.softmax(logits, dim=-1), v)
    return out
