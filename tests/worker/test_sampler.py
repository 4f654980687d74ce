"""Sampling semantics (transformers order: repetition penalty, temperature, top-k, top-p), the batched sampler,
and the model card's generation_config validation."""
from __future__ import annotations

import pytest
import torch

from internvl_engine.compat.generation_config import GenerationConfig
from internvl_engine.worker.sampler import RowSampling, apply_repetition_penalty, filter_logits, sample_batch


def warp(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    rows = logits.shape[0]
    return filter_logits(logits, torch.full((rows,), temperature), torch.full((rows,), top_k),
                         torch.full((rows,), top_p))


def row(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, penalty: float = 1.0, seen=(),
        generator: torch.Generator | None = None) -> RowSampling:
    return RowSampling(temperature, top_k, top_p, penalty, list(seen), generator)


def seeded(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]


def test_top_k_keeps_exactly_k_and_ties():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    assert torch.isfinite(warp(logits, top_k=2)).tolist() == [[False, True, False, True, False]]


def test_top_p_matches_a_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    for top_p in (0.1, 0.5, 0.9):
        out = warp(logits, top_p=top_p)
        probs = logits.softmax(-1)
        for index in range(4):
            order = probs[index].argsort(descending=True)
            cumulative = probs[index][order].cumsum(0)
            # keep the smallest prefix of the most likely tokens whose mass reaches top_p
            keep_count = int((cumulative < top_p).sum()) + 1
            kept = set(order[:keep_count].tolist())
            assert set(torch.isfinite(out[index]).nonzero().flatten().tolist()) == kept


def test_temperature_scales_logits():
    logits = torch.tensor([[1.0, 2.0]])
    assert torch.equal(warp(logits, temperature=0.5), logits * 2)


def test_per_row_filters_equal_each_rows_own_filtering():
    torch.manual_seed(1)
    logits = torch.randn(3, 40)
    settings = [(0.7, 5, 1.0), (1.3, 0, 0.6), (1.0, 50, 0.9)]
    batched = filter_logits(logits, torch.tensor([s[0] for s in settings]), torch.tensor([s[1] for s in settings]),
                            torch.tensor([s[2] for s in settings]))
    for index, (temperature, top_k, top_p) in enumerate(settings):
        assert torch.equal(batched[index], warp(logits[index: index + 1], temperature, top_k, top_p)[0])


def test_greedy_rows_take_the_argmax_after_their_penalty():
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    tokens = sample_batch(logits, [row(temperature=0.0), row(temperature=0.0, penalty=2.0, seen=[0, 0])])
    assert tokens == [0, 1]  # 3 / 2 = 1.5 < 2


def test_seeded_rows_are_reproducible_and_independent_of_their_neighbours():
    torch.manual_seed(2)
    logits = torch.randn(3, 100)
    alone = [sample_batch(logits[:1], [row(generator=seeded(5))])[0] for _ in range(2)]
    with_others = sample_batch(logits, [row(generator=seeded(5)), row(generator=seeded(9)), row(temperature=0.0)])
    assert alone[0] == alone[1] == with_others[0]
    assert with_others[2] == int(logits[2].argmax())
    draws = {sample_batch(logits[:1], [row()])[0] for _ in range(30)}
    assert len(draws) > 1  # it samples, not argmax


def test_rows_sharing_a_generator_draw_one_stream_in_row_order():
    """batch_chat's rows share a generator: the draws equal one batched multinomial, as the official batch's."""
    torch.manual_seed(3)
    logits = torch.randn(3, 60)
    generator = seeded(21)
    tokens = sample_batch(logits, [row(generator=generator), row(temperature=0.0), row(generator=generator)])
    expected = torch.multinomial(logits[[0, 2]].softmax(-1), 1, generator=seeded(21)).squeeze(1).tolist()
    assert [tokens[0], tokens[2]] == expected


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


def test_generation_config_maps_to_the_engines_official_semantics():
    params = GenerationConfig.from_mapping(dict(max_new_tokens=8, do_sample=True, temperature=0.7)).sampling_params(
        8, (92542,), 1, None, 92553)
    assert (params.temperature, params.top_k, params.top_p) == (0.7, 50, 1.0)  # InternLM2's generation defaults
    assert params.stop_token_ids == (92542,) and params.ignore_eos  # generate stops only at its eos_token_id
    assert params.penalty_context_ids == (1,)  # transformers' generate penalises the BOS it seeds + outputs
    greedy = GenerationConfig.from_mapping(dict(max_new_tokens=8)).sampling_params(8, (2,), 1, None, 92553)
    assert greedy.greedy
    clamped = GenerationConfig.from_mapping(dict(do_sample=True, top_k=10**6)).sampling_params(8, (2,), 1, None, 1000)
    assert clamped.top_k == 1000  # transformers' TopKLogitsWarper clamps top_k to the vocabulary


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_a_non_finite_row_fails_alone_and_the_other_rows_draw_as_without_it(bad_value):
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    logits[1, 7] = bad_value
    rows = [row(generator=seeded(3)), row(generator=seeded(4)), row(temperature=0.0), row(generator=seeded(5))]
    tokens = sample_batch(logits, rows)
    assert tokens[1] is None and all(isinstance(t, int) for t in tokens[:1] + tokens[2:])
    clean = [0, 2, 3]
    alone = sample_batch(logits[clean], [row(generator=seeded(3)), row(temperature=0.0), row(generator=seeded(5))])
    assert [tokens[i] for i in clean] == alone
    greedy_nan = sample_batch(logits[1:2], [row(temperature=0.0)])
    assert greedy_nan == [None]  # a greedy row with nan fails too (argmax would pick the nan)


def test_a_row_with_nothing_left_to_draw_fails_alone():
    logits = torch.randn(2, 10)
    logits[0] = float("-inf")  # every token masked
    tokens = sample_batch(logits, [row(generator=seeded(1)), row(generator=seeded(2))])
    assert tokens[0] is None and isinstance(tokens[1], int)


# --- the batched draw (official_draw=False: no per-row loop, no host sync) -------------------------------------


def raced(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, penalty: float = 1.0, seen=(),
          generator: torch.Generator | None = None, bias=()) -> RowSampling:
    return RowSampling(temperature, top_k, top_p, penalty, list(seen), generator, bias, official_draw=False)


def test_batched_greedy_rows_are_the_exact_argmax():
    torch.manual_seed(4)
    logits = torch.randn(5, 300)
    tokens = sample_batch(logits, [raced(temperature=0.0)] * 5)
    assert tokens == logits.argmax(-1).tolist()


def test_a_seeded_row_draws_the_same_token_in_any_batch():
    """Its noise comes from its own generator only: neighbours (seeded, unseeded, greedy, official), their number
    and its position change nothing."""
    torch.manual_seed(5)
    logits = torch.randn(5, 500)  # the neighbours' rows
    target = torch.randn(500)
    for trial in range(5):
        alone = sample_batch(target[None], [raced(0.9, top_k=50, generator=seeded(100 + trial))])[0]
        neighbours = [raced(generator=seeded(7)), raced(), raced(temperature=0.0), row(generator=seeded(8)), raced()]
        for position in (0, 2, 5):
            rows = neighbours[:position] + [raced(0.9, top_k=50, generator=seeded(100 + trial))] + neighbours[position:]
            batch = torch.cat([logits[:position], target[None], logits[position:]])
            assert sample_batch(batch, rows)[position] == alone, (trial, position)


def test_the_batched_draw_follows_the_filtered_distribution():
    """Exponential race over many seeded rows = a draw from softmax(logits / T) after top-k / top-p: frequencies
    within 5 sigma of the probabilities, and never a filtered token."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    draws = 4000
    rows = [raced(0.7, top_k=4, generator=seeded(index)) for index in range(draws)]
    tokens = sample_batch(logits.expand(draws, -1).contiguous(), rows)
    probs = warp(logits, temperature=0.7, top_k=4).softmax(-1)[0].double()
    counts = torch.bincount(torch.tensor(tokens), minlength=6).double()
    assert counts[4:].sum() == 0  # filtered by top-k
    sigma = (draws * probs * (1 - probs)).sqrt()
    assert ((counts - draws * probs).abs() <= 5 * sigma + 1).all(), (counts, draws * probs)
    unseeded = sample_batch(logits.expand(draws, -1).contiguous(), [raced(0.7, top_p=0.5)] * draws)
    kept = torch.isfinite(warp(logits, temperature=0.7, top_p=0.5))[0]
    assert all(kept[token] for token in unseeded) and len(set(unseeded)) == int(kept.sum())


def test_the_batched_draw_consumes_the_stream_multinomial_would():
    """torch.multinomial draws one sample as argmax(p / q) with q ~ Exp(1) from its generator: the batched draw
    uses the same noise, so a seeded request's tokens, and unseeded rows' global stream, are the ones the
    per-generator multinomial gave (documented in the sampler; pinned here for this torch version)."""
    torch.manual_seed(6)
    logits = torch.randn(4, 80)
    probs = warp(logits[[0, 2]], temperature=0.8, top_k=30).softmax(-1)
    expected = torch.multinomial(probs[:1], 1, generator=seeded(3)).item()
    assert sample_batch(logits[:1], [raced(0.8, top_k=30, generator=seeded(3))]) == [expected]
    torch.manual_seed(11)
    expected = torch.multinomial(probs, 1).squeeze(1).tolist()
    torch.manual_seed(11)
    tokens = sample_batch(logits, [raced(0.8, top_k=30), raced(0.0), raced(0.8, top_k=30), raced(0.0)])
    assert [tokens[0], tokens[2]] == expected


def test_official_rows_keep_the_multinomial_draw_beside_batched_rows(monkeypatch):
    """Rows marked official_draw (the model card's) go through torch.multinomial, one call per generator in row
    order, bit-for-bit as before, whatever batched rows share the step; batched rows never call it."""
    torch.manual_seed(7)
    logits = torch.randn(5, 90)
    generator = seeded(21)
    rows = [row(generator=generator), raced(generator=seeded(1)), row(temperature=0.0), raced(),
            row(generator=generator)]
    calls = []
    multinomial = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda *a, **k: calls.append(a[0].shape) or multinomial(*a, **k))
    tokens = sample_batch(logits, rows)
    assert calls == [torch.Size([2, 90])]
    expected = multinomial(logits[[0, 4]].softmax(-1), 1, generator=seeded(21)).squeeze(1).tolist()
    assert [tokens[0], tokens[4]] == expected
    calls.clear()
    sample_batch(logits, [raced(generator=seeded(index)) for index in range(5)])
    assert calls == []


def test_penalties_of_many_rows_equal_each_rows_own_penalty():
    """One gather/scatter per penalty value over rows of different lengths (padded by repeats) and repeated ids
    gives each row's own penalty: greedy tokens on the penalised logits."""
    torch.manual_seed(8)
    logits = torch.randn(6, 40) * 3
    settings = [(1.3, [0, 5, 5, 9]), (1.3, [1]), (0.7, [2, 3, 4, 5, 6, 7, 8]), (1.0, [1, 2]), (1.3, []),
                (2.0, list(range(40)))]
    rows = [raced(temperature=0.0, penalty=penalty, seen=seen) for penalty, seen in settings]
    expected = []
    for index, (penalty, seen) in enumerate(settings):
        one = logits[index: index + 1]
        if seen:
            one = apply_repetition_penalty(one, torch.tensor([sorted(set(seen))]), penalty)
        expected.append(int(one.argmax()))
    assert sample_batch(logits, rows) == expected
    assert sample_batch(logits, [row(temperature=0.0, penalty=p, seen=s) for p, s in settings]) == expected
