"""`AutoModel` and `AutoTokenizer`: the two `from_pretrained` entry points of the model card."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from ..models.loader import load_model
from ..text.llama_tokenizer import Tokenizer, load_tokenizer
from .chat_model import InternVLChat


class AutoModel:
    """`AutoModel.from_pretrained(path, torch_dtype=..., device=None, backend="auto", **ignored_hf_kwargs)`."""

    _IGNORED = {"low_cpu_mem_usage", "trust_remote_code", "use_flash_attn", "load_in_8bit", "device_map",
                "revision", "local_files_only", "attn_implementation"}

    @classmethod
    def from_pretrained(cls, path: str | Path, torch_dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None, progress: bool | None = None,
                        backend: str = "auto", **kwargs: Any) -> InternVLChat:
        """backend: "torch" (reference path), "triton" (kernels) or "auto" (triton on CUDA, torch on CPU)."""
        unknown = set(kwargs) - cls._IGNORED
        if unknown:
            warnings.warn(f"AutoModel.from_pretrained ignores {sorted(unknown)}", stacklevel=2)
        # load_in_8bit: int8 weights, weight-only compute (not bitsandbytes' LLM.int8; see models/int8.py). An int8
        # checkpoint loads as int8 with or without it.
        model = load_model(path, dtype=torch_dtype, device=device, progress=progress, model_class=InternVLChat,
                           load_in_8bit=bool(kwargs.get("load_in_8bit")))
        model.name_or_path = str(path)
        return model.set_backend(backend)


class AutoTokenizer:
    """`AutoTokenizer.from_pretrained(path, trust_remote_code=True, use_fast=False)`."""

    @classmethod
    def from_pretrained(cls, path: str | Path, **ignored: Any) -> Tokenizer:
        return load_tokenizer(path)
