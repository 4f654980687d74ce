"""Fused residual-add + RMSNorm kernel vs its reference (the model's RMSNorm op order), interpreter on CPU."""
from __future__ import annotations

import pytest
import torch

from internvl_engine.kernels.rms_norm import rms_norm, rms_norm_ref
from internvl_engine.models.layers import RMSNorm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# No tl.dot here, so bf16 runs under the interpreter too; its fp32->bf16 casts truncate instead of rounding, so
# each of the kernel's two roundings may be one ulp off where torch is half of one: ULP slack below.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float16: 2.0**-10, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7}
EPS = 1e-6


def make(rows, n, dtype, seed=0, scale=True, residual=True, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, n, generator=gen) * 2.0 + offset).to(dtype).to(DEVICE)
    w = (1.0 + 0.3 * torch.randn(n, generator=gen)).to(dtype).to(DEVICE)
    r = (torch.randn(rows, n, generator=gen) * 3.0).to(dtype).to(DEVICE) if residual else None
    s = (0.5 * torch.randn(n, generator=gen)).to(dtype).to(DEVICE) if scale else None
    return x, w, r, s


def check(x, w, r=None, s=None, **kwargs):
    """|kernel - ref_hi| <= 2 |torch - ref_hi| + two ulps of the largest output; h exactly torch's sum."""
    got = rms_norm(x, w, EPS, r, s, **kwargs)
    want = rms_norm_ref(x, w, EPS, r, s)
    out, ref = (got[0], want[0]) if r is not None else (got, want)
    if r is not None:
        h, ref_h = got[1], want[1]
        assert h.shape == x.shape and h.dtype == x.dtype
        if x.dtype == torch.bfloat16:  # truncating casts: an ulp of each term (x * s, then the sum)
            terms = r.double().abs() + (x.double() * (s.double() if s is not None else 1.0)).abs()
            assert ((h.double() - ref_h.double()).abs() <= 2 * ULP[x.dtype] * terms).all()
        else:
            assert torch.equal(h, ref_h)
        base = ref_h  # the fp32 reference normalises the same (rounded) residual stream
    else:
        base = x
    assert out.shape == x.shape and out.dtype == torch.promote_types(w.dtype, x.dtype) and out.is_contiguous()
    ref_hi = rms_norm_ref(base.double(), w.double(), EPS)
    err_kernel = (out.double() - ref_hi).abs().max().item()
    err_torch = (ref.double() - ref_hi).abs().max().item()
    slack = 2 * ULP[out.dtype] * ref_hi.abs().max().item() + 1e-7
    assert err_kernel <= 2 * err_torch + slack, (err_kernel, err_torch, slack)
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 113, 1023, 1025])
@pytest.mark.parametrize("n", [96, 200])
def test_plain_norm(rows, n, dtype):
    x, w, _, _ = make(rows, n, dtype, seed=rows + n, residual=False, scale=False)
    check(x, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 113, 1025])
@pytest.mark.parametrize("n", [96, 200])
@pytest.mark.parametrize("scale", [False, True], ids=["residual", "layer-scale"])
def test_residual_add(rows, n, dtype, scale):
    x, w, r, s = make(rows, n, dtype, seed=rows * n, scale=scale)
    x0, r0 = x.clone(), r.clone()
    check(x, w, r, s)
    assert torch.equal(x, x0) and torch.equal(r, r0)  # inputs untouched without residual_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("n", [96, 200])
@pytest.mark.parametrize("residual", [False, True])
def test_looped_path(n, dtype, residual):
    # block_n below n: the two-pass loop that rows wider than 8192 take, with a ragged last slice.
    x, w, r, s = make(13, n, dtype, seed=n, residual=residual, scale=residual)
    check(x, w, r, s, block_n=32)


@pytest.mark.parametrize("block_n", [None, 32])
def test_residual_updated_in_place(block_n):
    x, w, r, s = make(13, 200, torch.float32, seed=3)
    out_ref, h_ref = rms_norm_ref(x, w, EPS, r, s)
    stream = r.clone()
    out, h = rms_norm(x, w, EPS, stream, s, residual_out=stream, block_n=block_n)
    assert h is stream and torch.equal(stream, h_ref)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)


def test_strided_rows_and_leading_dims():
    # InternViT's q_norm input: q is a strided view of the packed qkv [tiles, tokens, 3, C].
    tiles, tokens, c = 2, 65, 96
    qkv = torch.randn(tiles, tokens, 3 * c, device=DEVICE).reshape(tiles, tokens, 3, c)
    q, k, _ = qkv.unbind(2)
    w = 1.0 + 0.3 * torch.randn(c, device=DEVICE)
    for t in (q, k):
        out = check(t, w)
        assert out.shape == (tiles, tokens, c)
    r = torch.randn(tiles, tokens, c, device=DEVICE)
    check(q, w, r)


def test_matches_model_module():
    norm = RMSNorm(200, 1e-5).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.3 * torch.randn(200))
    x = torch.randn(3, 7, 200, device=DEVICE, dtype=torch.float16)
    norm = norm.half()
    torch.testing.assert_close(rms_norm(x, norm.weight, norm.eps), norm(x), atol=2e-3, rtol=2e-3)


def test_fp32_weight_promotes_like_torch():
    x, _, _, _ = make(5, 96, torch.float16, residual=False, scale=False)
    w = 1.0 + 0.3 * torch.randn(96, device=DEVICE)
    out = rms_norm(x, w, EPS)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, rms_norm_ref(x, w, EPS), atol=1e-5, rtol=1e-5)


def test_large_offset_and_zero_rows():
    x, w, _, _ = make(17, 200, torch.float32, residual=False, scale=False, offset=1e3)
    check(x, w)
    zeros = torch.zeros(4, 96, device=DEVICE)
    out = rms_norm(zeros, torch.ones(96, device=DEVICE), EPS)
    assert torch.equal(out, zeros)  # rsqrt(0 + eps) * 0


def test_empty_and_bad_inputs():
    w = torch.ones(96, device=DEVICE)
    assert rms_norm(torch.empty(0, 96, device=DEVICE), w, EPS).shape == (0, 96)
    out, h = rms_norm(torch.empty(0, 96, device=DEVICE), w, EPS, torch.empty(0, 96, device=DEVICE))
    assert out.shape == h.shape == (0, 96)
    x = torch.randn(3, 96, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(95, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="layer_scale"):
        rms_norm(x, w, EPS, layer_scale=w)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, w, EPS, torch.randn(3, 95, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        rms_norm(x.double(), w, EPS)
    with pytest.raises(ValueError, match="block_n"):
        rms_norm(x, w, EPS, block_n=48)
