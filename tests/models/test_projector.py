"""Pixel shuffle element order for ps_version v1 and v2, checked element by element from its definition."""
from __future__ import annotations

import pytest
import torch

from internvl_engine.models.projector import drop_cls_and_shuffle, pixel_shuffle


def expected_element(x: torch.Tensor, n: int, p: int, q: int, k: int, version: str) -> torch.Tensor:
    """Output [n, p, q, k] of the 0.5 shuffle of x [N, 32, 32, C], derived from the official view/permute chain."""
    c = x.shape[-1]
    if version == "v2":
        p, q = q, p  # v2 swaps the two spatial axes back
    # v1 output [n, b, a', k'] = x[n, 2a' + k' // 2c, 2b + (k' % 2c) // c, k' % c]
    b, a_half = p, q
    return x[n, 2 * a_half + k // (2 * c), 2 * b + (k % (2 * c)) // c, k % c]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pixel_shuffle_element_order(version):
    torch.manual_seed(0)
    x = torch.randn(2, 32, 32, 3)
    out = pixel_shuffle(x, 0.5, version)
    assert out.shape == (2, 16, 16, 12)
    for n in range(2):
        for p in range(0, 16, 5):
            for q in range(0, 16, 3):
                for k in range(12):
                    assert out[n, p, q, k] == expected_element(x, n, p, q, k, version)


def test_v1_is_v2_with_spatial_axes_swapped():
    x = torch.randn(3, 32, 32, 8)
    assert torch.equal(pixel_shuffle(x, 0.5, "v1").transpose(1, 2), pixel_shuffle(x, 0.5, "v2"))


def test_drop_cls_and_shuffle_shapes():
    hidden = torch.randn(4, 1025, 16)
    out = drop_cls_and_shuffle(hidden, 0.5, "v2")
    assert out.shape == (4, 256, 64)
    grid = hidden[:, 1:].reshape(4, 32, 32, 16)
    assert torch.equal(out, pixel_shuffle(grid, 0.5, "v2").reshape(4, 256, 64))
