"""Output processing: stop strings on incremental detokenization, and the `RequestOutput` of a request, partial
(streaming) or final (text decoded like the official `chat`: special tokens skipped, cut at the template's stop
token and at the first stop string, stripped)."""
from __future__ import annotations

import time

import torch

from ..text.llama_tokenizer import Tokenizer
from .detokenizer import find_stop, truncate_at_stop
from .outputs import RequestOutput
from .request import FinishReason, Request
from .request_state import RequestState


def hits_stop_string(request: Request, state: RequestState) -> bool:
    """Whether the text added by the request's newest tokens completes one of its stop strings."""
    stops = state.params.stop
    if not stops:
        return False
    start = len(state.detokenizer.text)
    new_text = state.detokenizer.update(request.output_token_ids)
    longest = max(len(stop) for stop in stops)
    return bool(new_text) and find_stop(state.detokenizer.text, stops, max(start - longest + 1, 0)) >= 0


def partial_output(request: Request, state: RequestState) -> RequestOutput:
    """A running request's output so far (finished=False), for streaming."""
    state.detokenizer.update(request.output_token_ids)
    return RequestOutput(request.request_id, state.detokenizer.text, list(request.output_token_ids), None,
                         num_prompt_tokens=request.num_prompt_tokens, metrics=state.metrics, finished=False,
                         num_image_tiles=request.num_image_tiles)


def final_output(request: Request, state: RequestState, tokenizer: Tokenizer,
                 stop_token: str) -> RequestOutput:
    metrics = state.metrics
    metrics.finished_time = time.perf_counter()
    outputs = len(request.output_token_ids)
    if outputs > 1 and metrics.first_token_time is not None:
        metrics.time_per_output_token = (metrics.finished_time - metrics.first_token_time) / (outputs - 1)
    decodable = [t for t in request.output_token_ids if t < len(tokenizer)]  # random-weight presets
    text = tokenizer.decode(decodable, skip_special_tokens=True)
    text, stopped = truncate_at_stop(text.split(stop_token)[0], state.params.stop)
    reason = FinishReason.STOP if stopped else request.finish_reason
    return RequestOutput(request.request_id, text.strip(), list(request.output_token_ids),
                         reason.value if reason else None, error=request.error,
                         num_prompt_tokens=request.num_prompt_tokens, num_cached_tokens=request.num_cached_tokens,
                         num_preemptions=request.num_preemptions, metrics=metrics,
                         num_image_tiles=request.num_image_tiles,
                         logits=torch.stack(state.logits) if state.logits else None)
