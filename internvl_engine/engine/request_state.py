"""The engine's side of a request, beside the scheduler's `Request`: its parameters, random stream, tiles or
features, detokenizer and timings."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..preprocessing.device import HostImage
from .detokenizer import IncrementalDetokenizer
from .outputs import RequestMetrics
from .request import Request
from .sampling_params import SamplingParams


@dataclass
class RequestState:
    """Engine-side state of one request beside the scheduler's `Request`."""

    params: SamplingParams
    generator: torch.Generator | None
    # content hash -> tiles [tiles, 3, S, S] (on the host, or on the device once device preprocessing made them),
    # or the decoded image they are yet to be made from (device preprocessing); dropped once the image is encoded
    pixel_values: dict[str, torch.Tensor | HostImage]
    detokenizer: IncrementalDetokenizer
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.perf_counter()))
    logits: list[torch.Tensor] = field(default_factory=list)  # per output token, with params.return_logits


@dataclass
class PreparedRequest:
    """A validated, tokenised request with its tiles: what `LLM.prepare` builds and `LLM.submit` queues."""

    request: Request
    state: RequestState

    @property
    def request_id(self) -> str:
        return self.request.request_id


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's own random stream: a shared one it was given, or one seeded from `seed`."""
    if params.greedy:
        return None
    if params.generator is not None:
        return params.generator
    if params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator
