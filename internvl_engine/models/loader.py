"""Build an InternVLChatModel from an official checkpoint folder: config.json + safetensors (+ tokenizer ids)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ConfigError, InternVLConfig
from .int8 import default_int8_targets
from .internvl_chat import InternVLChatModel
from .weights import load_checkpoint

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """A torch dtype from a dtype, its name, or None / 'auto' (the default)."""
    if dtype is None or dtype == "auto":
        return default
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"unsupported torch_dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in _DTYPES:
        return _DTYPES[dtype.replace("torch.", "")]
    raise ValueError(f"unsupported torch_dtype {dtype!r}; use float32, bfloat16 or float16")


def find_token_id(folder: Path, token: str) -> int | None:
    """The id of an added token, from added_tokens.json or tokenizer_config.json's added_tokens_decoder."""
    added = folder / "added_tokens.json"
    if added.is_file():
        ids = json.loads(added.read_text(encoding="utf-8"))
        if token in ids:
            return int(ids[token])
    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.is_file():
        decoder = json.loads(tok_cfg.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        for key, entry in decoder.items():
            if isinstance(entry, dict) and entry.get("content") == token:
                return int(key)
    return None


def load_model(path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
               progress: bool | None = None, model_class: type[InternVLChatModel] = InternVLChatModel,
               load_in_8bit: bool = False, shard: object = None) -> InternVLChatModel:
    """Read config.json, build the model on the meta device, stream the weights onto `device` in `dtype`.

    An int8 checkpoint (bitsandbytes format) loads its int8 Linears as such; `load_in_8bit` quantizes a float
    checkpoint's Linears while loading (transformers' choice of modules, or the config's
    `quantization_config.llm_int8_skip_modules`), and changes nothing on an int8 checkpoint."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint path {str(folder)!r} does not exist")
    config = InternVLConfig.from_pretrained(folder)
    target = resolve_dtype(dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device("meta"):
        model = model_class(config)
    quantization = config.extra.get("quantization_config")
    skip = quantization.get("llm_int8_skip_modules") if isinstance(quantization, dict) else None
    quantize = default_int8_targets(model, skip) if load_in_8bit else ()
    model.int8_linears = load_checkpoint(model, folder, target, device, progress=progress, quantize=quantize,
                                         shard=shard)  # shard: this tensor-parallel rank's slices only
    for module in model.modules():  # InternLM2's w1 / w3 into one storage: one gate_up GEMM on the triton path
        fuse = getattr(module, "fuse_gate_up", None)
        if fuse is not None:
            fuse()
    model.quantization_config = quantization if isinstance(quantization, dict) else None
    model.img_context_token_id = find_token_id(folder, "<IMG_CONTEXT>")
    if model.img_context_token_id is None:
        raise ConfigError(f"{folder}: the tokenizer files do not define the '<IMG_CONTEXT>' token")
    return model.eval()
