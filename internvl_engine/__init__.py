"""internvl-engine: inference for the InternVL 1.5 family (InternVL-Chat-V1.5, Mini-InternVL-Chat-2B/4B-V1.5).

The public API mirrors the official model card, plus the engine:

    from internvl_engine import AutoModel, AutoTokenizer, load_image, load_video, dynamic_preprocess
    from internvl_engine import LLM, SamplingParams, AsyncLLM

Names resolve lazily (PEP 562), so importing a submodule such as `internvl_engine.config` stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "AutoModel": "compat",
    "AutoTokenizer": "compat",
    "InternVLChat": "compat",
    "GenerationConfig": "compat",
    "load_image": "preprocessing.cpu",
    "load_video": "preprocessing.video",
    "dynamic_preprocess": "preprocessing.cpu",
    "ImageLoadError": "preprocessing.image_io",
    "VideoLoadError": "preprocessing.video",
    "InternVLConfig": "config",
    "ConfigError": "config",
    "WeightLoadError": "models.weights",
    "LLM": "engine.llm",
    "AsyncLLM": "engine.async_llm",
    "SamplingParams": "engine.sampling_params",
    "RequestOutput": "engine.outputs",
    "PromptTooLongError": "engine.errors",
    "QueueFullError": "engine.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'internvl_engine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
