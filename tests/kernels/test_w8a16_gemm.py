"""Weight-only int8 GEMM (bitsandbytes int8 layout) vs a dense float64 reference and its PyTorch reference (Triton
interpreter on CPU, real kernel on CUDA): both launch paths (GEMV / split-K and tiled), awkward shapes, bias,
zero rows, int8 extremes, strided inputs, validation."""
from __future__ import annotations

import pytest
import torch

from internvl_engine.kernels import w8a16_gemm as mod
from internvl_engine.kernels.w8a16_gemm import (LaunchConfig, _w8a16_linear, choose_split_k, w8a16_linear,
                                                w8a16_linear_ref)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter's bf16 x bf16 tl.dot is wrong, so bf16 runs only on the real compiler.
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if torch.cuda.is_available() else [])
SMALL_ATOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 2e-6}  # relative to max |out|


def make_case(lead, K, N, dtype, bias=False, seed=0, scb_zero_rows=(), extremes=False):
    """x [*lead, K] ~ N(0, 1), weight int8 [N, K] uniform in [-127, 127] (with `extremes`: only -128, -127 and 127),
    SCB ~ U(0.5, 2) (exactly 0 on `scb_zero_rows`), bias ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=gen)
    if extremes:
        choice = torch.randint(0, 3, (N, K), generator=gen)
        weight = torch.tensor([-128, -127, 127], dtype=torch.int8)[choice]
    else:
        weight = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
    scb = torch.rand(N, generator=gen) * 1.5 + 0.5
    scb[list(scb_zero_rows)] = 0.0
    b = torch.randn(N, generator=gen).to(dtype).to(DEVICE) if bias else None
    return x.to(dtype).to(DEVICE), weight.to(DEVICE), scb.to(DEVICE), b


def dense_reference(x, weight, scb, bias=None):
    """Obviously correct, float64: W = weight * SCB / 127, out = x @ W^T + bias."""
    w = weight.double() * scb.double()[:, None] / 127
    out = x.double() @ w.T
    return out if bias is None else out + bias.double()


def check(x, weight, scb, bias=None, **kwargs):
    """Error rule: |kernel - ref64| <= 2 |torch_lowp - ref64| + small_atol * max|ref64|, ref64 the dense float64
    reference and torch_lowp w8a16_linear_ref in x's dtype."""
    out = _w8a16_linear(x, weight, scb, bias, **kwargs)
    assert out.shape == (*x.shape[:-1], weight.shape[0]) and out.dtype == x.dtype and out.is_contiguous()
    ref64 = dense_reference(x, weight, scb, bias)
    ref_lowp = w8a16_linear_ref(x, weight, scb, bias)
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    err_kernel = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    err_torch = (ref_lowp.double() - ref64).abs().max().item() if out.numel() else 0.0
    assert torch.isfinite(out).all()
    assert err_kernel <= 2 * err_torch + SMALL_ATOL[x.dtype] * scale, (err_kernel, err_torch, scale)
    return out


# Small tiles (many K iterations with a ragged tail, several row / column blocks) for both paths.
SMALL_GEMV = LaunchConfig(16, 32, 32, 4, 2, 4, False)
SMALL_TILED = LaunchConfig(16, 32, 32, 4, 2, 1, True)
SMALL_TILED_NOSWAP = LaunchConfig(32, 16, 64, 4, 2, 1, False)

# (leading dims of x, K, N, bias, path, config, split_k)
CASES = [
    pytest.param((1,), 100, 61, True, None, None, None, id="M1-K100-N61-bias-auto"),
    pytest.param((7,), 257, 129, False, "gemv", None, 2, id="M7-K257-N129-gemv-split2"),
    pytest.param((7,), 257, 129, True, "gemv", None, 3, id="M7-K257-N129-bias-gemv-split3"),
    pytest.param((16,), 257, 61, False, None, None, None, id="M16-gemv-boundary"),
    pytest.param((17,), 100, 61, True, None, None, None, id="M17-tiled-boundary"),
    pytest.param((113,), 257, 129, True, None, None, None, id="M113-K257-N129-bias-tiled"),
    pytest.param((113,), 257, 129, False, "tiled", None, 3, id="M113-tiled-split3"),
    pytest.param((1,), 257, 129, True, "tiled", None, None, id="M1-tiled-forced"),
    pytest.param((2, 3), 100, 61, True, "gemv", None, None, id="3d-gemv"),
    pytest.param((3, 41), 100, 129, False, "tiled", None, None, id="3d-tiled"),
    pytest.param((5,), 257, 129, True, "gemv", SMALL_GEMV, 4, id="gemv-small-tiles-split4"),
    pytest.param((113,), 257, 61, True, "tiled", SMALL_TILED, None, id="tiled-small-tiles"),
    pytest.param((113,), 257, 61, False, "tiled", SMALL_TILED_NOSWAP, 2, id="tiled-small-tiles-noswap-split2"),
    pytest.param((9,), 256, 64, False, "gemv", None, None, id="even-K-and-N"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,K,N,bias,path,config,split_k", CASES)
def test_matches_reference(lead, K, N, bias, path, config, split_k, dtype):
    x, weight, scb, b = make_case(lead, K, N, dtype, bias=bias)
    check(x, weight, scb, b, path=path, config=config, split_k=split_k)


def test_public_api_is_the_default_path():
    x, weight, scb, b = make_case((2, 5), 100, 61, torch.float16, bias=True, seed=1)
    assert torch.equal(w8a16_linear(x, weight, scb, b), _w8a16_linear(x, weight, scb, b))
    assert torch.equal(w8a16_linear(x, weight, scb), _w8a16_linear(x, weight, scb, None))


def test_grouped_order_partial_group():
    """19 row blocks (GROUP_M 8: groups of 8, 8 and 3) x 5 column blocks: every output tile is written once."""
    x, weight, scb, b = make_case((300,), 100, 129, torch.float32, bias=True, seed=2)
    check(x, weight, scb, b, path="tiled", config=LaunchConfig(16, 32, 64, 4, 2, 1, True))


def test_path_choice(monkeypatch):
    """M <= GEMV_MAX_M (16) takes the GEMV configuration, larger M the tiled one."""
    seen = []
    gemv, tiled = mod._gemv_config, mod._tiled_config
    monkeypatch.setattr(mod, "_gemv_config", lambda *a: seen.append("gemv") or gemv(*a))
    monkeypatch.setattr(mod, "_tiled_config", lambda *a: seen.append("tiled") or tiled(*a))
    for m in (1, 16, 17):
        x, weight, scb, _ = make_case((m,), 40, 24, torch.float32, seed=m)
        check(x, weight, scb)
    assert seen == ["gemv", "gemv", "tiled"] and mod.GEMV_MAX_M == 16
    with pytest.raises(ValueError, match="gemv path takes M <= "):
        _w8a16_linear(*make_case((17,), 40, 24, torch.float32)[:3], path="gemv")
    with pytest.raises(ValueError, match="path must be"):
        _w8a16_linear(*make_case((1,), 40, 24, torch.float32)[:3], path="dense")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["gemv", "tiled"])
def test_identity_input_reproduces_dequantised_weight(path, dtype):
    """x = I (M = K = 16): out[k, n] = W[n, k] bit for bit, kernel and (CPU) reference alike, with int8 extremes
    (-128, -127, 127 and 0) and zero rows: the kernel's acc is weight[n, k] exactly, so acc * SCB / 127 (IEEE
    division) in fp32 is the reference's fp32 dequantisation, and one rounding to x's dtype is its cast. The
    expected values come from the CPU, whose division by 127 is IEEE (torch on CUDA multiplies by 1/127)."""
    K, N = 16, 37
    _, weight, scb, _ = make_case((1,), K, N, dtype, extremes=True, scb_zero_rows=(0, 5, 36), seed=3)
    weight[1, :4] = torch.tensor([-128, 127, 0, -127], dtype=torch.int8)
    x = torch.eye(K, dtype=dtype, device=DEVICE)
    w_cpu, scb_cpu = weight.cpu(), scb.cpu()
    expected = (w_cpu.float() * scb_cpu[:, None] / 127).to(dtype).T
    assert torch.equal(_w8a16_linear(x, weight, scb, path=path).cpu(), expected)
    assert torch.equal(w8a16_linear_ref(x.cpu(), w_cpu, scb_cpu), expected)


@pytest.mark.parametrize("path,split_k", [("gemv", 1), ("gemv", 3), ("tiled", 1), ("tiled", 2)])
def test_zero_rows_and_int8_extremes(path, split_k):
    """SCB = 0 rows (a checkpoint's all-zero weight rows) give exact zeros (exactly the bias with one), never NaN;
    a weight of only -128 / -127 / 127 stays within the error rule."""
    zero = (0, 7, 60)
    x, weight, scb, b = make_case((5,), 257, 61, torch.float16, bias=True, scb_zero_rows=zero, extremes=True,
                                  seed=4)
    x = x * 0.05  # |out| of a few units with weights at full scale
    out = check(x, weight, scb, b, path=path, split_k=split_k)
    assert torch.equal(out[:, list(zero)], b[list(zero)].expand(5, len(zero)))
    out = check(x, weight, scb, None, path=path, split_k=split_k)
    assert (out[:, list(zero)] == 0).all()


def test_reference_matches_dense():
    """w8a16_linear_ref (the engine's CPU path) == the dense float64 reference to fp32 rounding, and dequantises
    as weight.float() * SCB / 127 in that order (x = I shows W itself, bit for bit)."""
    x, weight, scb, b = make_case((3, 11), 257, 129, torch.float32, bias=True, seed=5, extremes=True)
    ref64 = dense_reference(x, weight, scb, b)
    torch.testing.assert_close(w8a16_linear_ref(x, weight, scb, b).double(), ref64, atol=1e-5, rtol=1e-5)
    eye = torch.eye(257, device=DEVICE)
    assert torch.equal(w8a16_linear_ref(eye, weight, scb), (weight.float() * scb[:, None] / 127).T)


@pytest.mark.parametrize("path", ["gemv", "tiled"])
def test_split_k_deterministic_and_consistent(path):
    """Each split count gives the same answer on every run (no atomics), and the split counts agree to fp32
    rounding."""
    x, weight, scb, b = make_case((6,), 257 * 2, 61, torch.float32, bias=True, seed=6)
    outs = []
    for split_k in (1, 2, 5):
        first = check(x, weight, scb, b, path=path, split_k=split_k)
        assert torch.equal(first, _w8a16_linear(x, weight, scb, b, path=path, split_k=split_k))
        outs.append(first)
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-5, rtol=1e-5)


def test_strided_inputs():
    """x sliced out of a wider fused row (read in place through its row stride), x with a non-unit last stride
    (copied by reshape), SCB and bias with stride 2: all equal the contiguous call bit for bit."""
    x, weight, scb, b = make_case((2, 3), 100, 61, torch.float16, bias=True, seed=7)
    expected = w8a16_linear(x, weight, scb, b)
    wide = torch.zeros(2, 3, 100 + 24, dtype=x.dtype, device=DEVICE)
    wide[..., 8:108] = x
    assert torch.equal(w8a16_linear(wide[..., 8:108], weight, scb, b), expected)
    transposed = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert transposed.stride(-1) != 1
    assert torch.equal(w8a16_linear(transposed, weight, scb, b), expected)
    scb2 = torch.stack([scb, torch.full_like(scb, float("nan"))], dim=1)[:, 0]
    b2 = torch.stack([b, torch.full_like(b, float("nan"))], dim=1)[:, 0]
    assert scb2.stride(0) == 2 and b2.stride(0) == 2
    assert torch.equal(w8a16_linear(x, weight, scb2, b2), expected)


def test_empty_dims():
    x, weight, scb, b = make_case((0,), 32, 16, torch.float32, bias=True)
    assert w8a16_linear(x, weight, scb, b).shape == (0, 16)
    x, weight, scb, _ = make_case((2, 3), 32, 0, torch.float32)
    assert w8a16_linear(x, weight, scb).shape == (2, 3, 0)
    x, weight, scb, b = make_case((4,), 0, 16, torch.float32, bias=True)  # K = 0: the empty sum, plus the bias
    assert torch.equal(w8a16_linear(x, weight, scb, b), b.expand(4, 16))
    assert torch.equal(w8a16_linear(x, weight, scb), torch.zeros(4, 16, device=DEVICE))


def test_choose_split_k():
    # InternLM2-20B decode on 132 SMs, 64-column blocks of 128-wide K tiles, 4 programs per SM aimed at.
    assert choose_split_k(8192 // 64, 6144, 128, 4, 132) == (4, 1536)  # wqkv: 128 blocks -> 512 programs
    assert choose_split_k(16384 // 64, 6144, 128, 4, 132) == (2, 3072)  # w1 / w3
    assert choose_split_k(6144 // 64, 16384, 128, 4, 132) == (5, 3328)  # w2: 128 tiles in 26 + 26 + 26 + 26 + 24
    assert choose_split_k(-(-92553 // 64), 6144, 128, 4, 132) == (1, 6144)  # LM head fills the GPU alone
    assert choose_split_k(1, 3 * 128, 128, 4, 132) == (1, 3 * 128)  # too short to split
    for tiles in (1, 7, 96, 300):
        for K in (1, 100, 257, 1000, 6144, 16384):
            split, per = choose_split_k(tiles, K, 128, 4, 132)
            assert per % 128 == 0 or split == 1
            assert split * per >= K and (split - 1) * per < K  # covers K, no empty slice


def _bad(**changes):
    x, weight, scb, b = make_case((3,), 32, 16, torch.float16, bias=True)
    args = dict(x=x, weight=weight, scb=scb, bias=b)
    args.update({name: fn(args) for name, fn in changes.items()})
    return args


@pytest.mark.parametrize("changes,match", [
    (dict(x=lambda a: a["x"].to(torch.int32)), "unsupported x dtype"),
    (dict(x=lambda a: a["x"][:, :31]), r"x must be \[..., K=32\]"),
    (dict(x=lambda a: a["x"].tolist()), "x must be a torch.Tensor"),
    (dict(weight=lambda a: a["weight"].float()), "weight must be int8"),
    (dict(weight=lambda a: a["weight"][0]), r"weight must be \[N, K\]"),
    (dict(scb=lambda a: a["scb"].half()), "scb .SCB. must be float32"),
    (dict(scb=lambda a: a["scb"][:15]), r"scb must be \[N=16\]"),
    (dict(bias=lambda a: a["bias"][:8]), r"bias must be \[N=16\]"),
    (dict(bias=lambda a: a["bias"].float()), "bias dtype"),
    (dict(bias=lambda a: 1.0), "bias must be a torch.Tensor or None"),
    (dict(scb=lambda a: a["scb"].to("meta")), "one device"),
], ids=["x-dtype", "K-mismatch", "x-not-tensor", "weight-dtype", "weight-rank", "scb-dtype", "scb-shape",
        "bias-shape", "bias-dtype", "bias-not-tensor", "device"])
def test_validation_errors(changes, match):
    args = _bad(**changes)
    with pytest.raises(ValueError, match=match):
        w8a16_linear(**args)
    with pytest.raises(ValueError, match=match):
        w8a16_linear_ref(**args)


def test_weight_must_be_contiguous_for_the_kernel_only():
    args = _bad()
    weight_t = args["weight"].T.contiguous().T  # same [N, K] values, column-major
    assert not weight_t.is_contiguous()
    with pytest.raises(ValueError, match="weight must be contiguous"):
        w8a16_linear(**dict(args, weight=weight_t))
    torch.testing.assert_close(w8a16_linear_ref(**dict(args, weight=weight_t)), w8a16_linear_ref(**args))


def test_split_k_must_be_positive():
    with pytest.raises(ValueError, match="split_k"):
        _w8a16_linear(**_bad(), split_k=0)
