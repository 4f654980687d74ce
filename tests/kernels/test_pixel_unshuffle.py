"""Fused pixel (un)shuffle + LayerNorm(4C) kernel vs the PyTorch projector path (interpreter on CPU)."""
from __future__ import annotations

import pytest
import torch

from internvl_engine.kernels.pixel_unshuffle import pixel_unshuffle_layernorm, pixel_unshuffle_layernorm_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# No tl.dot in this kernel, so bf16 is exact to load under the interpreter and runs everywhere.
DTYPES = [torch.float16, torch.float32, torch.bfloat16]
# One unit in the last place relative to magnitude: the interpreter's fp32->bf16 cast truncates instead of
# rounding, so a store may be off by one ulp where torch is off by half of one.
ULP = {torch.float16: 2.0**-10, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7}


def make_inputs(tiles, seq, c, dtype, seed=0, offset=3.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(tiles, seq, c, generator=gen) * 2.0 + offset).to(dtype)
    w = (1.0 + 0.2 * torch.randn(4 * c, generator=gen)).to(dtype)
    b = (0.1 * torch.randn(4 * c, generator=gen)).to(dtype)
    return x.to(DEVICE), w.to(DEVICE), b.to(DEVICE)


def check(x, w, b, version, **kwargs):
    """Error rule: |kernel - ref_hi| <= 2 |torch_lowp - ref_hi| + one ulp of the largest output."""
    out = pixel_unshuffle_layernorm(x, w, b, 1e-5, version, **kwargs)
    tiles, seq, c = x.shape
    n_out = ((int(round((seq - 1) ** 0.5))) // 2) ** 2
    assert out.shape == (tiles, n_out, 4 * c)
    assert out.dtype == x.dtype and out.is_contiguous()
    ref_lowp = pixel_unshuffle_layernorm_ref(x, w, b, 1e-5, version)
    # The "fp32 reference" is taken in float64 so that it also measures the fp32 cases (torch's fp32 result
    # would otherwise be the reference itself, with zero error).
    ref_hi = pixel_unshuffle_layernorm_ref(x.double(), w.double(), b.double(), 1e-5, version)
    err_kernel = (out.double() - ref_hi).abs().max().item()
    err_torch = (ref_lowp.double() - ref_hi).abs().max().item()
    small_atol = ULP[x.dtype] * ref_hi.abs().max().item() + 1e-6
    assert err_kernel <= 2 * err_torch + small_atol, (err_kernel, err_torch, small_atol)
    # Direct comparison with the same-precision reference: within about one ulp plus both rounding errors.
    torch.testing.assert_close(out, ref_lowp, atol=3 * err_torch + 2 * small_atol, rtol=2 * ULP[x.dtype])
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# side 8, 4 and 6 (odd half-side 3: 27 tokens, so a program's rows straddle tiles and the last one is partial).
@pytest.mark.parametrize("tiles,seq", [(1, 65), (3, 17), (3, 37)])
@pytest.mark.parametrize("c", [8, 16, 24, 64])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_matches_reference(version, c, tiles, seq, dtype):
    x, w, b = make_inputs(tiles, seq, c, dtype, seed=c + tiles)
    check(x, w, b, version)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_full_448px_grid(version):
    # The real 1025-token layout (32x32 grid -> 256 tokens) with a small width.
    x, w, b = make_inputs(2, 1025, 8, torch.float16, seed=7)
    check(x, w, b, version)


def test_versions_differ_by_spatial_transpose():
    x, w, b = make_inputs(1, 65, 8, torch.float32, seed=3)
    v1 = pixel_unshuffle_layernorm(x, w, b, ps_version="v1").reshape(1, 4, 4, 32)
    v2 = pixel_unshuffle_layernorm(x, w, b, ps_version="v2").reshape(1, 4, 4, 32)
    assert not torch.equal(v1, v2)
    torch.testing.assert_close(v1.transpose(1, 2), v2, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    c, seq = 24, 17
    big, _, _ = make_inputs(6, seq + 3, c + 8, dtype, seed=11)
    _, w, b = make_inputs(1, seq, c, dtype, seed=13)
    # Every other tile, tokens with a padded row pitch: strides (2 * 20 * 32, 32, 1).
    x = big[::2, 2:2 + seq, :c]
    assert x.stride() == (2 * (seq + 3) * (c + 8), c + 8, 1)
    check(x, w, b, "v1")
    # Plain dim-0 slice of a longer sequence buffer: tile stride larger than seq * C.
    big2, _, _ = make_inputs(3, seq + 5, c, dtype, seed=12)
    x2 = big2[1:, :seq]
    assert x2.stride(0) > seq * c
    check(x2, w, b, "v2")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c,block_c", [(24, 8), (20, 8), (64, 16)])
def test_looped_path(c, block_c, dtype):
    # The path taken for C > 4096 (chunked Chan/Welford statistics, second read to normalise), forced on
    # small widths; a large mean offset checks that the statistics do not cancel catastrophically.
    x, w, b = make_inputs(2, 17, c, dtype, seed=c, offset=50.0)
    check(x, w, b, "v1", block_c=block_c)
    check(x, w, b, "v2", block_c=block_c)


def test_empty_tiles():
    x, w, b = make_inputs(0, 17, 8, torch.float32)
    assert pixel_unshuffle_layernorm(x, w, b).shape == (0, 4, 32)


def test_validation_errors():
    x, w, b = make_inputs(1, 17, 8, torch.float32)
    with pytest.raises(ValueError, match="even side"):
        pixel_unshuffle_layernorm(make_inputs(1, 10, 8, torch.float32)[0], w, b)  # side 3 (odd)
    with pytest.raises(ValueError, match="even side"):
        pixel_unshuffle_layernorm(make_inputs(1, 16, 8, torch.float32)[0], w, b)  # 15 patches: not a square
    with pytest.raises(ValueError, match="weight must have shape"):
        pixel_unshuffle_layernorm(x, w[:16], b)
    with pytest.raises(ValueError, match="bias must have shape"):
        pixel_unshuffle_layernorm(x, w, torch.zeros(33, device=DEVICE))
    with pytest.raises(ValueError, match="ps_version"):
        pixel_unshuffle_layernorm(x, w, b, ps_version="v3")
    with pytest.raises(ValueError, match="last dim must be contiguous"):
        pixel_unshuffle_layernorm(make_inputs(1, 17, 16, torch.float32)[0][:, :, ::2], w, b)
    with pytest.raises(ValueError, match=r"\[tiles, seq, C\]"):
        pixel_unshuffle_layernorm(x[0], w, b)
    with pytest.raises(ValueError, match="block_c"):
        pixel_unshuffle_layernorm(x, w, b, block_c=12)
