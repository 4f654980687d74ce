"""Host lists -> device tensors without a host sync, and the step's device guard.

`torch.tensor(values, device=cuda)` copies from pageable memory: the host waits until every kernel queued before
the copy has run, so the next step cannot be prepared while this one computes. Here the values of several lists
go into one pinned host tensor and one `non_blocking` copy, queued behind the kernels like any other work. The
pinned block comes from torch's caching host allocator, which records the copy and hands the block out again
only once it has run, so nothing overwrites it too early.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Sequence

import torch


def to_device(device: torch.device, lists: Sequence[Sequence[int] | Sequence[float]],
              dtype: torch.dtype = torch.int64) -> list[torch.Tensor]:
    """Each list as a 1-D `dtype` tensor on `device` ([len(list)] views of one buffer), in one host->device copy."""
    sizes = [len(values) for values in lists]
    if device.type == "cuda":
        if not any(sizes):
            return [torch.empty(0, dtype=dtype, device=device) for _ in lists]
        host = torch.tensor(list(itertools.chain.from_iterable(lists)), dtype=dtype, pin_memory=True)
        staged = host.to(device, non_blocking=True)
    else:
        staged = torch.tensor(list(itertools.chain.from_iterable(lists)), dtype=dtype)
        if device.type != "cpu":
            staged = staged.to(device)
    return list(staged.split(sizes))


def padded_rows(rows: Sequence[Sequence[int]], width: int, fill: int) -> list[int]:
    """Ragged rows -> one flat list [len(rows) * width], each row padded with `fill` (list ops, no tensor per row)."""
    padding = [fill] * width
    flat: list[int] = []
    for values in rows:
        flat += values
        flat += padding[len(values):]
    return flat


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make `device` the current CUDA device (a no-op elsewhere): Triton launches its kernels, and CUDA graphs
    capture, on the current device, which for a `cuda:N` engine is not necessarily N."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
