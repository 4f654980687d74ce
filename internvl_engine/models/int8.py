"""Weight-only int8 Linears in the bitsandbytes checkpoint format (InternVL-Chat-V1.5-Int8).

A converted `nn.Linear` stores `weight` int8 [out, in], `SCB` float32 [out] (the absmax of each original row) and
`weight_format` uint8 (0 = row-major; 1-3 are old bitsandbytes tile layouts, refused); `bias` stays float.
W[r, c] = weight[r, c] * SCB[r] / 127, and quantizing is weight = round(W * 127 / SCB[r]).

Compute is weight-only (W8A16): the weight is dequantized and the activations stay in the model's dtype. This is
NOT bitsandbytes' LLM.int8, which also quantizes the activations per row and multiplies the columns holding an
outlier (|x| >= 6 anywhere in the batch) apart, so its result depends on what is batched together; weight-only
int8 is batch-independent and closer to the original bf16 model. On CUDA the Triton W8A16 GEMM dequantizes
inside its K loop (`kernels/w8a16_gemm.py`); the PyTorch path runs its reference.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class Int8FormatError(ValueError):
    """An int8 checkpoint tensor the engine cannot use (a tile layout other than row-major, a non-Linear)."""


class Int8Linear(nn.Module):
    # The loader keeps these dtypes whatever the model's (the float parameters take the model's dtype).
    fixed_dtypes = {"weight": torch.int8, "SCB": torch.float32, "weight_format": torch.uint8}

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.SCB = nn.Parameter(torch.empty(out_features, dtype=torch.float32), requires_grad=False)
        self.weight_format = nn.Parameter(torch.zeros((), dtype=torch.uint8), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.backend = "auto"  # "torch" | "triton" | "auto" (the kernel on CUDA); set by the model's set_backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.w8a16_gemm import w8a16_linear, w8a16_linear_ref

        use_kernel = self.backend == "triton" or (self.backend == "auto" and x.is_cuda)
        fn = w8a16_linear if use_kernel else w8a16_linear_ref
        return fn(x, self.weight, self.SCB, self.bias)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [out, in] this layer computes with."""
        return self.weight.float() * self.SCB[:, None] / 127

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight, bias={self.bias is not None}"


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [out, in] -> (int8 weight, float32 SCB) by bitsandbytes' rule: SCB = row absmax,
    weight = round(W * 127 / SCB) (a zero row stays zero)."""
    w = weight.float()
    scb = w.abs().amax(dim=1)
    safe = torch.where(scb > 0, scb, torch.ones_like(scb))
    return torch.round(w * 127 / safe[:, None]).clamp_(-127, 127).to(torch.int8), scb


def convert_linears(model: nn.Module, names: Iterable[str]) -> None:
    """Replace the named `nn.Linear`s of a model (built on the meta device) by `Int8Linear`s of the same shape."""
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise Int8FormatError(f"'{name}' holds int8 weights (it has an SCB) but is a {type(module).__name__}, "
                                  "not a Linear")
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.device("meta"):
            replacement = Int8Linear(module.in_features, module.out_features, module.bias is not None)
        setattr(parent, leaf, replacement)


def default_int8_targets(model: nn.Module, skip: Iterable[str] | None = None) -> list[str]:
    """The Linears transformers' `load_in_8bit` converts: every `nn.Linear` except `skip` (the checkpoint's
    `llm_int8_skip_modules`), or, when that is None, except the module of the official model's last parameter,
    `mlp1.3` (what `get_keys_to_not_convert` picks for the official class, which had no output-embedding hook when
    the Int8 checkpoint was made)."""
    skipped = set(skip) if skip is not None else {"mlp1.3"}
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not any(name == s or name.startswith(s + ".") for s in skipped)]
