"""Videos as the InternVL chat models take them: a few frames, each tiled and normalised like an image.

The model cards' recipe (InternVL2's `load_video`, read in OpenGVLab/InternVL internvl_chat/README.md): decord
opens the clip (`len(vr)` frames at `vr.get_avg_fps()`), `get_index` picks the middle frame of each of
`num_segments` equal segments of the clip (or of `bound` = (start, end) seconds), each picked frame goes
through `dynamic_preprocess(use_thumbnail=True, max_num)` (one 448x448 tile with the default max_num=1) and
the transform, and the question names the frames `Frame1: <image>\\nFrame2: <image>\\n...`, with one
`num_patches_list` entry per frame.

PyAV decodes here (FFmpeg's libraries; no ffmpeg binary, no decord) and reproduces what decord gives: the
frame count is the number of the video stream's packets (decord counts them when it opens a file), the rate
is the stream's average frame rate (its guessed rate if it has none), frame i is the i-th frame in
presentation order, converted to RGB24 by libswscale, and a display-matrix rotation of 90, 180 or 270 degrees
is applied as decord applies it (tests/preprocessing/test_video.py compares with decord where it is
installed). Frames are picked by position while the clip is decoded from its start, never by seeking to a
timestamp (inexact). Tiles come from preprocessing.cpu, bit-identical to `load_image`'s for the same frame.

Work is bounded before it is done (`VideoLimits`): the bytes and, from the container header, the frame size,
duration and declared frame count; the frames counted (packets read, nothing decoded but the first frame)
before any other frame is decoded; decoding stops at the last frame sampled. Only ordinary containers are
opened (`VIDEO_FORMATS`): a playlist or concat list naming other files or URLs is refused. Every problem
raises `VideoLoadError` naming the input (`VideoTooLargeError`, with `.limit`, for the limits: HTTP 413).
"""
from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping, Sequence, Union

import torch
from PIL import Image

from ..text.templates import IMAGE_PLACEHOLDER
from .data_url import data_url_bytes

VideoSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

DEFAULT_NUM_FRAMES = 8  # the model cards' example samples 8 frames
DEFAULT_MAX_TILES_PER_FRAME = 1  # their max_num=1: one tile per frame
MAX_TILES_PER_FRAME = 40  # a request may ask for at most this many tiles per frame
FRAME_PROMPT = "Frame{number}: <image>\n"  # InternVL2's video_prefix, one line per frame
VIDEO_PLACEHOLDER = "<video>"  # in an engine request's prompt: where a video's frame list goes
# Demuxers of ordinary video files (FFmpeg's names; "mov,mp4,..." is one demuxer). Others (hls, concat, image2,
# ...) can read further files or URLs named inside the input, so they are never used.
VIDEO_FORMATS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpeg,mpegts,flv,ogg,asf"

DEFAULT_MAX_VIDEO_BYTES = 128 << 20
DEFAULT_MAX_VIDEO_DURATION_S = 600.0
DEFAULT_MAX_VIDEO_FRAMES = 64  # frames sampled from one video: 64 x 256 visual tokens at one tile each
DEFAULT_MAX_VIDEO_TOTAL_FRAMES = 36_000  # frames in one video (all are read): 10 minutes at 60 fps
DEFAULT_MAX_VIDEO_SIDE = 4096
DEFAULT_MAX_VIDEO_PIXELS = 4096 * 2304  # 4K (DCI 4096x2160, UHD 3840x2160) with a margin
DEFAULT_MAX_VIDEOS_PER_REQUEST = 4


class VideoLoadError(ValueError):
    """The video cannot be read, decoded or sampled, or a request's video is malformed; the message names it."""


class VideoTooLargeError(VideoLoadError):
    """A video, or a request's videos, exceed a limit (HTTP 413); `limit` names it: max_video_bytes,
    max_video_duration_s, max_video_total_frames, max_video_side, max_video_pixels, max_video_frames or
    max_videos_per_request (the engine options and server flags of the same names)."""

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


@dataclass(frozen=True)
class VideoLimits:
    """What one video (and one request's videos) may cost, refused before the work (None: no limit)."""

    max_bytes: int | None = DEFAULT_MAX_VIDEO_BYTES
    max_duration_s: float | None = DEFAULT_MAX_VIDEO_DURATION_S
    max_frames: int | None = DEFAULT_MAX_VIDEO_FRAMES  # frames sampled from one video (num_frames)
    max_total_frames: int | None = DEFAULT_MAX_VIDEO_TOTAL_FRAMES  # frames in one video
    max_side: int | None = DEFAULT_MAX_VIDEO_SIDE
    max_pixels: int | None = DEFAULT_MAX_VIDEO_PIXELS  # of one frame
    max_videos: int | None = DEFAULT_MAX_VIDEOS_PER_REQUEST

    def check_size(self, width: int, height: int, name: str) -> None:
        if width < 1 or height < 1:
            raise VideoLoadError(f"{name}: the video's frames are empty ({width}x{height})")
        if self.max_side is not None and max(width, height) > self.max_side:
            raise VideoTooLargeError(f"{name}: the video is {width}x{height}, a side over the limit of {self.max_side} "
                                     "pixels (max_video_side)", "max_video_side")
        if self.max_pixels is not None and width * height > self.max_pixels:
            raise VideoTooLargeError(f"{name}: the video's frames have {width}x{height} = {width * height} pixels, "
                                     f"over the limit of {self.max_pixels} (max_video_pixels)", "max_video_pixels")

    def check_duration(self, seconds: float | None, name: str) -> None:
        if seconds is not None and self.max_duration_s is not None and seconds > self.max_duration_s:
            raise VideoTooLargeError(f"{name}: the video lasts {seconds:.1f} s, over the limit of "
                                     f"{self.max_duration_s:g} s (max_video_duration_s)", "max_video_duration_s")

    def check_total_frames(self, frames: int, name: str, at_least: bool = False) -> None:
        if self.max_total_frames is not None and frames > self.max_total_frames:
            count = f"more than {self.max_total_frames}" if at_least else str(frames)
            raise VideoTooLargeError(f"{name}: the video has {count} frames, over the limit of "
                                     f"{self.max_total_frames} (max_video_total_frames)", "max_video_total_frames")

    def check_sampled(self, num_frames: int, name: str = "the video") -> None:
        if self.max_frames is not None and num_frames > self.max_frames:
            raise VideoTooLargeError(f"{name}: {num_frames} frames asked for, over the limit of {self.max_frames} "
                                     "frames per video (max_video_frames)", "max_video_frames")


NO_LIMITS = VideoLimits(None, None, None, None, None, None, None)


def frame_indices(total_frames: int, fps: float | None, num_segments: int,
                  bound: Sequence[float] | None = None, first_idx: int = 0) -> list[int]:
    """The model cards' `get_index(bound, fps, max_frame=total_frames - 1, first_idx, num_segments)`: the middle
    frame of each of `num_segments` equal segments of [start, end] (`bound` in seconds; the whole clip by
    default, as their (-100000, 100000)). Python's `round` is numpy's (half to even) on these floats, and the
    sum is formed in their order, so the indices are theirs. A short clip repeats frames, as theirs does.
    `fps` None (a stream without a frame rate) is only allowed without `bound`: then the whole clip."""
    if not isinstance(num_segments, int) or isinstance(num_segments, bool) or num_segments < 1:
        raise VideoLoadError(f"num_segments must be a positive integer, got {num_segments!r}")
    if total_frames < 1:
        raise VideoLoadError("the video has no frames")
    if bound:
        start, end = _check_bound(bound)
        if fps is None:
            raise VideoLoadError("the video has no frame rate, so a time bound cannot be applied")
        start_idx = max(first_idx, round(start * fps))
        end_idx = min(round(end * fps), total_frames - 1)
        if start_idx > end_idx:
            raise VideoLoadError(f"bound {list(bound)} starts after the video's last frame (frame {total_frames - 1} "
                                 f"at {(total_frames - 1) / fps:.3f} s)")
    elif fps is None:
        start_idx, end_idx = first_idx, total_frames - 1
    else:
        start_idx = max(first_idx, round(-100000 * fps))
        end_idx = min(round(100000 * fps), total_frames - 1)
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + (seg_size / 2) + round(seg_size * idx)) for idx in range(num_segments)]


def _check_bound(bound: Sequence[float]) -> tuple[float, float]:
    try:
        start, end = (float(value) for value in bound)
    except (TypeError, ValueError):
        raise VideoLoadError(f"bound must be (start, end) in seconds, got {bound!r:.80}") from None
    if not (math.isfinite(start) and math.isfinite(end)) or end <= start:
        raise VideoLoadError(f"bound must be (start, end) in seconds with start < end, got {list(bound)}")
    return start, end


def _import_av() -> Any:
    try:
        import av
    except ImportError:
        raise VideoLoadError("reading videos needs PyAV: pip install 'internvl-engine[video]' (or: pip install av)") \
            from None
    return av


def _read_source(source: VideoSource, max_bytes: int | None) -> tuple[Path | bytes, str]:
    """A path (kept: FFmpeg reads the file) or the bytes of the video, and a name for messages."""
    def check(size: int, name: str) -> None:
        if max_bytes is not None and size > max_bytes:
            raise VideoTooLargeError(f"{name}: the video is {size} bytes, over the limit of {max_bytes} "
                                     "(max_video_bytes)", "max_video_bytes")

    if isinstance(source, (str, os.PathLike)):
        text = str(os.fspath(source))
        if "\0" in text or len(text) > 4096:
            raise VideoLoadError(f"invalid video path (a NUL byte, or over 4096 characters): {text[:80]!r}")
        path, name = Path(text), repr(text[:300])
        try:
            size = path.stat().st_size if path.is_file() else None
        except (OSError, ValueError):
            size = None
        if size is None:
            raise VideoLoadError(f"video file not found (or not a file): {name}")
        check(size, name)
        return path, name
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = f"<{len(data)} bytes>"
    elif hasattr(source, "read"):
        name = repr(getattr(source, "name", "<file object>"))
        data = source.read() if max_bytes is None else source.read(max_bytes + 1)
        if not isinstance(data, bytes):
            raise VideoLoadError(f"{name}: a video file object must be opened in binary mode")
    else:
        raise VideoLoadError(f"a video must be a path, bytes, a data URL or a binary file object, got "
                             f"{type(source).__name__}")
    if not data:
        raise VideoLoadError(f"{name}: the video is empty")
    check(len(data), name)
    return data, name


def _rate(value: Any) -> float | None:
    """A stream rate (Fraction, AVRational or None) as a positive float, or None when unset."""
    try:
        rate = float(value) if value else None
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None
    return rate if rate is not None and math.isfinite(rate) and rate > 0 else None


def _duration_s(container: Any, stream: Any) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration and container.duration > 0:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


_ROTATIONS = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}


class OpenedVideo:
    """A video whose header was checked and whose frames were counted; `frame(i)` decodes up to frame i.

    Frames are asked for in non-decreasing order (a sample's order): the clip is decoded once, from the start.
    `close()` stops decoding and releases the file (idempotent)."""

    def __init__(self, data: Path | bytes, name: str, width: int, height: int, rotation: int, total_frames: int,
                 fps: float | None, check_deadline: Callable[[], None] | None) -> None:
        self._data, self.name = data, name
        self.width, self.height = (height, width) if rotation in (90, 270) else (width, height)
        self.rotation, self.total_frames, self.fps = rotation, total_frames, fps
        self._check_deadline = check_deadline
        self._decoder: Iterator[tuple[int, Any]] | None = None
        self._last: tuple[int, Image.Image] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the frames as shown (after rotation)."""
        return self.width, self.height

    def sample(self, num_segments: int, bound: Sequence[float] | None = None) -> list[int]:
        return frame_indices(self.total_frames, self.fps, num_segments, bound)

    def frame(self, index: int) -> Image.Image:
        """Frame `index` (presentation order) as an RGB image, decoding forward from the last one asked for."""
        if self._last is not None and self._last[0] == index:
            return self._last[1]
        if self._last is not None and index < self._last[0]:
            raise ValueError(f"frames must be asked for in order: {index} after {self._last[0]}")
        if not 0 <= index < self.total_frames:
            raise VideoLoadError(f"{self.name}: frame {index} is outside the video's {self.total_frames} frames")
        if self._decoder is None:
            self._decoder = self._decode()
        for position, frame in self._decoder:
            if position == index:
                image = Image.fromarray(frame.to_ndarray(format="rgb24"))  # decord's RGB24, byte for byte
                if self.rotation in _ROTATIONS:
                    image = image.transpose(_ROTATIONS[self.rotation])
                self._last = (index, image)
                return image
        raise VideoLoadError(f"{self.name}: frame {index} could not be decoded (the video lists "
                             f"{self.total_frames} frames; is it corrupt or truncated?)")

    def _decode(self) -> Iterator[tuple[int, Any]]:
        av = _import_av()
        container = _open_container(av, self._data, self.name)
        try:
            stream = container.streams.video[0]
            stream.codec_context.thread_type = "AUTO"  # frame threads: the same frames, sooner
            for position, frame in enumerate(container.decode(stream)):
                if self._check_deadline is not None and position % 16 == 0:
                    self._check_deadline()
                yield position, frame
        except av.FFmpegError as err:
            raise VideoLoadError(f"{self.name}: cannot decode the video (corrupt or truncated?): {_reason(err)}") \
                from None
        finally:
            container.close()

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()  # GeneratorExit in _decode: its container closes
        self._data, self._last = b"", None


def _open_container(av: Any, data: Path | bytes, name: str) -> Any:
    try:
        return av.open(str(data) if isinstance(data, Path) else io.BytesIO(data), mode="r",
                       options={"format_whitelist": VIDEO_FORMATS})
    except av.FFmpegError as err:
        if isinstance(err, av.error.ArgumentError):  # a demuxer outside VIDEO_FORMATS recognised the input
            raise VideoLoadError(f"{name}: not a video file of a supported container ({VIDEO_FORMATS})") from None
        raise VideoLoadError(f"{name}: not a video, or one that cannot be read ({_reason(err)})") from None


def _reason(err: Exception) -> str:
    """FFmpeg's words for an error, without PyAV's errno and file name."""
    return getattr(err, "strerror", None) or str(err)


def open_video(source: VideoSource, limits: VideoLimits | None = VideoLimits(),
               check_deadline: Callable[[], None] | None = None) -> OpenedVideo:
    """Read a video's header and count its frames (a path, bytes or a binary file object), checking `limits`
    (None: none) before the work each bounds. `check_deadline()` is called now and then; it raises to stop."""
    limits = limits if limits is not None else NO_LIMITS
    av = _import_av()
    data, name = _read_source(source, limits.max_bytes)
    with _open_container(av, data, name) as container:
        if not container.streams.video:
            raise VideoLoadError(f"{name}: the file has no video stream")
        stream = container.streams.video[0]
        limits.check_size(stream.codec_context.width, stream.codec_context.height, name)
        fps = _rate(stream.average_rate) or _rate(stream.guessed_rate)
        duration = _duration_s(container, stream)
        limits.check_duration(duration, name)
        limits.check_total_frames(max(stream.frames, round(duration * fps) if duration and fps else 0), name)
        count, first = 0, None
        try:
            for packet in container.demux(stream):
                if not packet.size:  # the flush packet at the end
                    continue
                count += 1
                if count % 256 == 0:
                    limits.check_total_frames(count, name, at_least=True)
                    if check_deadline is not None:
                        check_deadline()
                if first is None:  # only the first frame is decoded: its size and rotation as shown
                    first = next(iter(packet.decode()), None)
            if first is None and count:
                first = next(iter(stream.codec_context.decode(None)), None)  # a decoder that holds frames back
        except av.FFmpegError as err:
            raise VideoLoadError(f"{name}: cannot read the video (corrupt or truncated?): {_reason(err)}") from None
    limits.check_total_frames(count, name)
    if count == 0 or first is None:
        raise VideoLoadError(f"{name}: the video has no decodable frames")
    limits.check_size(first.width, first.height, name)
    if duration is None and fps is not None:
        limits.check_duration(count / fps, name)
    rotation = int((-getattr(first, "rotation", 0)) % 360)  # decord's: clockwise degrees of the display matrix
    return OpenedVideo(data, name, first.width, first.height, rotation, count, fps, check_deadline)


def load_video(video: VideoSource, num_segments: int = DEFAULT_NUM_FRAMES, max_num: int = DEFAULT_MAX_TILES_PER_FRAME,
               bound: Sequence[float] | None = None, input_size: int = 448, *,
               limits: VideoLimits | None = VideoLimits(), workers: int | None = None
               ) -> tuple[torch.Tensor, list[int]]:
    """The model cards' `load_video`: (pixel_values float32 [tiles, 3, S, S], num_patches_list), one entry per
    sampled frame, each frame tiled exactly as `load_image` tiles an image (use_thumbnail=True, up to `max_num`
    tiles). Ask about the video with `"".join(f"Frame{i + 1}: <image>\\n" for i in ...) + question` and pass
    num_patches_list to `chat`. Raises VideoLoadError (VideoTooLargeError for `limits`)."""
    from .cpu import image_to_pixel_values
    from .tiling import check_tiling_args, plan_tiles

    try:
        check_tiling_args(1, max_num, input_size)
    except ValueError as err:
        raise VideoLoadError(str(err)) from None
    if limits is not None:
        limits.check_sampled(num_segments)
    opened = open_video(video, limits)
    try:
        tiles = []
        for index in opened.sample(num_segments, bound):
            image = opened.frame(index)
            plan = plan_tiles(image.width, image.height, 1, max_num, input_size, use_thumbnail=True)
            tiles.append(image_to_pixel_values(image, plan, input_size, workers=workers))
    finally:
        opened.close()
    return torch.cat(tiles), [frame.shape[0] for frame in tiles]


def decode_video_data_url(url: str, max_bytes: int | None = None) -> bytes:
    """The bytes of a `data:video/...;base64,...` URL; VideoTooLargeError past `max_bytes` (checked before
    decoding the base64), VideoLoadError for anything malformed."""
    return data_url_bytes(url, "video", "data:video/mp4;base64,<base64 bytes>", max_bytes, VideoLoadError,
                          lambda message: VideoTooLargeError(f"{message} (max_video_bytes)", "max_video_bytes"))


# ---- engine requests: a video is its sampled frames, each an image of the request ----

def frame_prompt(num_frames: int) -> str:
    """`Frame1: <image>\\nFrame2: <image>\\n...`: how the model cards name a video's frames in the question."""
    return "".join(FRAME_PROMPT.format(number=number) for number in range(1, num_frames + 1))


def _positive(options: Mapping[str, Any], name: str, default: int, high: int | None = None) -> int:
    value = options.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (high is not None and value > high):
        wanted = "a positive integer" if high is None else f"an integer between 1 and {high}"
        raise VideoLoadError(f"{name} must be {wanted}, got {value!r:.50}")
    return value


class VideoInput:
    """One video of a request: its source, how many frames to sample and the tiles of each; opened (header read,
    frames counted) when its first frame is, and decoded as its frames are, in order."""

    def __init__(self, source: Any, number: int, options: Mapping[str, Any],
                 fallback: Mapping[str, Any] | None = None) -> None:
        fallback = fallback or {}
        self.source, self.number = source, number
        self.num_frames = _positive(options, "num_frames", _positive(fallback, "num_frames", DEFAULT_NUM_FRAMES))
        self.max_tiles = _positive(options, "max_tiles_per_frame", _positive(
            fallback, "max_tiles_per_frame", DEFAULT_MAX_TILES_PER_FRAME, MAX_TILES_PER_FRAME), MAX_TILES_PER_FRAME)
        self.opened: OpenedVideo | None = None
        self.indices: list[int] = []

    def slots(self) -> list["VideoFrameSlot"]:
        return [VideoFrameSlot(self, position) for position in range(self.num_frames)]

    def open(self, limits: VideoLimits, check_deadline: Callable[[], None] | None) -> OpenedVideo:
        if self.opened is None:
            try:
                source = self.source
                if isinstance(source, str) and source.startswith("data:"):
                    source = decode_video_data_url(source, limits.max_bytes)
                elif isinstance(source, str) and source.startswith(("http://", "https://")):
                    raise VideoLoadError("http(s) video URLs are not fetched; send the video bytes (a data URL)")
                self.opened = open_video(source, limits, check_deadline)
                self.indices = self.opened.sample(self.num_frames)
            except VideoLoadError as err:
                raise self.named(err) from None
        return self.opened

    def named(self, err: VideoLoadError) -> VideoLoadError:
        err.args = (f"video {self.number}: {err}",)
        return err

    def close(self) -> None:
        if self.opened is not None:
            self.opened.close()


@dataclass(eq=False)
class VideoFrameSlot:
    """Where one sampled frame of `video` stands among a request's image sources, until the request is processed."""

    video: VideoInput
    position: int  # 0-based, in the sample

    def open(self, limits: VideoLimits, check_deadline: Callable[[], None] | None = None) -> "VideoFrame":
        self.video.open(limits, check_deadline)
        return VideoFrame(self.video, self.position)


class VideoFrame:
    """A sampled frame as a request's images are handled once opened (image_io.OpenedImage's `size`, `decode()`,
    `close()`), with its own tile budget `max_tiles`. Frames are decoded in order; the last one closes the video."""

    def __init__(self, video: VideoInput, position: int) -> None:
        self.video, self.position = video, position
        self.max_tiles = video.max_tiles

    @property
    def size(self) -> tuple[int, int]:
        return self.video.opened.size

    def decode(self) -> Image.Image:
        try:
            image = self.video.opened.frame(self.video.indices[self.position])
        except VideoLoadError as err:
            raise self.video.named(err) from None
        if self.position == len(self.video.indices) - 1:
            self.video.close()
        return image

    def close(self) -> None:
        self.video.close()


def max_tiles_of(opened: Any, default: int) -> int:
    """The tile budget of an opened request image: a video frame's own, else the request's."""
    return opened.max_tiles if isinstance(opened, VideoFrame) else default


def num_images(sources: Sequence[Any], limits: VideoLimits) -> int:
    """The images among a request's image sources (video frames are not counted), after checking its videos
    against `limits` (videos per request, frames sampled from each): VideoTooLargeError naming the limit."""
    videos = [source.video for source in sources if isinstance(source, VideoFrameSlot) and source.position == 0]
    if limits.max_videos is not None and len(videos) > limits.max_videos:
        raise VideoTooLargeError(f"the request has {len(videos)} videos, over the limit of {limits.max_videos} per "
                                 "request (max_videos_per_request)", "max_videos_per_request")
    for video in videos:
        limits.check_sampled(video.num_frames, f"video {video.number}")
    return sum(1 for source in sources if not isinstance(source, VideoFrameSlot))


def add_request_videos(question: str, images: Sequence[Any], request: Mapping[str, Any]) -> tuple[str, list]:
    """An engine request's "videos" (with "num_frames", "max_tiles_per_frame") -> (the question with each video's
    frame list, the sources of the question's `<image>` tags in order: images and frame slots).

    Each `<video>` tag in the question is replaced by its video's `Frame1: <image>\\n...` list; without tags a
    single video's list is prepended, as the model cards do (several videos need a tag each). Images without an
    `<image>` tag get `<image>\\n` in front of the question first, as `chat` does."""
    videos = request.get("videos")
    if not videos:
        return question, list(images)
    if not isinstance(videos, (list, tuple)):
        raise VideoLoadError(f"videos must be a list of paths, bytes or data URLs, got {type(videos).__name__}")
    if not isinstance(question, str):
        raise ValueError(f"prompt must be a string, got {type(question).__name__}")
    inputs = [VideoInput(source, number, request) for number, source in enumerate(videos, 1)]
    if images and IMAGE_PLACEHOLDER not in question:
        question = IMAGE_PLACEHOLDER + "\n" + question
    tags = question.count(VIDEO_PLACEHOLDER)
    if tags == 0 and len(inputs) == 1:
        question = VIDEO_PLACEHOLDER + question
    elif tags != len(inputs):
        raise VideoLoadError(f"the prompt has {tags} {VIDEO_PLACEHOLDER} tag(s) but {len(inputs)} videos were given; "
                             f"put one {VIDEO_PLACEHOLDER} where each video's frames go")
    text, sources = [], []
    remaining_images, remaining_videos = list(images)[::-1], inputs[::-1]
    for piece in re.split(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})", question):
        if piece == VIDEO_PLACEHOLDER:
            video = remaining_videos.pop()
            text.append(frame_prompt(video.num_frames))
            sources.extend(video.slots())
            continue
        if piece == IMAGE_PLACEHOLDER and remaining_images:  # a tag without an image: the count check says so
            sources.append(remaining_images.pop())
        text.append(piece)
    return "".join(text), sources + remaining_images[::-1]


def add_video_part(part: Mapping[str, Any], sources: list, request: Mapping[str, Any]) -> str:
    """A message's video part, {"type": "video", "video": path/bytes/data URL} or {"type": "video_url",
    "video_url": {"url": ...}} (num_frames / max_tiles_per_frame on the part, else on the request): its frames
    are appended to `sources`; returns the text that stands for it, its `Frame1: <image>\\n...` list."""
    if part.get("type") == "video_url":
        url = part.get("video_url")
        source = url.get("url") if isinstance(url, Mapping) else url
    else:
        source = part.get("video")
    if source is None:
        raise VideoLoadError(f"a {part.get('type')} part needs its video ({part.get('type')!r} field)")
    number = 1 + sum(1 for slot in sources if isinstance(slot, VideoFrameSlot) and slot.position == 0)
    video = VideoInput(source, number, part, request)
    sources.extend(video.slots())
    return frame_prompt(video.num_frames)
