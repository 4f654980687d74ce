"""silu(gate) * up kernel on a gate_up GEMM output vs the models' torch ops, interpreter on CPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from internvl_engine.kernels.silu_mul import silu_mul, silu_mul_pair, silu_mul_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# No tl.dot here, so bf16 runs under the interpreter too (its fp32->bf16 casts truncate: ULP slack below).
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float16: 2.0**-10, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7}


def make(rows, width, dtype, seed=0, spread=3.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 2 * width, generator=gen) * spread).to(dtype).to(DEVICE)


def check(out, gate_up):
    """|kernel - ref_hi| <= 2 |torch - ref_hi| + two ulps of each output, elementwise (a pointwise op)."""
    ref = silu_mul_ref(gate_up)
    assert out.shape == ref.shape and out.dtype == gate_up.dtype and out.is_contiguous()
    ref_hi = silu_mul_ref(gate_up.double())
    err_kernel = (out.double() - ref_hi).abs()
    err_torch = (ref.double() - ref_hi).abs()
    slack = 2 * ULP[gate_up.dtype] * ref_hi.abs() + 1e-30
    assert (err_kernel <= 2 * err_torch + slack).all(), (err_kernel.max().item(), err_torch.max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 113, 1023, 1025])
@pytest.mark.parametrize("width", [96, 200])
def test_matches_reference(rows, width, dtype):
    gate_up = make(rows, width, dtype, seed=rows + width)
    check(silu_mul(gate_up), gate_up)


@pytest.mark.parametrize("width,block", [(200, 64), (1000, 256), (2500, 1024)])
def test_column_blocks(width, block):
    # Several column blocks per row, a ragged last one; 2500 > 1024: the real models' layout (one row per program).
    gate_up = make(7, width, torch.float16, seed=width)
    check(silu_mul(gate_up, block=block), gate_up)
    check(silu_mul(gate_up), gate_up)


def test_leading_dims_and_strided_rows():
    # [batch, seq, 2I] as the MLP gets it, and a row-strided view (a padded row pitch).
    gate_up = make(2 * 37, 96, torch.float32, seed=1).view(2, 37, 192)
    out = silu_mul(gate_up)
    assert out.shape == (2, 37, 96)
    check(out, gate_up)
    padded = make(37, 120, torch.float16, seed=2)[:, :192]
    check(silu_mul(padded), padded)


def test_pair_matches_concatenated():
    # InternLM2's int8 path: w1 and w3 outputs as two tensors (here strided views of one buffer).
    gate_up = make(113, 200, torch.float16, seed=4)
    gate, up = gate_up[:, :200], gate_up[:, 200:]
    assert torch.equal(silu_mul_pair(gate, up), silu_mul(gate_up))
    assert torch.equal(silu_mul_pair(gate.contiguous(), up.contiguous()), silu_mul(gate_up))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy exp
def test_extreme_gates():
    # silu(-inf side) -> -0, silu(large) -> gate: no inf / nan from exp overflow.
    gate = torch.tensor([[-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4, 3.0]], device=DEVICE)
    up = torch.full_like(gate, 2.0)
    out = silu_mul(torch.cat([gate, up], dim=-1))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, F.silu(gate) * up, atol=1e-6, rtol=1e-6)


def test_empty_and_bad_inputs():
    assert silu_mul(torch.empty(0, 8, device=DEVICE)).shape == (0, 4)
    assert silu_mul(torch.empty(3, 0, device=DEVICE)).shape == (3, 0)
    with pytest.raises(ValueError, match="even"):
        silu_mul(torch.randn(3, 7, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        silu_mul(torch.randn(3, 8, device=DEVICE, dtype=torch.float64))
    with pytest.raises(ValueError, match="differ"):
        silu_mul_pair(torch.randn(3, 4, device=DEVICE), torch.randn(3, 5, device=DEVICE))
