"""Reading generated checkpoint folders in the testing tests: JSON files, tensors, and config differences."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every shard in the folder, by name."""
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update((name, f.get_tensor(name)) for name in f.keys())
    return out


def diff_paths(a: Any, b: Any, prefix: str = "") -> set[str]:
    """Dotted paths of the keys whose values differ (or that only one side has)."""
    missing = object()
    if isinstance(a, dict) and isinstance(b, dict):
        return set().union(*(diff_paths(a.get(k, missing), b.get(k, missing), f"{prefix}{k}.") for k in a | b))
    return set() if a == b else {prefix.rstrip(".")}
