"""Sampling semantics (transformers order: repetition penalty, temperature, top-k, top-p) and validation."""
from __future__ import annotations

import pytest
import torch

from internvl_engine.sampler import GenerationConfig, Sampler, apply_repetition_penalty, warp


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]


def test_top_k_keeps_exactly_k_and_ties():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = warp(logits, GenerationConfig(do_sample=True, top_k=2))
    assert torch.isfinite(out).tolist() == [[False, True, False, True, False]]


def test_top_p_matches_a_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    for top_p in (0.1, 0.5, 0.9):
        out = warp(logits, GenerationConfig(do_sample=True, top_k=0, top_p=top_p))
        probs = logits.softmax(-1)
        for row in range(4):
            order = probs[row].argsort(descending=True)
            cumulative = probs[row][order].cumsum(0)
            # keep the smallest prefix of the most likely tokens whose mass reaches top_p
            keep_count = int((cumulative < top_p).sum()) + 1
            kept = set(order[:keep_count].tolist())
            assert set(torch.isfinite(out[row]).nonzero().flatten().tolist()) == kept


def test_temperature_scales_logits():
    logits = torch.tensor([[1.0, 2.0]])
    assert torch.equal(warp(logits, GenerationConfig(do_sample=True, temperature=0.5, top_k=0)), logits * 2)


def test_greedy_is_argmax_and_seeded_sampling_is_reproducible():
    logits = torch.randn(3, 100)
    seen = torch.ones(3, 1, dtype=torch.long)
    assert torch.equal(Sampler(GenerationConfig(), "cpu")(logits, seen), logits.argmax(-1))
    cfg = GenerationConfig(do_sample=True, seed=1234, top_k=0)
    draws = [torch.stack([Sampler(cfg, "cpu")(logits, seen) for _ in range(1)]) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    sampler = Sampler(cfg, "cpu")
    many = torch.stack([sampler(logits, seen) for _ in range(20)])
    assert len(set(many[:, 0].tolist())) > 1  # it samples, not argmax


@pytest.mark.parametrize("options,message", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": -3}, "max_new_tokens"),
    ({"do_sample": True, "temperature": 0.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"num_beams": 4}, "beam"),
    ({"temprature": 0.7}, "unsupported generation_config"),
])
def test_invalid_parameters(options, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig.from_mapping(options)


def test_per_row_filters_equal_each_rows_own_configuration():
    """The engine's batched call (one parameter set per row) filters each row as `chat` would alone."""
    from internvl_engine.sampler import filter_logits

    torch.manual_seed(1)
    logits = torch.randn(3, 40)
    configs = [GenerationConfig(do_sample=True, temperature=0.7, top_k=5, top_p=1.0),
               GenerationConfig(do_sample=True, temperature=1.3, top_k=0, top_p=0.6),
               GenerationConfig(do_sample=True, temperature=1.0, top_k=50, top_p=0.9)]
    batched = filter_logits(logits, torch.tensor([c.temperature for c in configs]),
                            torch.tensor([c.top_k for c in configs]), torch.tensor([c.top_p for c in configs]))
    for row, cfg in enumerate(configs):
        assert torch.equal(batched[row], warp(logits[row: row + 1], cfg)[0])
