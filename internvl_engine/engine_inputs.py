"""Turn an engine request (prompt or OpenAI-style messages, images, per-request max_tiles) into token ids,
image spans and pixel values. Every problem raises a ValueError (ImageLoadError for images) naming it."""
from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from PIL import Image

from .config import InternVLConfig
from .image_processor import ImageLoadError, ImageTooLargeError, image_to_pixel_values, open_rgb_image
from .image_tiling import check_tiling_args, plan_tiles
from .prompt import (IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, build_prompt, expand_image_placeholders,
                     prepare_chat_query)
from .request import ImageSpan
from .tokenizer import InternLM2Tokenizer


@dataclass
class ProcessedInput:
    prompt_token_ids: list[int]
    images: list[ImageSpan]
    pixel_values: dict[str, torch.Tensor]  # content hash -> [tiles, 3, 448, 448]


def _messages_to_turns(messages: Sequence[Mapping[str, Any]]) -> tuple[str | None, list[tuple[str, str]], str, list]:
    """OpenAI messages -> (system, history pairs, last user text, images in order). Image parts become <image>."""
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
    if pending is None:
        raise ValueError("the last message must be from the user")
    return system, turns, pending, images


def decode_data_url(url: str, max_bytes: int | None = None) -> bytes:
    """The bytes of a `data:<mime>;base64,<payload>` URL; ImageTooLargeError past `max_bytes` (checked before
    decoding), ImageLoadError for anything malformed."""
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ImageLoadError("an image data URL must look like data:image/png;base64,<base64 bytes>")
    if max_bytes is not None and len(payload) * 3 // 4 > max_bytes + 2:
        raise ImageTooLargeError(f"the image is about {len(payload) * 3 // 4} bytes, over the limit of {max_bytes}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageLoadError(f"invalid base64 in the image data URL ({err})") from None
    if not data:
        raise ImageLoadError("the image data URL is empty")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageTooLargeError(f"the image is {len(data)} bytes, over the limit of {max_bytes}")
    return data


def _decode_image_source(source: Any) -> Any:
    """data: URLs become bytes; paths, bytes and PIL images pass through."""
    if isinstance(source, str) and source.startswith("data:"):
        return decode_data_url(source)
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        raise ImageLoadError("http(s) image URLs are not fetched; send the image bytes (a data URL) instead")
    return source


def _content_hash(image: Image.Image, num_tiles: int) -> str:
    digest = hashlib.sha256()
    digest.update(f"{image.width}x{image.height}:{num_tiles}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def process_request(request: Mapping[str, Any] | str, tokenizer: InternLM2Tokenizer, config: InternVLConfig,
                    template: str, system_message: str, max_pixels: int | None) -> ProcessedInput:
    """One chat turn like `model.chat(..., history=None)` (or the turns of `messages`), tokenised."""
    request = {"prompt": request} if isinstance(request, str) else dict(request)
    max_tiles = request.get("max_tiles", config.max_dynamic_patch)
    if "prompt_token_ids" in request:
        return ProcessedInput(list(request["prompt_token_ids"]), [], {})
    if "messages" in request:
        system, history, question, sources = _messages_to_turns(request["messages"])
        system = system if system is not None else system_message
    else:
        if "prompt" not in request:
            raise ValueError("a request needs 'prompt', 'messages' or 'prompt_token_ids'")
        question, history, system = request["prompt"], None, system_message
        sources = list(request.get("images") or [])
    try:
        check_tiling_args(1, int(max_tiles), config.image_size)
    except (ValueError, TypeError) as err:
        raise ValueError(f"max_tiles: {err}") from None
    pixel_values, tiles_per_image, hashes = {}, [], []
    for source in sources:
        image = open_rgb_image(_decode_image_source(source), max_pixels=max_pixels)
        plan = plan_tiles(image.width, image.height, 1, int(max_tiles), config.image_size, config.use_thumbnail)
        key = _content_hash(image, plan.num_tiles)
        if key not in pixel_values:
            pixel_values[key] = image_to_pixel_values(image, plan, config.image_size)
        tiles_per_image.append(plan.num_tiles)
        hashes.append(key)
    if history:
        query = build_prompt(template, question, history, system)
        query = expand_image_placeholders(query, tiles_per_image, config.num_image_token)
    else:
        query, _ = prepare_chat_query(template, question, None, tiles_per_image, system_message=system,
                                      num_image_token=config.num_image_token, has_images=bool(sources))
    ids = tokenizer.encode(query)
    context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    spans, position = [], 0
    for key, tiles in zip(hashes, tiles_per_image):
        offset = ids.index(context_id, position)
        count = tiles * config.num_image_token
        spans.append(ImageSpan(offset=offset, num_tokens=count, num_tiles=tiles, content_hash=key))
        position = offset + count
    return ProcessedInput(ids, spans, pixel_values)
