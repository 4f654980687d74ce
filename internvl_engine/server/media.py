"""Image and video URLs in messages -> their bytes, under the server's policy (sizes, local folder, remote fetching).

data: URLs (base64) are always accepted. file:// URLs and plain paths only inside `allowed_local_media_path`
(symlinks resolved first). http(s) URLs are refused unless `allow_remote` is set: a server fetching on a
client's behalf can be made to reach internal hosts, so even then `remote_fetch` refuses private, loopback,
link-local and multicast addresses (unless `allow_private_addresses`), follows no redirect and answers every
network failure with one uniform message. Videos (`video_url` parts) come as data: URLs or local paths under the
same folder rule, up to `max_video_bytes`; http(s) video URLs are not fetched. Runs in the preprocessing pool
(file reads, remote fetches).
"""
from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from ..engine.input_processor import decode_data_url
from ..preprocessing.image_io import ImageLoadError, ImageTooLargeError
from ..preprocessing.video import DEFAULT_MAX_VIDEO_BYTES, VideoLoadError, VideoTooLargeError, decode_video_data_url
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
    max_video_bytes: int = DEFAULT_MAX_VIDEO_BYTES  # one encoded video

    def max_bytes(self, kind: str) -> int:
        return self.max_video_bytes if kind == "video" else self.max_image_bytes


def _too_large(size: int, policy: MediaPolicy, where: str, kind: str = "image") -> APIError:
    return APIError(413, f"{where}: the {kind} is {size} bytes, over the limit of {policy.max_bytes(kind)} bytes "
                    f"(--max-{kind}-bytes)", param="messages", code=f"{kind}_too_large", limit=f"max_{kind}_bytes")


def _from_data_url(url: str, policy: MediaPolicy, where: str) -> bytes:
    try:
        return decode_data_url(url, policy.max_image_bytes)
    except ImageTooLargeError as err:
        raise APIError(413, f"{where}: {err} ({flag(err.limit)})", param="messages", code="image_too_large",
                       limit=err.limit) from None
    except ImageLoadError as err:
        raise APIError(400, f"{where}: {err}", param="messages", code="invalid_image") from None


def _from_local_path(url: str, policy: MediaPolicy, where: str, kind: str = "image") -> bytes:
    if policy.allowed_local_media_path is None:
        raise APIError(400, f"{where}: local {kind} paths are not allowed on this server (start it with "
                       f"--allowed-local-media-path DIR); send the {kind} as a base64 data URL", param="messages")
    raw = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file://") else url
    invalid = f"invalid_{kind}"
    if "\0" in raw or len(raw) > MAX_PATH_CHARS:
        raise APIError(400, f"{where}: invalid local {kind} path (a NUL byte, or over {MAX_PATH_CHARS} characters)",
                       param="messages", code=invalid)
    root = policy.allowed_local_media_path.resolve()
    try:
        path = Path(raw).resolve()
        inside = path.is_relative_to(root)
        is_file = inside and path.is_file()
        size = path.stat().st_size if is_file else 0
    except (OSError, ValueError, RuntimeError):  # a name too long for the OS, a symlink loop
        raise APIError(400, f"{where}: invalid local {kind} path {raw[:200]!r}", param="messages",
                       code=invalid) from None
    if not inside:
        raise APIError(400, f"{where}: {raw[:200]!r} is outside the allowed media folder", param="messages")
    if not is_file:
        raise APIError(400, f"{where}: {kind} file not found: {raw[:200]!r}", param="messages", code=invalid)
    if size > policy.max_bytes(kind):
        raise _too_large(size, policy, where, kind)
    try:
        return path.read_bytes()
    except OSError:
        raise APIError(400, f"{where}: cannot read {raw[:200]!r}", param="messages", code=invalid) from None


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


def resolve_video(url: str, policy: MediaPolicy, where: str = "video") -> bytes:
    """A video_url's bytes: a data: URL, or a local path inside --allowed-local-media-path; at most max_video_bytes."""
    if url.startswith("data:"):
        try:
            return decode_video_data_url(url, policy.max_video_bytes)
        except VideoTooLargeError as err:
            message = str(err).replace(f" ({err.limit})", "")
            raise APIError(413, f"{where}: {message} ({flag(err.limit)})", param="messages", code="video_too_large",
                           limit=err.limit) from None
        except VideoLoadError as err:
            raise APIError(400, f"{where}: {err}", param="messages", code="invalid_video") from None
    if url.startswith(("http://", "https://")):
        raise APIError(400, f"{where}: http(s) video URLs are not fetched by this server; send the video as a base64 "
                       "data URL (data:video/mp4;base64,...)", param="messages", code="invalid_video")
    if url.startswith("file://") or "://" not in url:
        return _from_local_path(url, policy, where, "video")
    raise APIError(400, f"{where}: unsupported video URL scheme in {url[:40]!r} (data: or a local path)",
                   param="messages", code="invalid_video")


VIDEO_OPTIONS = ("num_frames", "max_tiles_per_frame")  # carried from the request body onto each video part


def resolve_messages(messages: list[dict], policy: MediaPolicy) -> list[dict]:
    """Messages with every image_url part replaced by {"type": "image", "image": bytes} and every video_url part by
    {"type": "video", "video": bytes, plus its num_frames / max_tiles_per_frame} (engine input)."""
    resolved, count, videos = [], 0, 0
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part["type"] == "image_url":
                    url = part["image_url"]["url"] if isinstance(part["image_url"], dict) else part["image_url"]
                    count += 1
                    part = {"type": "image", "image": resolve_image(url, policy, f"image {count}")}
                elif part["type"] == "video_url":
                    videos += 1
                    video = resolve_video(part["video_url"]["url"], policy, f"video {videos}")
                    options = {name: part[name] for name in VIDEO_OPTIONS if name in part}
                    part = {"type": "video", "video": video, **options}
                parts.append(part)
            message = {**message, "content": parts}
        resolved.append(message)
    return resolved
