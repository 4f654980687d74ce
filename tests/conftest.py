"""Test-session setup: without a GPU, Triton kernels run under its interpreter on CPU tensors.

TRITON_INTERPRET must be set before any kernel module is imported (triton.jit reads it when decorating).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test helpers (golden_utils) live beside the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))
