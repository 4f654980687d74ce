"""A bitsandbytes-format int8 copy of a checkpoint folder, laid out as InternVL-Chat-V1.5-Int8 is.

Each converted Linear keeps its name and stores `weight` int8 [out, in], `SCB` float32 [out] (row absmax) and
`weight_format` uint8 0 (row-major); biases, norms and embeddings stay as they were. Which Linears: those
transformers' `load_in_8bit` converts (every Linear but `mlp1.3`, see `models/int8.default_int8_targets`).
config.json gains the `quantization_config` the hub's Int8 repo carries; the tokenizer files are copied.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import InternVLConfig
from ..models.int8 import default_int8_targets, quantize_rows
from ..models.internvl_chat import InternVLChatModel
from ..models.weights import list_shards

QUANTIZATION_CONFIG = {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False,
                       "llm_int8_threshold": 6.0, "llm_int8_skip_modules": None,
                       "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False}


def write_int8_checkpoint(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Quantize `source`'s Linears shard by shard into `target` (a new folder); returns it."""
    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    config = InternVLConfig.from_pretrained(source)
    with torch.device("meta"):
        model = InternVLChatModel(config)
    linears = {f"{name}.weight" for name in default_int8_targets(model)}
    weight_map = {}
    for shard in list_shards(source):
        tensors = {}
        with safe_open(str(shard), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                if name in linears:
                    module = name[: -len(".weight")]
                    tensors[name], tensors[f"{module}.SCB"] = quantize_rows(tensor)
                    tensors[f"{module}.weight_format"] = torch.zeros((), dtype=torch.uint8)
                else:
                    tensors[name] = tensor
        save_file(tensors, str(target / shard.name), metadata={"format": "pt"})
        weight_map.update((name, shard.name) for name in tensors)
    if (source / "model.safetensors.index.json").is_file():
        index = {"metadata": {"total_size": sum((target / s).stat().st_size for s in set(weight_map.values()))},
                 "weight_map": dict(sorted(weight_map.items()))}
        (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    raw = json.loads((source / "config.json").read_text(encoding="utf-8"))
    raw["quantization_config"] = dict(QUANTIZATION_CONFIG)
    (target / "config.json").write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for path in source.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and path.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy2(path, target / path.name)
    return target
