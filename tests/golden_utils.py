"""Read the official implementation's goldens from ../shared/goldens (never copied into the repository)."""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file

MODELS = ("InternVL-Chat-V1-5-tiny", "Mini-InternVL-Chat-2B-V1-5-tiny", "Mini-InternVL-Chat-4B-V1-5-tiny")


def goldens_dir() -> Path:
    override = os.environ.get("INTERNVL_GOLDENS")
    path = Path(override) if override else Path(__file__).resolve().parents[1].parent / "shared" / "goldens"
    if not (path / "README.md").is_file():
        raise FileNotFoundError(f"goldens not found at {path}; set INTERNVL_GOLDENS to the shared/goldens folder")
    return path


@lru_cache(maxsize=None)
def golden_json(model: str, kind: str = "fp32") -> dict:
    return json.loads((goldens_dir() / model / f"goldens_{kind}.json").read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def golden_tensors(model: str, kind: str = "fp32") -> dict[str, torch.Tensor]:
    return load_file(str(goldens_dir() / model / f"goldens_{kind}.safetensors"))


def checkpoint(model: str) -> Path:
    return goldens_dir() / model / "checkpoint"


def image_path(name: str) -> Path:
    return goldens_dir() / "images" / f"{name}.png"


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm())
