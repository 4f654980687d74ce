"""Paged KV-cache attention for prefill: causal chunks of new tokens over their cached prefix, GQA-packed.

Semantics (== `paged_prefill_ref`): one call serves the prefill chunks of one engine step. Chunk i owns rows
[query_starts[i], query_starts[i] + query_lens[i]) of q (chunks need not be contiguous nor cover q). Its K/V,
including those of the chunk's own tokens, are already in the cache: token t of chunk i lives at
k_cache[block_tables[i, t // block_size], t % block_size, kv] (same for V). With n = query_lens[i],
L = context_lens[i] and kv = h // (num_q_heads // num_kv_heads), query j of chunk i sits at absolute position
p = L - n + j and
    out[query_starts[i] + j, h] = softmax(scale * q[query_starts[i] + j, h] . K[i, :p + 1, kv]^T) @ V[i, :p + 1, kv]
i.e. causal over its cached prefix (which may end mid-block) and the chunk up to itself. With a sliding window
of w tokens (Phi-3's `sliding_window`) the keys are K[i, max(0, p - w + 1):p + 1, kv] instead. Block-table
entries past cdiv(context_lens[i], block_size) are never read (they may be -1 or garbage), nor those of pages
that lie wholly before every window of a query block. Only the chunks' rows of `out` are written; a freshly
allocated `out` is zero elsewhere.

Design. Grid (query blocks, num_kv_heads, num_chunks): one program owns BLOCK_Q consecutive tokens of one chunk
and ALL query heads of one KV head. The group's heads are packed into the M dimension of one
[BLOCK_M, HEAD_DIM_PAD] query tile, row r = (token r // group, head r % group), BLOCK_Q = BLOCK_M // group (so
group 6 uses 126 of 128 rows instead of padding the group to 8), so each K/V tile is loaded once per KV head
and both S = Q.K^T and P.V are tl.dot tensor-core products, K/V never repeated. The program loops over key
tiles of BLOCK_N tokens gathered through the block table token by token (tiles need not align with pages):
keys [0, n_full) lie at or before every row's position (no masks at all: no causal mask, no bounds mask, an
unmasked table read); the few tiles on the diagonal, up to the block's last position, apply the causal mask by
absolute position; tiles past the block's last position are never visited. Online softmax in fp32 with exp2
(the scale folded into log2 units), one normalisation at the end, no score matrix in memory. Axis 0 runs the
query blocks of one (KV head, chunk) together (shared K/V stay in L2), last (heaviest) block first, for a
balanced tail; programs whose block starts past the chunk's length exit at once (max_query_len sizes the grid,
from the host: no device sync). head_dim need not be a power of two (Phi-3's 96 is padded to 128 with masks).
fp32 inputs use IEEE dots (not TF32); fp16/bf16 use tensor-core dots with P cast to the input dtype. All block
id * stride and row * stride offsets are int64 (caches and q with > 2**31 elements work). Tile sizes, warps and
stages: `_default_config` (sm_90 choices with their ptxas figures) and `_launch_config` (fitted to short chunks).

Sliding window (the constexpr HAS_WINDOW; without it the kernel is exactly the windowless one). Row r of a query
block sees keys (pos_r - w, pos_r]. The block's smallest lower bound, lo = max(0, first position - w + 1), sets
where the key loop starts (lo rounded down to a tile): tiles wholly before it are never visited. Keys at or past
the largest lower bound, hi = max(0, last position - w + 1), are inside every row's window. So the key range
splits into tile-aligned pieces: [lo tile, cdiv(hi, BLOCK_N) tiles) with the window mask only (these keys all
precede n_full: no causal mask), then unmasked tiles up to n_full, then the diagonal with the causal AND window
masks (for windows shorter than a query block the window edge runs through the diagonal too). A row can meet
tiles wholly outside its window before its first valid key (it sits late in the block and the window is short),
so the masked tiles take their exp2 reference max as 0 while a row's running max is still -inf: nothing is
accumulated (p = 0, alpha = 0) and no NaN arises; each row's own key comes in a later tile, so l > 0 at the end.
A window >= the table's capacity (max_blocks * block_size) can never bind and takes the windowless kernel.

Full-size shapes (head_dim 128, block_size 16, bf16/fp16; prefill chunks of up to a few thousand tokens):
    InternLM2-20B (InternVL-Chat-V1.5): q [T, 48, 128], caches [num_blocks, block_size, 8, 128]   (group 6)
    InternLM2-1.8B (Mini-InternVL-2B):  q [T, 16, 128], caches [num_blocks, block_size, 8, 128]   (group 2)
    Phi-3-mini (Mini-InternVL-4B):      q [T, 32, 96],  caches [num_blocks, block_size, 32, 96]   (MHA)
FLOPs per call (two matmuls, 2 FLOPs per multiply-add, exp not counted; what tile padding and masked diagonal
lanes add is not counted): 4 * num_q_heads * head_dim * sum_i [n_i * (L_i - n_i) + n_i * (n_i + 1) / 2], i.e.
4 * heads * head_dim * (sum over queries of the keys each attends to): compute bound beyond short chunks.
Bytes (compulsory HBM traffic): 2 * sum_i n_i * num_q_heads * head_dim * elem (q in, out) +
2 * sum_i L_i * num_kv_heads * head_dim * elem (K and V once; the query blocks re-read them from L2).
"""
from __future__ import annotations

import math
from numbers import Integral

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_GRID_YZ = 65535  # CUDA limit on gridDim.y and gridDim.z


@triton.jit
def _load_tile(ptrs, row_ok, col_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    # A 2-D load that carries only the masks it needs (none in the hot loop when head_dim is a power of two).
    if MASK_ROWS and MASK_COLS:
        return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    elif MASK_ROWS:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif MASK_COLS:
        return tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _attend_key_tile(acc, l_i, m_i, q, pos, k_base, v_base, bt_row, start, end, qk_scale,
                     stride_kb, stride_kt, stride_kd, stride_vb, stride_vt, stride_vd, stride_btb,
                     offs_n, offs_d, d_ok, window,
                     BLOCK_SIZE: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PAD_D: tl.constexpr,
                     DOT_IEEE: tl.constexpr):
    # acc [BLOCK_M, HEAD_DIM_PAD] fp32; l_i, m_i [BLOCK_M] fp32; q [BLOCK_M, HEAD_DIM_PAD] input dtype;
    # pos [BLOCK_M] absolute position of each row (clamped into the block for padding rows).
    # CAUSAL=False: every key of the tile is < end and <= every row's position (no causal or bounds mask).
    # WINDOW: mask keys <= pos - window (before the row's sliding window); some rows may have no key in the tile.
    key = start + offs_n  # [BLOCK_N] absolute key positions
    if CAUSAL:
        key_ok = key < end  # masked lanes never read the (possibly garbage) table tail
        blk = tl.load(bt_row + (key // BLOCK_SIZE) * stride_btb, mask=key_ok, other=0).to(tl.int64)
    else:
        key_ok = key >= 0  # unused: only the constexpr-False branch of _load_tile sees it
        blk = tl.load(bt_row + (key // BLOCK_SIZE) * stride_btb).to(tl.int64)
    slot = (key % BLOCK_SIZE).to(tl.int64)
    # K is gathered already transposed, [HEAD_DIM_PAD, BLOCK_N], so S = q @ kt needs no tl.trans.
    kt = _load_tile(k_base + (blk * stride_kb + slot * stride_kt)[None, :] + offs_d[:, None] * stride_kd,
                    d_ok, key_ok, MASK_ROWS=PAD_D, MASK_COLS=CAUSAL)
    if DOT_IEEE:
        s = tl.dot(q, kt, input_precision="ieee")
    else:
        s = tl.dot(q, kt)
    s = s * qk_scale  # [BLOCK_M, BLOCK_N] fp32, log2 units
    if CAUSAL:
        # pos <= the block's last position < end, so this also drops keys past the tile's valid range.
        s = tl.where(key[None, :] <= pos[:, None], s, float("-inf"))
    if WINDOW:
        s = tl.where(key[None, :] > pos[:, None] - window, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if WINDOW:
        # A row may have seen no key of its window yet (m_new = -inf): take 0 as the reference so that
        # exp2(-inf - 0) = 0 everywhere (not exp2(-inf + inf) = NaN); m_new itself stays -inf.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        # Without a window every row meets a valid key in the first tile it processes (key 0 or n_full <= its
        # position), so m_new is finite from then on and exp2(-inf - m_new) = 0 for masked lanes.
        m_ref = m_new
    alpha = tl.exp2(m_i - m_ref)  # rescales what was accumulated under the old max (0 on the first valid tile)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = _load_tile(v_base + (blk * stride_vb + slot * stride_vt)[:, None] + offs_d[None, :] * stride_vd,
                   key_ok, d_ok, MASK_ROWS=CAUSAL, MASK_COLS=PAD_D)  # [BLOCK_N, HEAD_DIM_PAD]
    if DOT_IEEE:
        acc = tl.dot(p, v, acc=acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc=acc)
    return acc, l_i, m_new


@triton.jit
def _paged_prefill_kernel(
    q_ptr,  # [T, num_q_heads, head_dim], strided
    k_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], strided
    v_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], strided
    bt_ptr,  # [num_chunks, max_blocks] int32
    qs_ptr,  # [num_chunks] int32: first row of each chunk in q / out
    ql_ptr,  # [num_chunks] int32: new tokens of each chunk
    cl_ptr,  # [num_chunks] int32: tokens with K/V after this step (prefix + chunk)
    out_ptr,  # [T, num_q_heads, head_dim], strided; only the chunks' rows are written
    qk_scale,  # scale * log2(e)
    window,  # sliding window in tokens (read only when HAS_WINDOW)
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_btc, stride_btb,
    stride_ot, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,  # power of two >= max(16, HEAD_DIM)
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_SIZE: tl.constexpr,  # tokens per KV block (page)
    BLOCK_M: tl.constexpr,  # query-tile rows (power of two >= 16, >= GROUP)
    BLOCK_Q: tl.constexpr,  # tokens per program = BLOCK_M // GROUP
    BLOCK_N: tl.constexpr,  # keys per loop iteration (power of two >= 16)
    DOT_IEEE: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    qb = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (last) query block of a chunk first
    kvh = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2).to(tl.int64)
    q_len = tl.load(ql_ptr + chunk)
    q_lo = qb * BLOCK_Q  # first token of this block within the chunk
    if q_lo >= q_len:
        return
    q_start = tl.load(qs_ptr + chunk).to(tl.int64)
    prefix = tl.load(cl_ptr + chunk) - q_len  # cached tokens before the chunk
    q_hi = tl.minimum(q_len, q_lo + BLOCK_Q)  # one past the block's last token

    r = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    tok = q_lo + r // GROUP  # [BLOCK_M] token (within the chunk) of each row
    head = kvh * GROUP + r % GROUP  # [BLOCK_M] query head of each row (int64)
    row_ok = tok < q_hi  # also false for the BLOCK_M - BLOCK_Q * GROUP padding rows
    # Padding rows take the block's last position: finite softmax, never stored.
    pos = prefix + tl.minimum(tok, q_hi - 1)
    q_rows = (q_start + tok.to(tl.int64)) * stride_qt + head * stride_qh
    q = _load_tile(q_ptr + q_rows[:, None] + offs_d[None, :] * stride_qd, row_ok, d_ok,
                   MASK_ROWS=True, MASK_COLS=HEAD_DIM != HEAD_DIM_PAD)  # [BLOCK_M, HEAD_DIM_PAD]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh
    bt_row = bt_ptr + chunk * stride_btc
    end = prefix + q_hi  # keys [0, end) are all this block attends to
    n_full = (prefix + q_lo + 1) // BLOCK_N * BLOCK_N  # keys [0, n_full) precede every row's position
    if HAS_WINDOW:
        # Tile-aligned: [lo_tile, edge) window-masked, [edge, n_full) unmasked, [n_full, end) the diagonal.
        lo_tile = tl.maximum(prefix + q_lo - window + 1, 0) // BLOCK_N * BLOCK_N  # tiles before: no row's window
        edge = (tl.maximum(prefix + q_hi - window, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N  # keys >= edge: all rows'
        for start in range(lo_tile, tl.minimum(edge, n_full), BLOCK_N):  # the window's edge, before the diagonal
            acc, l_i, m_i = _attend_key_tile(acc, l_i, m_i, q, pos, k_base, v_base, bt_row, start, end, qk_scale,
                                             stride_kb, stride_kt, stride_kd, stride_vb, stride_vt, stride_vd,
                                             stride_btb, offs_n, offs_d, d_ok, window, BLOCK_SIZE=BLOCK_SIZE,
                                             CAUSAL=False, WINDOW=True, PAD_D=HEAD_DIM != HEAD_DIM_PAD,
                                             DOT_IEEE=DOT_IEEE)
        for start in range(tl.maximum(edge, lo_tile), n_full, BLOCK_N):  # inside every row's window
            acc, l_i, m_i = _attend_key_tile(acc, l_i, m_i, q, pos, k_base, v_base, bt_row, start, end, qk_scale,
                                             stride_kb, stride_kt, stride_kd, stride_vb, stride_vt, stride_vd,
                                             stride_btb, offs_n, offs_d, d_ok, window, BLOCK_SIZE=BLOCK_SIZE,
                                             CAUSAL=False, WINDOW=False, PAD_D=HEAD_DIM != HEAD_DIM_PAD,
                                             DOT_IEEE=DOT_IEEE)
        for start in range(tl.maximum(n_full, lo_tile), end, BLOCK_N):  # the diagonal (window edge may cross it)
            acc, l_i, m_i = _attend_key_tile(acc, l_i, m_i, q, pos, k_base, v_base, bt_row, start, end, qk_scale,
                                             stride_kb, stride_kt, stride_kd, stride_vb, stride_vt, stride_vd,
                                             stride_btb, offs_n, offs_d, d_ok, window, BLOCK_SIZE=BLOCK_SIZE,
                                             CAUSAL=True, WINDOW=True, PAD_D=HEAD_DIM != HEAD_DIM_PAD,
                                             DOT_IEEE=DOT_IEEE)
    else:
        for start in range(0, n_full, BLOCK_N):
            acc, l_i, m_i = _attend_key_tile(acc, l_i, m_i, q, pos, k_base, v_base, bt_row, start, end, qk_scale,
                                             stride_kb, stride_kt, stride_kd, stride_vb, stride_vt, stride_vd,
                                             stride_btb, offs_n, offs_d, d_ok, window, BLOCK_SIZE=BLOCK_SIZE,
                                             CAUSAL=False, WINDOW=False, PAD_D=HEAD_DIM != HEAD_DIM_PAD,
                                             DOT_IEEE=DOT_IEEE)
        for start in range(n_full, end, BLOCK_N):  # the diagonal: at most cdiv(BLOCK_Q, BLOCK_N) + 1 tiles
            acc, l_i, m_i = _attend_key_tile(acc, l_i, m_i, q, pos, k_base, v_base, bt_row, start, end, qk_scale,
                                             stride_kb, stride_kt, stride_kd, stride_vb, stride_vt, stride_vd,
                                             stride_btb, offs_n, offs_d, d_ok, window, BLOCK_SIZE=BLOCK_SIZE,
                                             CAUSAL=True, WINDOW=False, PAD_D=HEAD_DIM != HEAD_DIM_PAD,
                                             DOT_IEEE=DOT_IEEE)

    out = acc / l_i[:, None]
    o_rows = (q_start + tok.to(tl.int64)) * stride_ot + head * stride_oh
    tl.store(out_ptr + o_rows[:, None] + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


def _default_config(head_dim_pad: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) before fitting BLOCK_M to the group and the chunk lengths.

    sm_90, fp16/bf16, head_dim 128 (or 96 padded to 128): 128 x 64 tiles, 8 warps, 3 stages, the flash-attention
    forward's usual Hopper point (as vit_attention). The fp32 accumulator [128, 128] is 64 registers a thread
    over 8 warps and S/P [128, 64] another 32 (4 warps would need twice that and spill); the two warpgroups each
    own a 64-row slice of the tensor-core products; the software pipeline's buffers for the gathered K and V
    tiles (16 KB each) plus the Q tile take ~97 KB of shared memory; BLOCK_N 64 keeps the masked diagonal, and
    the work wasted past each row's position, small. With GQA packing 128 rows are 21 tokens x 6 heads
    (InternLM2-20B), 64 x 2 (Mini-2B) or 128 x 1 (Phi-3). ptxas (Triton 3.9, sm_90a, from
    tests/kernels/test_compile_sm90.py): 206 / 184 / 185 registers, no spills, 98816 B shared; with a sliding
    window (a third, window-edge key loop) 228 for InternLM2-20B and 208 for Phi-3, no spills, still one 8-warp
    block per SM (shared memory allows two, registers do not, as without a window). head_dim <= 64
    keeps the same point (128 registers; on 4 warps ptxas needs 250 of 255, too close to the cap to rely on
    across Triton versions).
    head_dim 256: 64 x 32 tiles, 8 warps, 2 stages (200 registers, no spills).
    fp32 (the engine runs fp32 only on CPU, through the reference): IEEE fp32 dots are FMA loops that hold
    whole operand tiles in registers; 64 x 32 tiles spill even on 8 warps, so 32 x 32 on 8 warps, unpipelined
    (200 registers, no spills). Correct, not fast.
    On CPU tensors (Triton's interpreter) each program costs a few numpy calls whatever its size, so large
    tiles run much faster; the arithmetic is the same online softmax."""
    if device.type == "cpu":
        return 128, 128, 4, 1
    if dtype == torch.float32:
        return 32, 32, 8, 1
    if head_dim_pad > 128:
        return 64, 32, 8, 2
    return 128, 64, 8, 3


def _launch_config(head_dim_pad: int, group: int, max_query_len: int, dtype: torch.dtype,
                   device: torch.device) -> tuple[int, int, int, int]:
    """The default config with BLOCK_M fitted: never more rows than max_query_len * group needs (short chunks,
    e.g. 2-token chunks of group 6 use a 16-row tile, on 4 warps below 64 rows), never fewer than one token's
    group of heads."""
    block_m, block_n, num_warps, num_stages = _default_config(head_dim_pad, dtype, device)
    fitted = min(block_m, max(16, triton.next_power_of_2(max(1, max_query_len) * group)))
    fitted = max(fitted, triton.next_power_of_2(group))
    if fitted < block_m and fitted < 64:
        num_warps = min(num_warps, 4)
    return fitted, block_n, num_warps, num_stages


def _check_inputs(q, k_cache, v_cache, block_tables, query_starts, query_lens, context_lens, max_query_len, out,
                  validate, sliding_window=None):
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, Integral)
                                       or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or an int >= 1; got {sliding_window!r}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                    ("query_starts", query_starts), ("query_lens", query_lens), ("context_lens", context_lens)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be [tokens, heads, head_dim] and k_cache [num_blocks, block_size, kv_heads, "
                         f"head_dim]; got {tuple(q.shape)} and {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, kd = k_cache.shape
    if kd != head_dim:
        raise ValueError(f"head_dim mismatch: q has {head_dim}, caches have {kd}")
    if head_dim == 0 or block_size == 0:
        raise ValueError(f"head_dim and block_size must be >= 1; got {head_dim}, {block_size}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"num_q_heads {num_q_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}; expected float16, bfloat16 or float32")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"dtype mismatch: q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")
    for name, t in (("block_tables", block_tables), ("query_starts", query_starts), ("query_lens", query_lens),
                    ("context_lens", context_lens)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32; got {t.dtype}")
    num_chunks = query_lens.shape[0] if query_lens.dim() == 1 else -1
    for name, t in (("query_starts", query_starts), ("query_lens", query_lens), ("context_lens", context_lens)):
        if t.dim() != 1 or t.shape[0] != num_chunks:
            raise ValueError(f"query_starts, query_lens and context_lens must be [num_chunks] with one length; "
                             f"got {name} {tuple(t.shape)} (query_lens {tuple(query_lens.shape)})")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_chunks:
        raise ValueError(f"block_tables must be [num_chunks={num_chunks}, max_blocks]; "
                         f"got {tuple(block_tables.shape)}")
    tensors = [q, k_cache, v_cache, block_tables, query_starts, query_lens, context_lens]
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype:
            raise ValueError(f"out must be a tensor of q's shape {tuple(q.shape)} and dtype {q.dtype}; got "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
                             f"{' ' + str(out.dtype) if isinstance(out, torch.Tensor) else ''}")
        tensors.append(out)
    if len({t.device for t in tensors}) != 1:
        raise ValueError("q, k_cache, v_cache, block_tables, query_starts, query_lens, context_lens (and out) "
                         "must be on one device")
    if max_query_len is not None and (isinstance(max_query_len, bool) or not isinstance(max_query_len, Integral)
                                      or max_query_len < 0):
        raise ValueError(f"max_query_len must be a host int >= 0; got {max_query_len!r}")
    if validate and num_chunks > 0:
        cap = block_tables.shape[1] * block_size
        starts, lens, ctx = query_starts.long(), query_lens.long(), context_lens.long()
        # The data-dependent checks, in one device-to-host read (a sync on GPU; validate=False skips it).
        lo_len, hi_len, over, lo_ctx, hi_ctx, lo_start, hi_end = torch.stack([
            lens.min(), lens.max(), (lens - ctx).max(), ctx.min(), ctx.max(), starts.min(), (starts + lens).max(),
        ]).tolist()
        if lo_len < 1:
            raise ValueError(f"query_lens must be >= 1; got min {lo_len}")
        if over > 0:
            raise ValueError(f"query_lens must be <= context_lens (the chunk's K/V are in the cache); a chunk has "
                             f"{over} more new tokens than context")
        if hi_ctx > cap:
            raise ValueError(f"context_lens must be <= max_blocks * block_size = {cap}; got max {hi_ctx}")
        if lo_start < 0 or hi_end > num_tokens:
            raise ValueError(f"chunk rows must lie in q's [0, {num_tokens}) rows; got query_starts min {lo_start}, "
                             f"max query_starts + query_lens {hi_end}")
        if max_query_len is not None and max_query_len < hi_len:
            raise ValueError(f"max_query_len {max_query_len} < max(query_lens) = {hi_len}")


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  query_starts: torch.Tensor, query_lens: torch.Tensor, context_lens: torch.Tensor,
                  max_query_len: int, scale: float | None = None, out: torch.Tensor | None = None,
                  validate: bool = True, sliding_window: int | None = None) -> torch.Tensor:
    """Causal prefill attention of several chunks over a paged KV cache -> [T, num_q_heads, head_dim].

    q [T, num_q_heads, head_dim] (any strides, e.g. the engine's transposed view of [heads, T, head_dim]);
    k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim] already holding the chunks' new K/V;
    block_tables [num_chunks, max_blocks], query_starts / query_lens / context_lens [num_chunks], all int32;
    max_query_len: host int >= max(query_lens), sizes the grid (the caller knows it: no device sync).
    scale defaults to head_dim ** -0.5. out: written in place (any strides; only the chunks' rows are touched)
    and returned; None allocates a contiguous zero-filled tensor (rows outside every chunk stay 0).
    validate=False skips the data-dependent range checks, the only ones that read tensor data (a host sync on
    GPU); then a max_query_len below the longest chunk leaves that chunk's last rows unwritten.
    sliding_window: None (causal over the whole context) or an int w >= 1: the query at position p attends to
    keys max(0, p - w + 1) ... p only.
    Chunks must not overlap in q's rows. See the module docstring for the exact semantics.
    """
    return _paged_prefill(q, k_cache, v_cache, block_tables, query_starts, query_lens, context_lens, max_query_len,
                          scale, out, validate, None, sliding_window)


def _paged_prefill(q, k_cache, v_cache, block_tables, query_starts, query_lens, context_lens, max_query_len,
                   scale, out, validate, config, sliding_window=None):
    """paged_prefill with an optional (BLOCK_M, BLOCK_N, num_warps, num_stages) override (tests, tuning)."""
    _check_inputs(q, k_cache, v_cache, block_tables, query_starts, query_lens, context_lens, max_query_len, out,
                  validate, sliding_window)
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    num_chunks = query_lens.shape[0]
    if out is None:
        out = torch.zeros((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_chunks == 0 or max_query_len == 0 or num_q_heads == 0:
        return out
    if num_kv_heads > _MAX_GRID_YZ:
        raise ValueError(f"at most {_MAX_GRID_YZ} KV heads supported; got {num_kv_heads}")
    scale = head_dim ** -0.5 if scale is None else float(scale)
    if sliding_window is not None and sliding_window >= block_tables.shape[1] * block_size:
        sliding_window = None  # longer than any context the table can hold: never binds
    has_window = sliding_window is not None

    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    if config is None:
        config = _launch_config(head_dim_pad, group, max_query_len, q.dtype, q.device)
    block_m, block_n, num_warps, num_stages = config
    for name, blk in (("BLOCK_M", block_m), ("BLOCK_N", block_n)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16; got {blk}")
    if block_m < group:
        raise ValueError(f"BLOCK_M {block_m} must hold a whole group of {group} query heads")
    block_q = block_m // group
    grid_x = triton.cdiv(max_query_len, block_q)
    for c0 in range(0, num_chunks, _MAX_GRID_YZ):  # gridDim.z limit: views of the per-chunk tensors
        c1 = min(num_chunks, c0 + _MAX_GRID_YZ)
        tables = block_tables[c0:c1]
        _paged_prefill_kernel[(grid_x, num_kv_heads, c1 - c0)](
            q, k_cache, v_cache, tables, query_starts[c0:c1], query_lens[c0:c1], context_lens[c0:c1], out,
            scale * math.log2(math.e), sliding_window if has_window else 0,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *tables.stride(), *out.stride(),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, GROUP=group, BLOCK_SIZE=block_size,
            BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, DOT_IEEE=q.dtype == torch.float32,
            HAS_WINDOW=has_window, num_warps=num_warps, num_stages=num_stages,
        )
    return out


def paged_prefill_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      query_starts: torch.Tensor, query_lens: torch.Tensor, context_lens: torch.Tensor,
                      scale: float | None = None, out: torch.Tensor | None = None,
                      max_score_elements: int = 1 << 24, sliding_window: int | None = None) -> torch.Tensor:
    """PyTorch reference (the engine's CPU path), in the input dtype, memory-bounded; same semantics and `out`
    contract as `paged_prefill` (no max_query_len: it reads the lengths on the host).

    Per chunk: gather its context K/V once ([1, kv_heads, L, d], no repeat over the group), then take its
    queries in blocks of `rows` tokens, each reshaped to [1, kv_heads, group * rows, d] (GQA as a bigger M, not
    as repeated K/V), through torch SDPA on 4-D tensors (its fused CPU/GPU kernels take only those) with a
    boolean causal-with-offset mask over the keys [0, last position of the block]. `rows` is chosen so the
    scores of one call, num_q_heads * rows * keys, stay <= max(max_score_elements, num_q_heads * L): a 10K-token
    prompt never materialises a 10K x 10K score matrix even when SDPA falls back to its math path.
    Why SDPA + mask rather than a blocked online softmax over keys: the fused SDPA kernels already block over
    keys in C++, so a Python loop over key tiles would only add launches; the row blocking bounds the memory
    of the unfused fallback, and each call is an ordinary softmax(QK^T)V in the input dtype.
    With a sliding window w each block of rows takes only the keys from its first row's window start,
    max(0, first position - w + 1), and the mask also drops keys <= position - w.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, query_starts, query_lens, context_lens, None, out, True,
                  sliding_window)
    if max_score_elements < 1:
        raise ValueError(f"max_score_elements must be >= 1; got {max_score_elements}")
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    if out is None:
        out = torch.zeros((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_q_heads == 0:
        return out
    starts, lens, contexts = (t.tolist() for t in (query_starts, query_lens, context_lens))
    for i, (start, count, total) in enumerate(zip(starts, lens, contexts)):
        blocks = block_tables[i, : -(-total // block_size)].long()
        keys = k_cache[blocks].flatten(0, 1)[:total].transpose(0, 1)[None]  # [1, kv_heads, L, d]
        values = v_cache[blocks].flatten(0, 1)[:total].transpose(0, 1)[None]
        prefix = total - count
        rows = max(1, max_score_elements // (num_q_heads * total))
        for j0 in range(0, count, rows):
            j1 = min(count, j0 + rows)
            m = j1 - j0
            last = prefix + j1  # keys [first, last) cover every query of the block
            first = 0 if sliding_window is None else max(0, prefix + j0 - sliding_window + 1)
            query = q[start + j0: start + j1].reshape(m, num_kv_heads, group, head_dim)
            query = query.permute(1, 2, 0, 3).reshape(1, num_kv_heads, group * m, head_dim)  # rows (head, token)
            pos = torch.arange(prefix + j0, prefix + j1, device=q.device)
            key_pos = torch.arange(first, last, device=q.device)
            mask = key_pos[None, :] <= pos[:, None]  # [m, last - first]
            if sliding_window is not None:
                mask &= key_pos[None, :] > pos[:, None] - sliding_window
            mask = mask.repeat(group, 1)[None, None]  # [1, 1, group * m, last - first]
            o = F.scaled_dot_product_attention(query, keys[:, :, first:last], values[:, :, first:last],
                                               attn_mask=mask, scale=scale)  # [1, kv_heads, group * m, d]
            out[start + j0: start + j1] = o.reshape(num_kv_heads, group, m, head_dim).permute(2, 0, 1, 3) \
                .reshape(m, num_q_heads, head_dim)
    return out
