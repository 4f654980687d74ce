"""Fused layer-scaled residual add + LayerNorm kernel vs F.layer_norm after the torch add, interpreter on CPU."""
from __future__ import annotations

import pytest
import torch

from internvl_engine.kernels.layer_norm import layer_norm, layer_norm_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# No tl.dot here, so bf16 runs under the interpreter too (its fp32->bf16 casts truncate: ULP slack below).
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float16: 2.0**-10, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7}
EPS = 1e-6


def make(rows, n, dtype, seed=0, residual=True, scale=True, bias=True, offset=3.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, n, generator=gen) * 2.0 + offset).to(dtype).to(DEVICE)
    w = (1.0 + 0.3 * torch.randn(n, generator=gen)).to(dtype).to(DEVICE)
    b = (0.2 * torch.randn(n, generator=gen)).to(dtype).to(DEVICE) if bias else None
    r = (torch.randn(rows, n, generator=gen) * 3.0 - 1.0).to(dtype).to(DEVICE) if residual else None
    s = (0.5 * torch.randn(n, generator=gen)).to(dtype).to(DEVICE) if scale and residual else None
    return x, w, b, r, s


def check(x, w, b, r=None, s=None, **kwargs):
    """|kernel - ref_hi| <= 2 |torch - ref_hi| + two ulps of the largest output; h exactly torch's sum."""
    got = layer_norm(x, w, b, EPS, r, s, **kwargs)
    want = layer_norm_ref(x, w, b, EPS, r, s)
    out, ref = (got[0], want[0]) if r is not None else (got, want)
    base = x
    if r is not None:
        h, base = got[1], want[1]
        assert h.shape == x.shape and h.dtype == x.dtype
        if x.dtype == torch.bfloat16:  # truncating casts: an ulp of each term (x * s, then the sum)
            terms = r.double().abs() + (x.double() * (s.double() if s is not None else 1.0)).abs()
            assert ((h.double() - base.double()).abs() <= 2 * ULP[x.dtype] * terms).all()
        else:
            assert torch.equal(h, base)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    ref_hi = layer_norm_ref(base.double(), w.double(), None if b is None else b.double(), EPS)
    err_kernel = (out.double() - ref_hi).abs().max().item()
    err_torch = (ref.double() - ref_hi).abs().max().item()
    slack = 2 * ULP[x.dtype] * ref_hi.abs().max().item() + 1e-6
    assert err_kernel <= 2 * err_torch + slack, (err_kernel, err_torch, slack)
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 113, 1023, 1025])
@pytest.mark.parametrize("n", [96, 200])
def test_plain_norm(rows, n, dtype):
    x, w, b, _, _ = make(rows, n, dtype, seed=rows + n, residual=False)
    check(x, w, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 113, 1025])
@pytest.mark.parametrize("n", [96, 200])
@pytest.mark.parametrize("scale", [False, True], ids=["residual", "layer-scale"])
def test_residual_add(rows, n, dtype, scale):
    x, w, b, r, s = make(rows, n, dtype, seed=rows * n, scale=scale)
    x0, r0 = x.clone(), r.clone()
    check(x, w, b, r, s)
    assert torch.equal(x, x0) and torch.equal(r, r0)  # inputs untouched without residual_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("n", [96, 200])
@pytest.mark.parametrize("residual", [False, True])
def test_looped_path(n, dtype, residual):
    # block_n below n: the Chan-merged two-pass loop that rows wider than 8192 take, ragged last slice.
    x, w, b, r, s = make(13, n, dtype, seed=n, residual=residual)
    check(x, w, b, r, s, block_n=32)


@pytest.mark.parametrize("block_n", [None, 32])
def test_residual_updated_in_place(block_n):
    x, w, b, r, s = make(13, 200, torch.float32, seed=5)
    out_ref, h_ref = layer_norm_ref(x, w, b, EPS, r, s)
    stream = r.clone()
    out, h = layer_norm(x, w, b, EPS, stream, s, residual_out=stream, block_n=block_n)
    assert h is stream and torch.equal(stream, h_ref)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)


def test_no_bias_large_offset_and_vit_layout():
    # A large common offset (no E[x^2] - E[x]^2 cancellation), and [tiles, 1025, C] activations with a bias-less norm.
    x, w, _, _, _ = make(17, 200, torch.float32, residual=False, bias=False, offset=1e3)
    check(x, w, None)
    x, w, _, _, _ = make(2 * 1025, 64, torch.float16, seed=9, residual=False, bias=False)
    check(x.view(2, 1025, 64), w, None)


def test_matches_torch_module():
    norm = torch.nn.LayerNorm(200, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.3 * torch.randn(200))
        norm.bias.copy_(0.2 * torch.randn(200))
    norm = norm.half()
    x = torch.randn(3, 7, 200, device=DEVICE, dtype=torch.float16)
    torch.testing.assert_close(layer_norm(x, norm.weight, norm.bias, norm.eps), norm(x), atol=2e-3, rtol=2e-3)


def test_empty_and_bad_inputs():
    w = torch.ones(96, device=DEVICE)
    assert layer_norm(torch.empty(0, 96, device=DEVICE), w, w, EPS).shape == (0, 96)
    x = torch.randn(3, 96, device=DEVICE)
    with pytest.raises(ValueError, match="bias"):
        layer_norm(x, w, torch.ones(95, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="layer_scale"):
        layer_norm(x, w, w, EPS, layer_scale=w)
    with pytest.raises(ValueError, match="residual_out"):
        layer_norm(x, w, w, EPS, x.clone(), residual_out=torch.empty(3, 96, 2, device=DEVICE)[..., 0])
