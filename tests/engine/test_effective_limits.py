"""Limits told truthfully: max_model_len never exceeds what the KV cache holds (an explicit one past it is an
error naming the options), the CPU default cache holds one max-tile request of the real models, a request
without max_tokens stops at default_max_tokens, and refusals say what to raise."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from golden_utils import MODELS, checkpoint, image_path
from internvl_engine.engine.errors import PromptTooLongError
from internvl_engine.engine.llm import LLM, EngineConfig
from internvl_engine.engine.sampling_params import SamplingParams
from internvl_engine.models.presets import preset_config
from internvl_engine.worker.model_runner import ModelRunner


def make_llm(**options) -> LLM:
    return LLM(checkpoint(MODELS[0]), dtype=torch.float32, device="cpu", backend="torch", **options)


def block_bytes() -> int:
    return 2 * 3 * 16 * 2 * 16 * 4  # K and V x 3 layers x 16 tokens x 2 KV heads x 16 dims x fp32 (the tiny model)


def test_the_models_context_is_clamped_to_the_kv_cache(caplog):
    with caplog.at_level(logging.WARNING):
        llm = make_llm(kv_cache_bytes=101 * block_bytes())  # 100 blocks + the scratch block
    assert llm.runner.num_blocks == 100
    assert llm.scheduler.config.max_model_len == 1600
    assert "--kv-cache-bytes" in caplog.text
    with pytest.raises(PromptTooLongError, match=r"max_model_len 1600; the KV cache holds 1600 tokens: raise "
                                                 r"kv_cache_bytes \(--kv-cache-bytes\)"):
        llm.prepare("Hello", SamplingParams(max_tokens=1600))
    unbounded = llm.prepare("Hello", SamplingParams(max_tokens=None))
    assert unbounded.request.num_prompt_tokens + unbounded.request.max_tokens == 1600
    llm.block_manager.check_fits(unbounded.request)  # what the engine promises, the cache holds


def test_an_explicit_max_model_len_past_the_kv_cache_is_an_error_naming_the_options():
    with pytest.raises(ValueError, match=r"max_model_len 4096 is more than the KV cache holds \(1600 tokens\).*"
                                         r"--kv-cache-bytes.*--max-model-len"):
        make_llm(kv_cache_bytes=101 * block_bytes(), max_model_len=4096)


def test_a_refusal_under_an_explicit_max_model_len_says_to_raise_it():
    llm = make_llm(max_model_len=64)
    with pytest.raises(PromptTooLongError, match=r"raise max_model_len \(--max-model-len\), up to the model's"):
        llm.prepare({"prompt": "<image>\nWhat is it?", "images": [str(image_path("sq448"))]}, SamplingParams())


@pytest.mark.parametrize("preset", ["mini-internvl-chat-2b-v1-5", "mini-internvl-chat-4b-v1-5", "internvl-chat-v1-5"])
def test_the_cpu_default_kv_cache_holds_one_max_tile_request_of_the_real_models(preset):
    config = preset_config(preset)
    model = SimpleNamespace(config=config, dtype=torch.float32, num_image_token=256)
    engine = EngineConfig()
    max_model_len = config.llm.max_context_length
    cache_bytes = LLM.default_cpu_kv_cache_bytes(model, engine, max_model_len)
    blocks = cache_bytes // ModelRunner.bytes_per_block(model, engine.block_size) - 1
    max_tile_request = (engine.max_tiles_per_image + 1) * 256 + 1024  # 40 tiles + thumbnail, and some text
    assert blocks * engine.block_size >= min(max_tile_request, max_model_len)
    assert blocks >= 213  # the refused 13-tile Mini-2B request needed 213 blocks (256 MiB held 169)


def test_default_max_tokens_caps_a_request_without_max_tokens():
    llm = make_llm(default_max_tokens=5)
    capped = llm.prepare("Hello", SamplingParams(max_tokens=None))
    assert capped.request.max_tokens == 5
    assert llm.prepare("Hello", SamplingParams(max_tokens=50)).request.max_tokens == 50  # an explicit one wins
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=None, ignore_eos=True, temperature=0))
    assert len(outputs[0].token_ids) == 5
    with pytest.raises(ValueError, match="default_max_tokens"):
        EngineConfig(default_max_tokens=0)
