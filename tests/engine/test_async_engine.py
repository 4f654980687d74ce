"""AsyncLLM streams each request's tokens and aborts cleanly (a disconnecting client frees its KV blocks)."""
from __future__ import annotations

import asyncio

import pytest
import torch

from internvl_engine.engine.async_llm import AsyncLLM
from internvl_engine.engine.sampling_params import SamplingParams

from golden_utils import MODELS, checkpoint, golden_json


def make() -> AsyncLLM:
    return AsyncLLM.from_pretrained(checkpoint(MODELS[0]), dtype=torch.float32, device="cpu", backend="torch")


def test_streams_tokens_then_the_final_output():
    engine = make()
    spec = golden_json(MODELS[0])["chat"]["text_single"]
    greedy = SamplingParams(max_tokens=16, temperature=0.0)

    async def consume(question):
        return [output async for output in engine.generate(question, greedy)]

    async def both():
        return await asyncio.gather(consume(spec["call"]["question"]), consume("Tell me a story."))

    first, second = asyncio.run(both())
    for stream in (first, second):
        assert stream[-1].finished and not any(o.finished for o in stream[:-1])
        lengths = [len(o.token_ids) for o in stream]
        assert lengths == sorted(lengths) and lengths[-1] == len(stream[-1].token_ids)
    assert first[-1].token_ids == spec["generated_ids"][0]
    assert first[-1].text == spec["response"]
    assert engine.llm.block_manager.num_free_blocks == engine.llm.runner.num_blocks


def test_abandoned_stream_aborts_and_frees_blocks():
    engine = make()

    async def leave_early():
        stream = engine.generate("Tell me a story.", SamplingParams(max_tokens=64, temperature=0.0))
        async for output in stream:
            if len(output.token_ids) >= 2:
                break  # the client disconnects
        await stream.aclose()
        for _ in range(1000):  # the engine applies the abort at its next step
            if not engine.llm.scheduler.has_unfinished():
                break
            await asyncio.sleep(0.01)

    asyncio.run(leave_early())
    assert engine.num_unfinished == 0
    assert not engine.llm.scheduler.has_unfinished()
    assert engine.llm.block_manager.num_free_blocks == engine.llm.runner.num_blocks


def test_invalid_request_yields_one_error_output():
    engine = make()

    async def run():
        return [o async for o in engine.generate({"prompt": "<image>\nHi", "images": ["/nonexistent.png"]})]

    (output,) = asyncio.run(run())
    assert output.finish_reason == "error" and "nonexistent" in output.error


def test_a_failing_forward_fails_its_request_and_the_engine_goes_on(caplog):
    engine = make()
    execute, calls = engine.llm.runner.execute, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated device fault")
        return execute(*args, **kwargs)

    engine.llm.runner.execute = flaky
    greedy = SamplingParams(max_tokens=4, temperature=0.0)

    async def run():
        first = [o async for o in engine.generate("Hello, who are you?", greedy)]
        second = [o async for o in engine.generate("Hello, who are you?", greedy)]
        return first[-1], second[-1]

    failed, served = asyncio.run(run())
    assert failed.finish_reason == "error" and "simulated device fault" in failed.error
    assert served.finish_reason in ("stop", "length") and len(served.token_ids) >= 1
    assert engine.llm.stats["request_errors"] == {"forward": 1} and engine.num_step_errors == 0
    assert "simulated device fault" in caplog.text
    assert engine.llm.block_manager.num_free_blocks == engine.llm.runner.num_blocks


def test_add_request_raises_what_the_engine_refuses():
    from internvl_engine.engine.scheduler import QueueFullError

    engine = AsyncLLM.from_pretrained(checkpoint(MODELS[0]), dtype=torch.float32, device="cpu", backend="torch",
                                      max_waiting=1, max_num_seqs=1)

    async def run():
        with pytest.raises(ValueError, match="max_tokens"):
            await engine.add_request("Hi", SamplingParams(max_tokens=10 ** 7))
        # One running request (max_num_seqs 1) that lasts, one waiting behind it: the queue is full.
        first = await engine.add_request("Hi", SamplingParams(max_tokens=1000, ignore_eos=True))
        second = await engine.add_request("Hi", SamplingParams(max_tokens=2))
        with pytest.raises(QueueFullError):
            await engine.add_request("Hi", SamplingParams(max_tokens=2))
        engine.abort(first)
        return [o async for o in engine.stream(second)][-1]

    assert asyncio.run(run()).finish_reason in ("stop", "length")
