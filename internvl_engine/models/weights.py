"""Stream an official checkpoint's safetensors into a model built on the meta device.

Tensors are read one at a time from memory-mapped shards, cast, and moved to the target device, so peak host
memory stays around one tensor (well under one shard) rather than the whole model. Loading is strict: a
missing, unexpected or wrongly shaped tensor raises `WeightLoadError` naming it. Module names equal the
checkpoint names, so there is no rename table to drift out of date.
"""
from __future__ import annotations

import json
from pathlib import Path

from typing import Any, Iterable

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from .int8 import Int8FormatError, convert_linears, quantize_rows


class WeightLoadError(ValueError):
    """A checkpoint's tensors do not match the model described by its config.json."""


def list_shards(folder: Path) -> list[Path]:
    """The shard files of a checkpoint: from model.safetensors.index.json, or a single model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise WeightLoadError(f"{index}: cannot read the 'weight_map' of the shard index: {exc}") from exc
        shards = sorted(set(weight_map.values()))
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise WeightLoadError(f"{index}: shard file(s) listed in the index are missing: {missing}")
        return [folder / name for name in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    raise WeightLoadError(f"{folder}: no model.safetensors, model.safetensors.index.json or *.safetensors found")


def _split_name(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_path, _, leaf = name.rpartition(".")
    return (model.get_submodule(module_path) if module_path else model), leaf


def _index_shards(shards: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """name -> (shard, shape), read from the shard headers only."""
    located: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for path in shards:
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise WeightLoadError(f"{path}: not a readable safetensors file: {exc}") from exc
        with handle:
            for name in handle.keys():
                if name in located:
                    raise WeightLoadError(f"tensor '{name}' appears in both {located[name][0].name} and {path.name}")
                located[name] = (path, tuple(handle.get_slice(name).get_shape()))
    return located


def load_checkpoint(model: nn.Module, folder: str | Path, dtype: torch.dtype, device: torch.device | str,
                    progress: bool | None = None, quantize: Iterable[str] = (), shard: Any = None) -> list[str]:
    """Fill every parameter of `model` (built on the meta device) from the checkpoint's shards; returns the names
    of the Linears that hold int8 weights.

    A Linear is int8 iff the checkpoint has `<name>.SCB` (bitsandbytes format, see `models/int8.py`); it becomes
    an `Int8Linear` before loading. `quantize`: float Linears to quantize while streaming (`load_in_8bit`), each
    weight as it is read, so host memory stays near one tensor. progress: None shows the bar only above 1 GiB.
    shard: a tensor-parallel slicing hook (`models/tensor_parallel.TensorParallelShard`): `apply(model)` shards the
    meta model, then each split tensor is read as this rank's slice only (a weight to quantize is read whole, so
    its row scales are the unsplit model's, and then sliced).
    """
    folder = Path(folder)
    shards = list_shards(folder)
    total = sum(path.stat().st_size for path in shards)
    located = _index_shards(shards)
    stored_int8 = sorted(name[: -len(".SCB")] for name in located if name.endswith(".SCB"))
    convert_linears(model, stored_int8)
    to_quantize = sorted(set(quantize) - set(stored_int8))
    convert_linears(model, to_quantize)
    if shard is not None:
        shard.apply(model)
    synthesized = {f"{name}.{leaf}" for name in to_quantize for leaf in ("SCB", "weight_format")}
    expected = {name: tuple(p.shape) for name, p in model.named_parameters() if name not in synthesized}
    unexpected = sorted(set(located) - set(expected))
    if unexpected:
        raise WeightLoadError(f"checkpoint has {len(unexpected)} unexpected tensor(s) the config does not "
                              f"describe: {unexpected[:10]}")
    missing = sorted(set(expected) - set(located))
    if missing:
        raise WeightLoadError(f"checkpoint is missing {len(missing)} tensor(s): {missing[:10]}")
    for name, (path, shape) in located.items():
        if shard is not None:
            shape = shard.shape(name, shape)
        if shape != expected[name]:
            raise WeightLoadError(f"tensor '{name}' in {path.name} has shape {list(shape)}, "
                                  f"the config implies {list(expected[name])}")
    quantizing = set(to_quantize)
    show = progress if progress is not None else total > 2**30
    with tqdm(total=total, desc="loading weights", unit="B", unit_scale=True, unit_divisor=1024,
              disable=not show) as bar:
        for path in shards:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    module, leaf = _split_name(model, name)
                    module_name = name[: -len(leaf) - 1]
                    quantized_weight = module_name in quantizing and leaf == "weight"
                    sliced = shard is not None and shard.splits_tensor(name) and not quantized_weight
                    raw = shard.take(name, handle.get_slice(name)) if sliced else handle.get_tensor(name)
                    if leaf == "weight_format" and int(raw) != 0:
                        raise Int8FormatError(f"'{name}' is {int(raw)}: only row-major int8 weights (weight_format 0) "
                                              "are supported; tile layouts 1-3 come from old bitsandbytes releases")
                    if module_name in quantizing and leaf == "weight":
                        weight, scb = quantize_rows(raw.to(device))
                        if shard is not None and shard.splits_tensor(name):
                            weight = shard.take(name, weight)
                            scb = shard.take(f"{module_name}.SCB", scb) if shard.splits_tensor(f"{module_name}.SCB") else scb
                        _set(module, "weight", weight)
                        _set(module, "SCB", scb)
                        _set(module, "weight_format", torch.zeros((), dtype=torch.uint8, device=device))
                    else:
                        target = getattr(module, "fixed_dtypes", {}).get(leaf, dtype)
                        _set(module, leaf, raw.to(device=device, dtype=target))
                    bar.update(raw.numel() * raw.element_size())
        bar.update(total - bar.n)  # the shards' headers
    return sorted(stored_int8 + to_quantize)


def _set(module: nn.Module, leaf: str, value: torch.Tensor) -> None:
    setattr(module, leaf, nn.Parameter(value, requires_grad=False))
