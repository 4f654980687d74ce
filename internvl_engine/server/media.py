"""Image URLs in messages -> image bytes, under the server's policy (sizes, local folder, remote fetching).

data: URLs (base64) are always accepted. file:// URLs and plain paths only inside `allowed_local_media_path`
(symlinks resolved first). http(s) URLs are refused unless `allow_remote` is set: a server fetching on a
client's behalf can be made to reach internal hosts, so even then `remote_fetch` refuses private, loopback,
link-local and multicast addresses (unless `allow_private_addresses`), follows no redirect and answers every
network failure with one uniform message. Runs in the preprocessing pool (file reads, remote fetches).
"""
from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from ..engine.input_processor import decode_data_url
from ..preprocessing.image_io import ImageLoadError, ImageTooLargeError
from .errors import APIError, flag
from .remote_fetch import RemoteFetchError, RemoteFetchPolicy, fetch_url

MAX_PATH_CHARS = 4096


@dataclass(frozen=True)
class MediaPolicy:
    max_image_bytes: int = 32 << 20  # one encoded image
    allowed_local_media_path: Path | None = None
    allow_remote: bool = False
    remote_timeout_s: float = 10.0
    allow_private_addresses: bool = False  # remote URLs resolving to internal addresses (internal deployments)


def _too_large(size: int, policy: MediaPolicy, where: str) -> APIError:
    return APIError(413, f"{where}: the image is {size} bytes, over the limit of {policy.max_image_bytes} bytes "
                    "(--max-image-bytes)", param="messages", code="image_too_large", limit="max_image_bytes")


def _from_data_url(url: str, policy: MediaPolicy, where: str) -> bytes:
    try:
        return decode_data_url(url, policy.max_image_bytes)
    except ImageTooLargeError as err:
        raise APIError(413, f"{where}: {err} ({flag(err.limit)})", param="messages", code="image_too_large",
                       limit=err.limit) from None
    except ImageLoadError as err:
        raise APIError(400, f"{where}: {err}", param="messages", code="invalid_image") from None


def _from_local_path(url: str, policy: MediaPolicy, where: str) -> bytes:
    if policy.allowed_local_media_path is None:
        raise APIError(400, f"{where}: local image paths are not allowed on this server (start it with "
                       "--allowed-local-media-path DIR); send the image as a base64 data URL", param="messages")
    raw = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file://") else url
    if "\0" in raw or len(raw) > MAX_PATH_CHARS:
        raise APIError(400, f"{where}: invalid local image path (a NUL byte, or over {MAX_PATH_CHARS} characters)",
                       param="messages", code="invalid_image")
    root = policy.allowed_local_media_path.resolve()
    try:
        path = Path(raw).resolve()
        inside = path.is_relative_to(root)
        is_file = inside and path.is_file()
        size = path.stat().st_size if is_file else 0
    except (OSError, ValueError, RuntimeError):  # a name too long for the OS, a symlink loop
        raise APIError(400, f"{where}: invalid local image path {raw[:200]!r}", param="messages",
                       code="invalid_image") from None
    if not inside:
        raise APIError(400, f"{where}: {raw[:200]!r} is outside the allowed media folder", param="messages")
    if not is_file:
        raise APIError(400, f"{where}: image file not found: {raw[:200]!r}", param="messages", code="invalid_image")
    if size > policy.max_image_bytes:
        raise _too_large(size, policy, where)
    try:
        return path.read_bytes()
    except OSError:
        raise APIError(400, f"{where}: cannot read {raw[:200]!r}", param="messages", code="invalid_image") from None


def _from_remote(url: str, policy: MediaPolicy, where: str) -> bytes:
    if not policy.allow_remote:
        raise APIError(400, f"{where}: http(s) image URLs are not fetched by this server (start it with "
                       "--allow-remote-images to allow it); send the image as a base64 data URL", param="messages",
                       code="remote_images_disabled")
    try:
        return fetch_url(url, RemoteFetchPolicy(max_bytes=policy.max_image_bytes, timeout_s=policy.remote_timeout_s,
                                                allow_private_addresses=policy.allow_private_addresses))
    except RemoteFetchError as err:
        if err.status == 413:
            raise APIError(413, f"{where}: {err.message} (--max-image-bytes)", param="messages",
                           code="image_too_large", limit="max_image_bytes") from None
        raise APIError(err.status, f"{where}: {err.message}", param="messages", code="invalid_image") from None


def resolve_image(url: str, policy: MediaPolicy, where: str = "image") -> bytes:
    if url.startswith("data:"):
        return _from_data_url(url, policy, where)
    if url.startswith(("http://", "https://")):
        return _from_remote(url, policy, where)
    if url.startswith("file://") or "://" not in url:
        return _from_local_path(url, policy, where)
    raise APIError(400, f"{where}: unsupported image URL scheme in {url[:40]!r} (data:, http(s): or a local path)",
                   param="messages")


def resolve_messages(messages: list[dict], policy: MediaPolicy) -> list[dict]:
    """Messages with every image_url part replaced by {"type": "image", "image": bytes} (engine input)."""
    resolved, count = [], 0
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part["type"] == "image_url":
                    url = part["image_url"]["url"] if isinstance(part["image_url"], dict) else part["image_url"]
                    count += 1
                    part = {"type": "image", "image": resolve_image(url, policy, f"image {count}")}
                parts.append(part)
            message = {**message, "content": parts}
        resolved.append(message)
    return resolved
