"""vit_attention (Triton flash-attention forward, non-causal) against SDPA: ragged sequence tails, odd head counts,
the model's strided q/k/v views of a packed qkv projection, and the [tiles, seq, heads, head_dim] output memory."""
from __future__ import annotations

import pytest
import torch

from internvl_engine.kernels.vit_attention import _vit_attention, vit_attention, vit_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter's bf16 x bf16 tl.dot is wrong, so bf16 runs only on a GPU.
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if torch.cuda.is_available() else [])
SMALL_ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def model_qkv(tiles, heads, seq, head_dim, dtype, seed=0, amplitude=1.0):
    """q, k, v exactly as InternViT makes them: strided [tiles, heads, seq, head_dim] views of one packed tensor."""
    gen = torch.Generator().manual_seed(seed)
    width = heads * head_dim
    qkv = (torch.randn(tiles, seq, 3 * width, generator=gen) * amplitude).to(device=DEVICE, dtype=dtype)
    q, k, v = qkv.reshape(tiles, seq, 3, width).unbind(2)
    return tuple(t.reshape(tiles, seq, heads, head_dim).transpose(1, 2) for t in (q, k, v))


def check(q, k, v, scale=None, **kw):
    out = vit_attention(q, k, v, scale, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    ref_lowp = vit_attention_ref(q, k, v, scale)
    ref32 = vit_attention_ref(q.float(), k.float(), v.float(), scale)
    assert torch.isfinite(out).all()
    err_kernel = (out.float() - ref32).abs().max().item()
    err_torch = (ref_lowp.float() - ref32).abs().max().item()
    assert err_kernel <= 2 * err_torch + SMALL_ATOL[q.dtype], (err_kernel, err_torch)
    return out


@pytest.mark.slow  # ~2 s alone under the interpreter, over 3 s on a busy 2-core machine
def test_seq_1025_fp16():
    # 1025 = class token + 32 x 32 patches: a one-row query block and a one-key tail block.
    q, k, v = model_qkv(1, 2, 1025, 32, torch.float16)
    check(q, k, v)


def test_seq_1025_fp32_ieee_dots_large_blocks():
    # fp32 must stay fp32-accurate (IEEE dots, not TF32); larger blocks keep the interpreter quick.
    q, k, v = model_qkv(1, 2, 1025, 16, torch.float32, seed=1)
    check(q, k, v, block_m=128, block_n=128)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiles,heads,seq,head_dim", [
    (1, 1, 1, 16),     # a single token: softmax of one key
    (3, 3, 113, 16),   # ragged: one full key block + tail
    (1, 5, 64, 32),    # exactly one block: no tail
    (3, 5, 113, 32),
    (1, 3, 65, 64),    # InternViT-300M head_dim
    (2, 1, 33, 128),   # InternViT-6B head_dim
    (1, 25, 33, 16),   # InternViT-6B head count (25: odd, not a power of two)
])
def test_matches_sdpa(tiles, heads, seq, head_dim, dtype):
    q, k, v = model_qkv(tiles, heads, seq, head_dim, dtype, seed=seq + heads)
    check(q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_blocks_many_key_blocks(dtype):
    # 16 x 16 blocks: 7 query blocks and 7 key blocks (6 full + a 1-key tail) with a peaky softmax (scale 1),
    # so the running max changes between key blocks and the rescaling is exercised.
    q, k, v = model_qkv(1, 3, 97, 16, dtype, seed=2)
    check(q, k, v, scale=1.0, block_m=16, block_n=16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_custom_scale(dtype):
    q, k, v = model_qkv(1, 3, 113, 32, dtype, seed=3)
    check(q, k, v, scale=0.05)


def test_contiguous_inputs():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(3, 5, 50, 32, generator=gen).to(DEVICE, torch.float16) for _ in range(3))
    check(q, k, v)


def test_output_layout_makes_merge_free():
    tiles, heads, seq, head_dim = 3, 5, 40, 16
    q, k, v = model_qkv(tiles, heads, seq, head_dim, torch.float16)
    out = vit_attention(q, k, v)
    assert out.shape == (tiles, heads, seq, head_dim)
    assert out.transpose(1, 2).is_contiguous()
    merged = out.transpose(1, 2).reshape(tiles, seq, heads * head_dim)
    assert merged._base is not None and merged.data_ptr() == out.data_ptr()  # a view, not a copy
    expected = vit_attention_ref(q, k, v).transpose(1, 2).reshape(tiles, seq, heads * head_dim)
    assert (merged.float() - expected.float()).abs().max().item() < 2e-3


def test_grid_split_over_tiles():
    # More tiles * heads than one launch's grid-y allows: the wrapper launches per chunk of tiles.
    q, k, v = model_qkv(3, 3, 40, 16, torch.float16, seed=5)
    out = _vit_attention(q, k, v, None, None, None, None, None, max_grid_y=4)
    assert torch.equal(out, vit_attention(q, k, v))


def test_empty_batch():
    q, k, v = model_qkv(0, 3, 40, 16, torch.float16)
    assert vit_attention(q, k, v).shape == (0, 3, 40, 16)


def test_validation_errors():
    q, k, v = model_qkv(1, 2, 20, 16, torch.float16)
    with pytest.raises(ValueError, match="shapes differ"):
        vit_attention(q, k[:, :, :10], v)
    with pytest.raises(ValueError, match="shapes differ"):
        vit_attention(q, k, v[:, :1])
    with pytest.raises(ValueError, match=r"\[tiles, heads, seq, head_dim\]"):
        vit_attention(q[0], k[0], v[0])
    for bad_dim in (24, 8):
        t = torch.zeros(1, 2, 20, bad_dim, dtype=torch.float16, device=DEVICE)
        with pytest.raises(ValueError, match="power of two"):
            vit_attention(t, t, t)
    t = torch.zeros(1, 2, 20, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="unsupported dtype"):
        vit_attention(t, t, t)
    with pytest.raises(ValueError, match="dtypes differ"):
        vit_attention(q, k.float(), v)
    with pytest.raises(ValueError, match="different devices"):
        vit_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="block_n"):
        vit_attention(q, k, v, block_n=48)
    with pytest.raises(ValueError, match="heads"):
        _vit_attention(q, k, v, None, None, None, None, None, max_grid_y=1)
