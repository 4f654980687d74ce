"""Turn an engine request into token ids, image spans and what the ViT needs (or the features it made).

A request is one of (a plain string is a "prompt"):
- {"prompt": question, "images": [paths, bytes, PIL images, data URLs], "max_tiles": n}: one chat turn, built
  as `model.chat(..., history=None)` builds it;
- {"messages": OpenAI-style messages, "max_tiles": n}: the conversation's turns, images where they stand;
- either with "videos" (prompt) or video parts (messages): each video's sampled frames become images named
  `Frame1: <image>\\n...` as the model cards name them ("num_frames", "max_tiles_per_frame"; preprocessing/video.py);
- {"text": string}: a prompt tokenised as it is, with no chat template (the tokenizer adds BOS): /v1/completions;
- {"prompt_token_ids": ids, "pixel_values": [[tiles, 3, S, S] per image], "left_padding": n}: a tokenised
  prompt whose `<IMG_CONTEXT>` runs are filled, in order, by the images' tiles (256 tokens each), or by
  "image_features" ([tokens, hidden] per image, ViT already run). `left_padding` is the padding the prompt
  would have in an official left-padded batch (see Request.rope_length_offset). This is what `model.chat`
  and `batch_chat` submit.
Every problem raises a ValueError (ImageLoadError for images) naming it. Work is bounded before it is done
(`InputLimits`): the image count and the prompt's characters before anything else, each image's size from
its header, and the prompt's length in tokens (images included) before any image is decoded.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from PIL import Image

from ..config import InternVLConfig
from ..preprocessing.data_url import data_url_bytes
from ..preprocessing.cpu import image_to_pixel_values
from ..preprocessing.device import HostImage, host_image
from ..preprocessing.image_io import ImageLimits, ImageLoadError, ImageTooLargeError, OpenedImage, open_image
from ..preprocessing.tiling import TilePlan, check_tiling_args, plan_tiles
from ..preprocessing.video import (VideoFrameSlot, VideoLimits, add_request_videos, add_video_part, max_tiles_of,
                                   num_images)
from ..text.templates import (IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, build_prompt, expand_image_placeholders,
                              prepare_chat_query)
from ..text.llama_tokenizer import Tokenizer
from .errors import InputLimitError
from .request import ImageSpan


@dataclass(frozen=True)
class InputLimits:
    """Work one request may ask for, refused before it is done (None: no limit)."""

    image: ImageLimits = field(default_factory=ImageLimits)
    max_images: int | None = 16  # images per request
    max_prompt_chars: int | None = 1 << 20  # characters of all the request's text (1M: ~250K tokens)
    video: VideoLimits = field(default_factory=VideoLimits)  # each video, and videos per request


@dataclass
class ProcessedInput:
    prompt_token_ids: list[int]
    images: list[ImageSpan]
    # content hash -> [tiles, 3, 448, 448] for the ViT, or (device_preprocessing) the decoded image they come from
    pixel_values: dict[str, torch.Tensor | HostImage]
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # content hash -> [tokens, hidden], given
    left_padding: int = 0


def _messages_to_turns(messages: Sequence[Mapping[str, Any]], request: Mapping[str, Any] | None = None
                       ) -> tuple[str | None, list[tuple[str, str]], str | None, list]:
    """OpenAI messages -> (system, history pairs, last user text, images in order). Image parts become <image>.

    The last user text is None when the conversation ends with an assistant message or has only a system
    message: the model then answers after the open assistant role (as OpenAI and vLLM's generation prompt do)."""
    system, turns, images, pending = None, [], [], None
    if not messages:
        raise ValueError("messages must be a non-empty list")
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "text":
                    parts.append(part.get("text", ""))
                elif part.get("type") in ("image", "image_url"):
                    url = part.get("image_url", {}).get("url") if part.get("type") == "image_url" else part.get("image")
                    images.append(url)
                    parts.append(IMAGE_PLACEHOLDER + "\n")
                elif part.get("type") in ("video", "video_url"):  # its frames, each an image, named Frame1: ...
                    parts.append(add_video_part(part, images, request or {}))
                else:
                    raise ValueError(f"unsupported message content part type {part.get('type')!r}")
            text = "".join(parts)
        else:
            raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")
        if role == "system":
            system = text
        elif role == "user":
            if pending is not None:
                raise ValueError("two user messages in a row: expected user/assistant turns")
            pending = text
        elif role == "assistant":
            if pending is None:
                raise ValueError("an assistant message must follow a user message")
            turns.append((pending, text))
            pending = None
        else:
            raise ValueError(f"unknown message role {role!r}")
    return system, turns, pending, images


def decode_data_url(url: str, max_bytes: int | None = None) -> bytes:
    """The bytes of a `data:<mime>;base64,<payload>` URL; ImageTooLargeError past `max_bytes` (checked before
    decoding), ImageLoadError for anything malformed."""
    return data_url_bytes(url, "image", "data:image/png;base64,<base64 bytes>", max_bytes, ImageLoadError,
                          lambda message: ImageTooLargeError(message, "max_image_bytes"))


def _decode_image_source(source: Any) -> Any:
    """data: URLs become bytes; paths, bytes and PIL images pass through."""
    if isinstance(source, str) and source.startswith("data:"):
        return decode_data_url(source)
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        raise ImageLoadError("http(s) image URLs are not fetched; send the image bytes (a data URL) instead")
    return source


def _content_hash(image: Image.Image, num_tiles: int, packed: bytes | None = None) -> str:
    """The image's cache key; `packed`, if given, is `image.tobytes()` already made (the same key either way)."""
    digest = hashlib.sha256()
    digest.update(f"{image.width}x{image.height}:{num_tiles}:".encode())
    digest.update(image.tobytes() if packed is None else packed)
    return digest.hexdigest()


def _add_image(pixel_values: dict[str, torch.Tensor | HostImage], image: Image.Image, plan: TilePlan,
               image_size: int, on_device: bool) -> str:
    """Hash a decoded RGB image and, unless an equal one is in `pixel_values` already, add what the ViT takes:
    its float32 tiles (the CPU path), or with `on_device` its uint8 pixels as a HostImage for the engine to tile
    on its device (one `tobytes()` serves the hash and the upload buffer). Returns the content hash, the same
    on both paths."""
    if not on_device:
        key = _content_hash(image, plan.num_tiles)
        if key not in pixel_values:
            pixel_values[key] = image_to_pixel_values(image, plan, image_size)
        return key
    packed = image.tobytes()
    key = _content_hash(image, plan.num_tiles, packed)
    if key not in pixel_values:
        pixel_values[key] = host_image(packed, image.width, image.height, plan, image_size)
    return key


def tensor_hash(tensor: torch.Tensor) -> str:
    """Content hash of a tensor (shape, dtype and bytes): the cache key of pre-tiled pixels or given features."""
    data = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{tuple(data.shape)}:{data.dtype}:".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def image_spans(ids: Sequence[int], context_id: int, tokens_per_image: Sequence[int], hashes: Sequence[str],
                num_image_token: int) -> list[ImageSpan]:
    """Images fill the `<IMG_CONTEXT>` tokens of `ids` in order, each a contiguous run of its own tokens."""
    total = sum(1 for token in ids if token == context_id)
    if total != sum(tokens_per_image):
        raise ValueError(f"the prompt has {total} {IMG_CONTEXT_TOKEN} tokens but the images give "
                         f"{sum(tokens_per_image)} visual tokens ({sum(tokens_per_image) // num_image_token} tiles)")
    spans, position = [], 0
    for key, count in zip(hashes, tokens_per_image):
        offset = ids.index(context_id, position)
        if any(token != context_id for token in ids[offset: offset + count]):
            raise ValueError(f"an image's {count} visual tokens must be one contiguous run of {IMG_CONTEXT_TOKEN} "
                             f"(the run at token {offset} is shorter)")
        spans.append(ImageSpan(offset=offset, num_tokens=count, num_tiles=max(count // num_image_token, 1),
                               content_hash=key))
        position = offset + count
    return spans


def _check_tensor(tensor: torch.Tensor, name: str) -> None:
    if not torch.is_floating_point(tensor) or not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} must be finite floating-point tensors (nan or inf found, or an integer dtype)")


def _tokenized_request(request: Mapping[str, Any], context_id: int, config: InternVLConfig,
                       limits: InputLimits) -> ProcessedInput:
    try:
        ids = [int(token) for token in request["prompt_token_ids"]]
    except (TypeError, ValueError, OverflowError):
        raise ValueError("prompt_token_ids must be a list of integers") from None
    vocab = config.llm.vocab_size
    if any(not 0 <= token < vocab for token in ids):
        raise ValueError(f"prompt_token_ids must be in [0, {vocab}) (the vocabulary), got "
                         f"{next(t for t in ids if not 0 <= t < vocab)}")
    padding = request.get("left_padding", 0)
    if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
        raise ValueError(f"left_padding must be a non-negative integer, got {padding!r}")
    pixel_values = list(request.get("pixel_values") or [])
    features = list(request.get("image_features") or [])
    if pixel_values and features:
        raise ValueError("give an image's pixel_values or its image_features, not both")
    _check_count(len(pixel_values) + len(features), limits)
    tensors, given = {}, {}
    tokens_per_image, hashes = [], []
    for tiles in pixel_values:
        if not isinstance(tiles, torch.Tensor) or tiles.dim() != 4 or tiles.shape[1] != config.vision.num_channels:
            raise ValueError(f"pixel_values must be [tiles, 3, H, W] tensors (from load_image), got "
                             f"{getattr(tiles, 'shape', type(tiles).__name__)}")
        _check_tensor(tiles, "pixel_values")
        key = tensor_hash(tiles)
        tensors[key] = tiles
        tokens_per_image.append(tiles.shape[0] * config.num_image_token)
        hashes.append(key)
    for encoded in features:
        if not isinstance(encoded, torch.Tensor) or encoded.dim() != 2 or encoded.shape[1] != config.llm.hidden_size:
            raise ValueError(f"image_features must be [visual tokens, {config.llm.hidden_size}] tensors, got "
                             f"{getattr(encoded, 'shape', type(encoded).__name__)}")
        _check_tensor(encoded, "image_features")
        key = "features:" + tensor_hash(encoded)
        given[key] = encoded
        tokens_per_image.append(encoded.shape[0])
        hashes.append(key)
    spans = image_spans(ids, context_id, tokens_per_image, hashes, config.num_image_token)
    return ProcessedInput(ids, spans, tensors, given, padding)


def _check_count(num_images: int, limits: InputLimits) -> None:
    if limits.max_images is not None and num_images > limits.max_images:
        raise InputLimitError(f"the request has {num_images} images, over the limit of {limits.max_images} per "
                              "request (max_images_per_request)", "max_images_per_request")


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise InputLimitError("preprocessing the request ran past its time limit", "preprocess_timeout_s")


def _text_request(text: Any, tokenizer: Tokenizer, context_id: int, config: InternVLConfig,
                  check_length: Callable[[int], None] | None) -> ProcessedInput:
    """A prompt string tokenised as it is: no chat template, BOS as the tokenizer adds it (/v1/completions)."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    ids = tokenizer.encode(text)
    if check_length is not None:
        check_length(len(ids))
    return ProcessedInput(ids, image_spans(ids, context_id, [], [], config.num_image_token), {})


def _text_chars(request: Mapping[str, Any]) -> int:
    if "text" in request:
        return len(request["text"]) if isinstance(request["text"], str) else 0
    if "messages" not in request:
        prompt = request.get("prompt")
        return len(prompt) if isinstance(prompt, str) else 0
    total = 0
    for message in request["messages"] if isinstance(request["messages"], (list, tuple)) else ():
        content = message.get("content") if isinstance(message, Mapping) else None
        parts = content if isinstance(content, list) else [{"text": content}]
        total += sum(len(part["text"]) for part in parts if isinstance(part, Mapping)
                     and isinstance(part.get("text"), str))
    return total


def _which_image(number: int, count: int) -> str:
    """"image 2 of 3" (errors name the image; a file's own message already holds its path)."""
    return f"image {number} of {count}" if count > 1 else f"image {number}"


def process_request(request: Mapping[str, Any] | str, tokenizer: Tokenizer, config: InternVLConfig,
                    template: str, system_message: str, limits: InputLimits = InputLimits(),
                    check_length: Callable[[int], None] | None = None,
                    deadline: float | None = None, device_preprocessing: bool = False) -> ProcessedInput:
    """One request (see the module's docstring), tokenised, its images opened and tiled.

    `check_length(num_prompt_tokens)` raises when the prompt (images included) is too long; it runs before any
    image is decoded. `deadline` (time.monotonic()) is checked between images: InputLimitError past it.
    `device_preprocessing`: images are decoded and planned but not tiled; each is kept as a `HostImage` (uint8)
    for the engine to tile on its device (EngineConfig.device_preprocessing). Content hashes do not change.
    """
    request = {"prompt": request} if isinstance(request, str) else dict(request)
    context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    if "prompt_token_ids" in request:
        return _tokenized_request(request, context_id, config, limits)
    chars = _text_chars(request)
    if limits.max_prompt_chars is not None and chars > limits.max_prompt_chars:
        raise InputLimitError(f"the request's text has {chars} characters, over the limit of "
                              f"{limits.max_prompt_chars} (max_prompt_chars)", "max_prompt_chars")
    if "text" in request:
        return _text_request(request["text"], tokenizer, context_id, config, check_length)
    max_tiles = request.get("max_tiles", config.max_dynamic_patch)
    if "messages" in request:
        system, history, question, sources = _messages_to_turns(request["messages"], request)
        system = system if system is not None else system_message
    else:
        if "prompt" not in request:
            raise ValueError("a request needs 'prompt', 'messages' or 'prompt_token_ids'")
        question, history, system = request["prompt"], None, system_message
        sources = list(request.get("images") or [])
        question, sources = add_request_videos(question, sources, request)  # "videos": frames among the images
    _check_count(num_images(sources, limits.video), limits)
    try:
        check_tiling_args(1, int(max_tiles), config.image_size)
    except (ValueError, TypeError) as err:
        raise ValueError(f"max_tiles: {err}") from None
    opened: list[OpenedImage | None] = []
    try:
        for number, source in enumerate(sources, 1):  # headers only: sizes checked, tiles planned, nothing decoded yet
            try:
                opened.append(source.open(limits.video, lambda: _check_deadline(deadline))
                              if isinstance(source, VideoFrameSlot)
                              else open_image(_decode_image_source(source), limits.image))
            except ImageLoadError as err:  # same type (and .limit), the message says which image
                err.args = (f"{_which_image(number, len(sources))}: {err}",)
                raise
        plans = [plan_tiles(*image.size, 1, max_tiles_of(image, int(max_tiles)), config.image_size,
                            config.use_thumbnail)
                 for image in opened]
        tiles_per_image = [plan.num_tiles for plan in plans]
        if history or question is None:
            query = build_prompt(template, question, history, system)
            query = expand_image_placeholders(query, tiles_per_image, config.num_image_token)
        else:
            query, _ = prepare_chat_query(template, question, None, tiles_per_image, system_message=system,
                                          num_image_token=config.num_image_token, has_images=bool(sources))
        ids = tokenizer.encode(query)
        if check_length is not None:
            check_length(len(ids))
        pixel_values, hashes = {}, []
        for index, (image, plan) in enumerate(zip(opened, plans)):
            _check_deadline(deadline)
            try:
                decoded = image.decode()
            except ImageLoadError as err:
                err.args = (f"{_which_image(index + 1, len(sources))}: {err}",)
                raise
            opened[index] = None
            hashes.append(_add_image(pixel_values, decoded, plan, config.image_size, device_preprocessing))
    finally:
        for image in opened:
            if image is not None:
                image.close()
    spans = image_spans(ids, context_id, [tiles * config.num_image_token for tiles in tiles_per_image], hashes,
                        config.num_image_token)
    return ProcessedInput(ids, spans, pixel_values)
