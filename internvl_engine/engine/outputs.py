"""What the engine hands back per request: `RequestOutput` (streamed partial ones too) and its timings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class RequestMetrics:
    arrival_time: float
    queue_time: float | None = None  # arrival -> first scheduled
    vit_time: float = 0.0  # seconds of ViT steps that encoded this request's images
    time_to_first_token: float | None = None
    time_per_output_token: float | None = None
    finished_time: float | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    metrics: RequestMetrics | None = None
    finished: bool = True
    num_image_tiles: int = 0  # tiles of all the request's images (256 visual tokens each)
    logits: Any = None  # float32 [len(token_ids), vocab] on the CPU, with SamplingParams(return_logits=True)
