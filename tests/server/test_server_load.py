"""A bounded load test: three rounds of 64 concurrent streaming requests with images against one server.

Every request completes, /metrics counts them, no KV block is held afterwards, and rounds 2 and 3 together grow
the process' resident memory by less than RSS_GROWTH_BOUND. Each request decodes and tiles its own picture
(7.2 MB of float32 tiles), so a leak of a request's tiles, features or KV would exceed the bound within a round.
The feature cache is capped at 4 MiB so that its intended growth does not count. Measured here: 737/746/743,
735/740/742 and 740/743/748 MiB after each round; without `serve`'s fixed glibc mmap threshold the same test
read 1247/1422/1547 MiB (freed tile buffers stayed in per-thread heaps).
"""
from __future__ import annotations

import asyncio

import openai
import pytest
import torch
from PIL import Image

from golden_utils import MODELS, checkpoint
from server_utils import data_url, running_server

MODEL = "tiny"
CONCURRENCY = 64
RSS_GROWTH_BOUND = 32 << 20
ROUNDS = 3


def picture(index: int) -> Image.Image:
    """A distinct 640x320 picture per request: 2 tiles + a thumbnail with max_dynamic_patch 2, no cache hits."""
    generator = torch.Generator().manual_seed(index)
    pixels = torch.randint(0, 256, (24, 32, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), mode="RGB").resize((640, 320), Image.NEAREST)


async def one_stream(client: openai.AsyncOpenAI, index: int) -> tuple[str, str, int]:
    stream = await client.chat.completions.create(
        model=MODEL, max_tokens=8, temperature=0.7, seed=index, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(picture(index))}},
            {"type": "text", "text": f"Request {index}: what is in this picture?"}]}],
        extra_body={"max_dynamic_patch": 2})
    text, reason, tokens = [], None, 0
    async for chunk in stream:  # the client stops at data: [DONE]
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            reason = chunk.choices[0].finish_reason or reason
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
            assert chunk.usage.model_extra["image_tiles"] == 3  # 2 tiles + thumbnail
    return "".join(text), reason, tokens


async def one_round(base_url: str, first_index: int) -> list[tuple[str, str, int]]:
    async with openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600) as client:
        return await asyncio.gather(*(one_stream(client, first_index + i) for i in range(CONCURRENCY)))


@pytest.mark.slow
def test_64_concurrent_streams_with_images_complete_and_free_everything():
    with running_server("--model", str(checkpoint(MODELS[0])), "--served-model-name", MODEL,
                        "--max-num-seqs", str(CONCURRENCY), "--feature-cache-bytes", str(4 << 20)) as server:
        rss = []
        for round_number in range(ROUNDS):
            results = asyncio.run(one_round(server.api_url, round_number * CONCURRENCY))
            assert len(results) == CONCURRENCY
            for text, reason, tokens in results:
                assert reason in ("stop", "length") and 1 <= tokens <= 8
            finished = (server.metric("internvl_requests_total", status="stop")
                        + server.metric("internvl_requests_total", status="length"))
            assert finished == CONCURRENCY * (round_number + 1)
            assert server.metric("internvl_http_responses_total", route="/v1/chat/completions",
                                 status_code="200") == CONCURRENCY * (round_number + 1)
            assert server.metric("internvl_kv_cache_blocks_in_use") == 0
            assert server.metric("internvl_num_requests_unfinished") == 0
            assert server.metric("internvl_num_requests_running") == 0
            assert server.metric("internvl_num_requests_waiting") == 0
            assert server.metric("internvl_vit_tiles_encoded_total") == 3 * CONCURRENCY * (round_number + 1)
            rss.append(server.rss_bytes())
        growth = rss[-1] - rss[0]
        print("RSS after each round:", ", ".join(f"{value / 2**20:.0f} MiB" for value in rss))
        assert growth < RSS_GROWTH_BOUND, f"resident memory grew by {growth / 2**20:.0f} MiB after the first round"
