"""The chat-completions request body -> engine inputs, and the response and stream-chunk objects.

Validation is explicit so each problem gets a 400 naming the field, and every value is held to the range the
engine's arithmetic takes (so no request can fail a batched step). Work limits (`RequestLimits`: images per
request, prompt characters, stop strings) are checked here, before any image is fetched or decoded; a
refusal is a 413 naming the server flag. Extensions beyond the OpenAI API (as in vLLM): `top_k`,
`repetition_penalty`, `ignore_eos`, `max_dynamic_patch` (max tiles per image), `video_url` content parts (vLLM's
form: {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}) with `num_frames` (frames sampled
per video, default 8) and `max_tiles_per_frame` (default 1).
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..engine.sampling_params import (MAX_LOGIT_BIAS, MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY,
                                      MIN_TEMPERATURE, SEED_RANGE, SamplingParams)
from ..preprocessing.video import DEFAULT_MAX_VIDEO_FRAMES, DEFAULT_MAX_VIDEOS_PER_REQUEST
from .errors import APIError, limit_error

_ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class RequestLimits:
    """What one chat request may ask for; each is a server flag (--max-images-per-request, ...)."""

    vocab_size: int  # top_k beyond it is refused
    max_tiles: int = 40  # max_dynamic_patch
    max_images_per_request: int = 16
    max_prompt_chars: int = 1 << 20  # all message text together
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256  # each stop string (the search per step grows with the longest)
    max_prompts_per_request: int = 64  # /v1/completions: prompts (choices) in one request
    max_videos_per_request: int = DEFAULT_MAX_VIDEOS_PER_REQUEST
    max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES  # num_frames: frames sampled from each video

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict]  # OpenAI messages; image_url parts not yet resolved
    params: SamplingParams
    stream: bool
    include_usage: bool
    max_tiles: int | None


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise APIError(400, f"{name} must be a finite number, got {str(value)[:50]}", param=name)
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise APIError(400, f"{name} must be in {bracket}{low}, {high}], got {value!r}", param=name)
    return float(value)


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _integer(body: dict, name: str, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{name} must be an integer, got {value!r:.50}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        limits = f"at least {low}" if high is None else f"between {low} and {high}"
        raise APIError(400, f"{name} must be {limits}, got {str(value)[:50]}", param=name)
    return value


def _check_messages(messages: Any, limits: RequestLimits) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    images = videos = chars = 0
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object", param=where)
        if message.get("role") not in _ROLES:
            raise APIError(400, f"{where}.role must be one of {', '.join(_ROLES)}, got {str(message.get('role'))[:50]!r}",
                           param=f"{where}.role")
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
            continue
        if not isinstance(content, list):
            raise APIError(400, f"{where}.content must be a string or a list of parts", param=f"{where}.content")
        for number, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                chars += len(part["text"])
                continue
            url = part.get("image_url") if kind == "image_url" else None
            if kind == "image_url" and not isinstance(url, dict):  # OpenAI's form: {"url": "..."}, not a string
                raise APIError(400, f"{where}.content[{number}].image_url must be an object "
                               '{"url": "data:image/...;base64,..."}, got ' f"{type(url).__name__}",
                               param=f"{where}.content[{number}].image_url")
            url = url.get("url") if isinstance(url, dict) else None
            if kind == "image_url" and isinstance(url, str):
                if message["role"] != "user":
                    raise APIError(400, f"{where}: images are only accepted in user messages", param=where)
                images += 1
                continue
            if kind == "video_url":
                videos += _check_video_part(part, message["role"], f"{where}.content[{number}]")
                continue
            raise APIError(400, f"{where}.content[{number}] must be a text part, or an image_url or video_url part "
                           "with a url", param=f"{where}.content[{number}]")
    if images > limits.max_images_per_request:
        raise limit_error(f"the request has {images} images, over the limit of {limits.max_images_per_request}",
                          "max_images_per_request", param="messages")
    if videos > limits.max_videos_per_request:
        raise limit_error(f"the request has {videos} videos, over the limit of {limits.max_videos_per_request}",
                          "max_videos_per_request", param="messages")
    if chars > limits.max_prompt_chars:
        raise limit_error(f"the messages have {chars} characters of text, over the limit of "
                          f"{limits.max_prompt_chars}", "max_prompt_chars", param="messages")
    return [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]


def _check_video_part(part: dict, role: str, where: str) -> int:
    """A `video_url` part as vLLM takes it, {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}},
    in a user message; returns 1 (one video)."""
    url = part.get("video_url")
    if not isinstance(url, dict) or not isinstance(url.get("url"), str):
        raise APIError(400, f'{where}.video_url must be an object {{"url": "data:video/mp4;base64,..."}}, got '
                       f"{type(url).__name__}", param=f"{where}.video_url")
    if role != "user":
        raise APIError(400, f"{where}: videos are accepted only in user messages", param=where)
    return 1


def _video_options(body: dict, messages: list[dict], limits: RequestLimits) -> list[dict]:
    """The body's num_frames / max_tiles_per_frame, checked, carried on each video part for the engine."""
    num_frames = body.get("num_frames")
    if num_frames is not None and not (isinstance(num_frames, int) and not isinstance(num_frames, bool)
                                       and num_frames >= 1):
        raise APIError(400, f"num_frames must be a positive integer, got {num_frames!r:.50}", param="num_frames")
    if num_frames is not None and num_frames > limits.max_video_frames:
        raise limit_error(f"num_frames is {num_frames}, over the limit of {limits.max_video_frames} frames per video",
                          "max_video_frames", param="num_frames")
    options = {"num_frames": num_frames,
               "max_tiles_per_frame": _integer(body, "max_tiles_per_frame", 1, limits.max_tiles)}
    options = {name: value for name, value in options.items() if value is not None}
    if not options:
        return messages
    return [{**message, "content": [{**part, **options} if part.get("type") == "video_url" else part
                                    for part in message["content"]]}
            if isinstance(message["content"], list) else message for message in messages]


def _stop_strings(body: dict, limits: RequestLimits) -> tuple[str, ...]:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "stop must be a non-empty string or a list of non-empty strings", param="stop")
    if len(stop) > limits.max_stop_strings:
        raise limit_error(f"{len(stop)} stop strings, over the limit of {limits.max_stop_strings}",
                          "max_stop_strings", param="stop")
    longest = max((len(s) for s in stop), default=0)
    if longest > limits.max_stop_string_chars:
        raise limit_error(f"a stop string of {longest} characters, over the limit of {limits.max_stop_string_chars}",
                          "max_stop_string_chars", param="stop")
    return tuple(stop)


def _model(body: Any, served_models: tuple[str, ...]) -> str:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model not in served_models:
        raise APIError(400, f"model {str(model)[:100]!r} is not served here; available: {', '.join(served_models)}",
                       param="model", code="model_not_found")
    return model


def _logit_bias(body: dict, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]}; JSON keys are strings."""
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise APIError(400, "logit_bias must be an object mapping token ids to biases", param="logit_bias")
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10 and int(key) < vocab_size):
            raise APIError(400, f"logit_bias keys must be token ids in [0, {vocab_size}) (the vocabulary), got "
                           f"{key[:50]!r}", param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value) \
                or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise APIError(400, f"logit_bias[{key!r}] must be a number in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                           f"got {str(value)[:50]}", param="logit_bias")
        out[int(key)] = float(value)
    return out or None


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"{name} must be a boolean, got {value!r:.50}", param=name)
    return value


def _generation(body: dict, limits: RequestLimits, default_max_tokens: int | None = None
                ) -> tuple[SamplingParams, bool, bool]:
    """The fields chat and text completions share -> (sampling params, stream, include_usage)."""
    if _integer(body, "n", 1) not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n")
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise APIError(400, f"{name} is not supported (use repetition_penalty)", param=name)
    max_tokens = _integer(body, "max_completion_tokens", 1)
    max_tokens = _integer(body, "max_tokens", 1) if max_tokens is None else max_tokens
    stop = _stop_strings(body, limits)
    stream = _boolean(body, "stream")
    if body.get("stream_options") is not None and not stream:
        raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise APIError(400, "stream_options must be an object with a boolean include_usage", param="stream_options")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    if 0 < temperature < MIN_TEMPERATURE:
        raise APIError(400, f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {temperature!r}",
                       param="temperature")
    params = SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
        temperature=temperature,
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=_integer(body, "top_k", -1, limits.vocab_size) or -1,
        repetition_penalty=_number(body, "repetition_penalty", 1.0, MIN_REPETITION_PENALTY,
                                   min(MAX_REPETITION_PENALTY, 10.0)),
        seed=_integer(body, "seed", *SEED_RANGE),
        stop=stop,
        ignore_eos=_boolean(body, "ignore_eos"),
        logit_bias=_logit_bias(body, limits.vocab_size))
    return params, stream, bool(options.get("include_usage", False))


def parse_chat_request(body: Any, served_models: tuple[str, ...], limits: RequestLimits) -> ChatRequest:
    model = _model(body, served_models)
    messages = _video_options(body, _check_messages(body.get("messages"), limits), limits)
    if body.get("logprobs") or body.get("top_logprobs"):
        raise APIError(400, "logprobs are not supported", param="logprobs")
    if body.get("tools") or body.get("functions"):
        raise APIError(400, "tools and function calling are not supported", param="tools")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise APIError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format")
    params, stream, include_usage = _generation(body, limits)  # no max_tokens: the engine's default_max_tokens
    return ChatRequest(model, messages, params, stream, include_usage,
                       _integer(body, "max_dynamic_patch", 1, limits.max_tiles))


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: list[dict]  # engine inputs: {"text": str} or {"prompt_token_ids": [int]}, one choice each
    params: SamplingParams
    stream: bool
    include_usage: bool


COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions


def _prompts(prompt: Any, limits: RequestLimits) -> list[dict]:
    """`prompt`: a string, a list of token ids, or a list of either (one choice per prompt)."""
    def is_ids(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                               for t in value)

    if isinstance(prompt, str) or is_ids(prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) or is_ids(p) for p in prompt):
        raise APIError(400, "prompt must be a string, a non-empty list of token ids, or a list of either",
                       param="prompt")
    if len(prompt) > limits.max_prompts_per_request:
        raise limit_error(f"{len(prompt)} prompts in one request, over the limit of {limits.max_prompts_per_request}",
                          "max_prompts_per_request", param="prompt")
    size = sum(len(p) for p in prompt)
    if size > limits.max_prompt_chars:
        raise limit_error(f"the prompts have {size} characters or tokens, over the limit of {limits.max_prompt_chars}",
                          "max_prompt_chars", param="prompt")
    for ids in (p for p in prompt if not isinstance(p, str)):
        bad = next((t for t in ids if not 0 <= t < limits.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"prompt token ids must be in [0, {limits.vocab_size}) (the vocabulary), got "
                           f"{str(bad)[:50]}", param="prompt")
    return [{"text": p} if isinstance(p, str) else {"prompt_token_ids": p} for p in prompt]


def parse_completion_request(body: Any, served_models: tuple[str, ...], limits: RequestLimits) -> CompletionRequest:
    """/v1/completions: a prompt continued as it is (no chat template), with the chat endpoint's parameters."""
    model = _model(body, served_models)
    prompts = _prompts(body.get("prompt"), limits)
    if body.get("echo"):
        raise APIError(400, "echo is not supported", param="echo")
    if body.get("suffix"):
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.get("logprobs") is not None:
        raise APIError(400, "logprobs are not supported", param="logprobs")
    if _integer(body, "best_of", 1) not in (None, 1):
        raise APIError(400, "only best_of=1 is supported", param="best_of")
    params, stream, include_usage = _generation(body, limits, COMPLETION_DEFAULT_MAX_TOKENS)
    return CompletionRequest(model, prompts, params, stream, include_usage)


# ---- responses ----
def completion_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(*outputs: Any) -> dict:
    """The usage object of one or more outputs (a text completion's choices add up)."""
    prompt = sum(output.num_prompt_tokens for output in outputs)
    completion = sum(len(output.token_ids) for output in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(output.num_cached_tokens for output in outputs)},
            "image_tiles": sum(output.num_image_tiles for output in outputs)}


def completion(request_id: str, model: str, output: Any) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": output.text},
                         "logprobs": None, "finish_reason": output.finish_reason}],
            "usage": usage(output)}


def chunk(request_id: str, model: str, created: int, delta: dict | None, finish_reason: str | None = None,
          usage_: dict | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def text_completion(request_id: str, model: str, outputs: list) -> dict:
    """/v1/completions' response: one choice per prompt, in order."""
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": output.text, "logprobs": None, "finish_reason": output.finish_reason}
                        for index, output in enumerate(outputs)],
            "usage": usage(*outputs)}


def text_chunk(request_id: str, model: str, created: int, index: int | None, text: str = "",
               finish_reason: str | None = None, usage_: dict | None = None) -> dict:
    """A /v1/completions stream event; index None: the final usage event (no choices)."""
    choices = [] if index is None else [{"index": index, "text": text, "logprobs": None,
                                         "finish_reason": finish_reason}]
    body = {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body
