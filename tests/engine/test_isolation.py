"""One request never harms another: a request whose ViT pass, forward or sampling fails, fails alone, and every
other request of the same steps gets exactly the tokens it gets without it."""
from __future__ import annotations

import asyncio

import pytest
import torch
from PIL import Image

from internvl_engine import LLM, SamplingParams
from internvl_engine.engine.async_llm import AsyncLLM
from internvl_engine.engine.isolation import run_isolating

from golden_utils import MODELS, checkpoint, image_path

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)
SEEDED = SamplingParams(max_tokens=6, temperature=0.8, top_k=20, seed=7)


def make_llm(**options) -> LLM:
    return LLM(checkpoint(MODELS[0]), dtype=torch.float32, device="cpu", backend="torch", **options)


def victims() -> list[tuple[dict, SamplingParams]]:
    return [({"prompt": "Hello, who are you?"}, GREEDY),
            ({"prompt": "<image>\nDescribe the image.", "images": [str(image_path("land800x600"))], "max_tiles": 4},
             SEEDED),
            ({"prompt": "Tell me a story."}, SEEDED),
            ({"prompt": "<image>\nWhat is this?", "images": [str(image_path("sq448"))]}, GREEDY)]


def clean_tokens() -> list[list[int]]:
    requests, params = zip(*victims())
    outputs = make_llm().generate(list(requests), list(params))
    assert all(o.finish_reason in ("stop", "length") for o in outputs)
    return [o.token_ids for o in outputs]


@pytest.fixture(scope="module")
def clean() -> list[list[int]]:
    return clean_tokens()


def run_with(llm: LLM, attacker: tuple[dict, SamplingParams], position: int = 1) -> tuple[list, object]:
    """Victims with the attacker queued among them; returns (victim outputs, attacker output)."""
    requests = victims()
    requests.insert(position, attacker)
    outputs = llm.generate([r for r, _ in requests], [p for _, p in requests])
    attacked = outputs.pop(position)
    return outputs, attacked


def test_run_isolating_finds_the_failing_items_with_few_calls():
    calls = []

    def run(items):
        calls.append(list(items))
        if any(item % 7 == 3 for item in items):
            raise ValueError("bad item")
        return {str(item): item * 2 for item in items}

    results, failed = run_isolating(list(range(16)), run)
    assert sorted(item for item, _ in failed) == [3, 10]
    assert all(isinstance(err, ValueError) for _, err in failed)
    assert results == {str(i): i * 2 for i in range(16) if i not in (3, 10)}
    assert len(calls) <= 2 * 16 - 1
    calls.clear()
    assert run_isolating([1, 2], run) == ({"1": 2, "2": 4}, []) and len(calls) == 1  # no failure: one call


def test_a_forward_that_raises_for_one_request_fails_only_it(clean, caplog):
    llm = make_llm()
    execute = llm.runner.execute

    def poisoned(meta):
        if "attacker" in meta.logit_request_ids:
            raise RuntimeError("simulated kernel fault")
        return execute(meta)

    llm.runner.execute = poisoned
    original_add = llm.add_request
    llm.add_request = lambda request, params=None, request_id=None: original_add(
        request, params, "attacker" if request.get("prompt") == "attack" else request_id)
    outputs, attacked = run_with(llm, ({"prompt": "attack"}, GREEDY))
    assert attacked.finish_reason == "error" and "simulated kernel fault" in attacked.error
    assert [o.token_ids for o in outputs] == clean
    assert llm.stats["request_errors"] == {"forward": 1}
    assert "simulated kernel fault" in caplog.text
    assert llm.block_manager.num_free_blocks == llm.runner.num_blocks


def test_non_finite_logits_fail_only_their_row(clean):
    llm = make_llm()
    execute = llm.runner.execute

    def nan_row(meta):
        logits = execute(meta).clone()
        for index, request_id in enumerate(meta.logit_request_ids):
            if request_id == "attacker":
                logits[index] = float("nan")
        return logits

    llm.runner.execute = nan_row
    original_add = llm.add_request
    llm.add_request = lambda request, params=None, request_id=None: original_add(
        request, params, "attacker" if request.get("prompt") == "attack" else request_id)
    for params in (GREEDY, SEEDED):
        outputs, attacked = run_with(llm, ({"prompt": "attack"}, params), position=2)
        assert attacked.finish_reason == "error" and "not finite" in attacked.error
        assert [o.token_ids for o in outputs] == clean
    assert llm.stats["request_errors"] == {"sampling": 2}


def test_an_image_the_vit_fails_on_fails_only_its_request(clean):
    llm = make_llm()
    extract = llm.model.extract_feature

    def poisoned(pixel_values):
        if bool((pixel_values[:, 0] > 2.2).flatten(1).all(1).any()):  # an all-red tile: (1 - 0.485) / 0.229 = 2.25
            raise RuntimeError("simulated ViT fault")
        return extract(pixel_values)

    llm.model.extract_feature = poisoned
    red = Image.new("RGB", (200, 120), (255, 0, 0))
    outputs, attacked = run_with(llm, ({"prompt": "<image>\nWhat colour?", "images": [red]}, GREEDY))
    assert attacked.finish_reason == "error" and "simulated ViT fault" in attacked.error
    assert [o.token_ids for o in outputs] == clean
    assert llm.stats["request_errors"] == {"vit": 1}
    assert llm.block_manager.num_free_blocks == llm.runner.num_blocks


def test_streams_are_unaffected_by_bad_requests_injected_among_them(clean):
    engine = AsyncLLM(make_llm())
    execute = engine.llm.runner.execute

    def poisoned(meta):
        if any(rid.startswith("bad") for rid in meta.logit_request_ids):
            raise RuntimeError("simulated fault")
        return execute(meta)

    engine.llm.runner.execute = poisoned

    async def consume(request, params, request_id):
        return [o async for o in engine.generate(request, params, request_id)]

    async def run():
        tasks = []
        for index, (request, params) in enumerate(victims()):  # each victim, then an attacker, as they arrive
            tasks.append(asyncio.ensure_future(consume(request, params, f"good-{index}")))
            tasks.append(asyncio.ensure_future(consume({"prompt": "attack"}, GREEDY, f"bad-{index}")))
            await asyncio.sleep(0)
        return await asyncio.gather(*tasks)

    streams = asyncio.run(run())
    good = [stream for stream in streams if stream[-1].request_id.startswith("good")]
    bad = [stream for stream in streams if stream[-1].request_id.startswith("bad")]
    assert [stream[-1].token_ids for stream in good] == clean
    assert all(stream[-1].finish_reason == "error" and "simulated fault" in stream[-1].error for stream in bad)
    assert engine.num_step_errors == 0 and engine.num_unfinished == 0
    assert engine.llm.block_manager.num_free_blocks == engine.llm.runner.num_blocks


@pytest.mark.parametrize("options", [dict(top_k=2**63), dict(top_k=2**31), dict(temperature=1e-40),
                                     dict(temperature=float("nan")), dict(temperature=1e9),
                                     dict(repetition_penalty=1e-40), dict(repetition_penalty=float("inf")),
                                     dict(top_p=float("nan")), dict(seed=2**63), dict(seed=-2**63 - 1),
                                     dict(top_k=True), dict(penalty_context_ids=(-1,))])
def test_sampling_values_outside_what_the_arithmetic_takes_are_refused(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        SamplingParams(**options)


def test_top_k_beyond_the_vocabulary_is_refused_by_the_engine():
    llm = make_llm()
    output = llm.add_request("Hi", SamplingParams(top_k=10**6))
    assert output.finish_reason == "error" and "vocabulary" in output.error
