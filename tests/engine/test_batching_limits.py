"""Batching limits checked when the engine is built, the graph-capture option and its serve flag, and the
rotary's host-known maximum (the engine step's form of rope lengths) giving the same rotation as the tensor."""
from __future__ import annotations

import argparse
import logging

import pytest
import torch

from internvl_engine import LLM
from internvl_engine.config import LLMConfig, RopeScaling
from internvl_engine.engine.llm import EngineConfig
from internvl_engine.models.layers import RotaryEmbedding
from internvl_engine.models.phi3 import SuRotaryEmbedding
from internvl_engine.server import launch

from golden_utils import MODELS, checkpoint


def test_max_num_seqs_above_the_token_budget_is_reported_and_capped(caplog):
    """Every running request takes a token of each step, so the budget bounds the batch: the engine says so,
    schedules at most that many, and captures no decode bucket above it."""
    with caplog.at_level(logging.WARNING, logger="internvl_engine.engine.llm"):
        llm = LLM(checkpoint(MODELS[0]), dtype=torch.float32, device="cpu", backend="torch", static_decode=True,
                  max_num_seqs=8, max_num_batched_tokens=4)
    assert "max_num_batched_tokens (4) is below max_num_seqs (8)" in caplog.text
    assert "--max-num-batched-tokens" in caplog.text and "--max-num-seqs" in caplog.text
    assert llm.scheduler.config.max_num_seqs == 4
    assert llm.runner.decode_graphs.buckets == [1, 2, 4]


@pytest.mark.parametrize("options, message", [
    (dict(kv_cache_fraction=0.0), "kv_cache_fraction"), (dict(kv_cache_fraction=1.5), "kv_cache_fraction"),
    (dict(kv_cache_bytes=0), "kv_cache_bytes"), (dict(max_model_len=1), "max_model_len"),
    (dict(default_max_tokens=0), "default_max_tokens")])
def test_engine_config_refuses_inconsistent_limits(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**options)


def test_graph_capture_at_startup_is_an_option_and_a_serve_flag(monkeypatch):
    assert EngineConfig().capture_graphs_at_startup
    parser = argparse.ArgumentParser()
    launch.add_serve_arguments(parser)
    action = next(a for a in parser._actions if "--no-graph-capture-at-startup" in a.option_strings)
    assert action.default is False and "default" in action.help
    seen = {}

    class FakeLLM:
        def __init__(self, *args, **options) -> None:
            seen.update(options)

    monkeypatch.setattr("internvl_engine.engine.llm.LLM", FakeLLM)
    monkeypatch.setattr("internvl_engine.engine.async_llm.AsyncLLM", lambda llm, preprocess: llm)
    for flags, expected in (([], True), (["--no-graph-capture-at-startup"], False)):
        launch.build_engine(parser.parse_args(["--model", str(checkpoint(MODELS[0])), *flags]))
        assert seen["capture_graphs_at_startup"] is expected


def test_dynamic_ntk_rope_with_the_host_maximum_equals_reading_it_from_the_tensor():
    rotary = RotaryEmbedding(16, 10000.0, 64, RopeScaling("dynamic", 2.0))
    lengths = torch.tensor([[3, 64, 65, 90, 130, 64, 200]])
    positions = lengths - 1
    expected = rotary.cos_sin(positions, lengths, torch.float32)
    paired = rotary.cos_sin(positions, (lengths, 200), torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(expected, paired))
    short = torch.tensor([[1, 2, 64]])
    assert all(torch.equal(a, b) for a, b in zip(rotary.cos_sin(short - 1, short, torch.float32),
                                                  rotary.cos_sin(short - 1, (short, 64), torch.float32)))


def test_su_rope_with_the_host_maximum_equals_the_per_token_regimes():
    scaling = RopeScaling("su", short_factor=tuple(1.0 + i / 8 for i in range(8)),
                          long_factor=tuple(2.0 + i for i in range(8)))
    config = LLMConfig(vocab_size=10, hidden_size=32, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=256, rope_scaling=scaling,
                       architecture="Phi3ForCausalLM", original_max_position_embeddings=64)
    rotary = SuRotaryEmbedding(config)
    for lengths in (torch.tensor([[3, 64, 10]]), torch.tensor([[3, 65, 200]])):
        positions = lengths - 1
        expected = rotary.cos_sin(positions, lengths, torch.float32)
        paired = rotary.cos_sin(positions, (lengths, int(lengths.max())), torch.float32)
        assert all(torch.equal(a, b) for a, b in zip(expected, paired))
    rows = rotary.cos_sin(torch.arange(4)[None].expand(3, 4), [10, 20, 30], torch.float32)
    per_row = rotary.cos_sin(torch.arange(4)[None].expand(3, 4), torch.tensor([[10] * 4, [20] * 4, [30] * 4]),
                             torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(rows, per_row))
