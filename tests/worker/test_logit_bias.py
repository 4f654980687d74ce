"""logit_bias in the batched sampler: each row's bias is added to its logits before the penalty and sampling,
greedy and sampled rows alike, and leaves the other rows untouched; SamplingParams validates it."""
from __future__ import annotations

import pytest
import torch

from internvl_engine.engine.sampling_params import SamplingParams
from internvl_engine.worker.sampler import RowSampling, apply_repetition_penalty, filter_logits, sample_batch


def row(temperature=0.0, bias=(), penalty=1.0, seen=(), seed=None, top_k=0, top_p=1.0):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return RowSampling(temperature, top_k, top_p, penalty, seen, generator, bias)


def test_bias_is_applied_per_row_before_the_penalty_and_the_draw():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    rows = [row(bias=((7, 100.0),)),  # forced greedy
            row(),  # untouched greedy
            row(temperature=0.8, bias=((3, 2.5), (9, -1.0)), penalty=1.3, seen=(3, 4), seed=11, top_k=20, top_p=0.9),
            row(bias=((int(logits[3].argmax()), -100.0),))]  # banned argmax
    tokens = sample_batch(logits, rows)
    assert tokens[0] == 7
    assert tokens[1] == int(logits[1].argmax())
    reference = logits[2:3].clone()
    reference[0, 3] += 2.5
    reference[0, 9] -= 1.0
    reference = apply_repetition_penalty(reference, torch.tensor([[3, 4]]), 1.3)
    probs = filter_logits(reference, torch.tensor([0.8]), torch.tensor([20]), torch.tensor([0.9])).softmax(-1)
    assert tokens[2] == int(torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(11)))
    expected = logits[3].clone()
    expected[int(logits[3].argmax())] -= 100.0
    assert tokens[3] == int(expected.argmax())


def test_the_input_logits_are_not_modified():
    logits = torch.randn(2, 10)
    before = logits.clone()
    sample_batch(logits, [row(bias=((1, 5.0),)), row()])
    assert torch.equal(logits, before)


@pytest.mark.parametrize("bias, message", [
    ({-1: 1.0}, "token ids"), ({"5": 1.0}, "token ids"), ({5: 100.5}, r"\[-100, 100\]"), ({5: float("nan")}, "finite"),
    ({5: "x"}, "finite"), ([(5, 1.0), (5, 2.0)], "more than once"), (5, "map token ids")])
def test_sampling_params_validate_logit_bias(bias, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(logit_bias=bias)


def test_sampling_params_keep_logit_bias_hashable_and_sorted():
    params = SamplingParams(logit_bias={9: -2, 3: 1.5})
    assert params.logit_bias == ((3, 1.5), (9, -2.0))
    assert hash(params) == hash(SamplingParams(logit_bias=[(3, 1.5), (9, -2)]))
    assert SamplingParams(logit_bias={}).logit_bias is None
