"""AsyncLLM streams each request's tokens and aborts cleanly (a disconnecting client frees its KV blocks)."""
from __future__ import annotations

import asyncio

import torch

from internvl_engine.async_engine import AsyncLLM
from internvl_engine.sampling_params import SamplingParams

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
        async for output in engine.generate("Tell me a story.", SamplingParams(max_tokens=64, temperature=0.0)):
            if len(output.token_ids) >= 2:
                break  # the client disconnects

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
