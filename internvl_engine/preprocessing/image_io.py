"""Opening images safely: a path, bytes, a file object or a PIL image -> a fully decoded RGB PIL image.

The pixel count is checked from the header before decoding (a 20000x20000 PNG bomb is refused without being
decoded), a truncated file fails here rather than later, and every problem raises `ImageLoadError` naming the
input (`ImageTooLargeError` for size limits, HTTP 413 in the server).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

from PIL import Image, UnidentifiedImageError

# Checked against the header before decoding. 100 MP is ~2.5x a 4K x 4K photo; a decoded RGB image of
# that size already takes 300 MB, and the resize and tiles several times more.
DEFAULT_MAX_PIXELS = 100_000_000
# A side past 32K pixels or a ratio past 100:1 is a degenerate strip, not a photo: the tiling fits at most
# 40 tiles in a row (40:1), and a 1 x 30,000,000 PNG of 58 KB would cost seconds and GBs to decode and resize.
DEFAULT_MAX_SIDE = 32768
DEFAULT_MAX_ASPECT_RATIO = 100.0

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image]


class ImageLoadError(ValueError):
    """The image cannot be loaded or preprocessed; the message names the input and the problem."""


class ImageTooLargeError(ImageLoadError):
    """The image exceeds a size limit (ours or PIL's decompression-bomb limit): HTTP 413 in the server.

    `limit` names the limit: max_image_pixels, max_image_side, max_image_aspect_ratio or max_image_bytes."""

    def __init__(self, message: str, limit: str = "max_image_pixels") -> None:
        super().__init__(message)
        self.limit = limit


@dataclass(frozen=True)
class ImageLimits:
    """Limits checked from the image header, before any pixel is decoded (None: no limit of ours)."""

    max_pixels: int | None = DEFAULT_MAX_PIXELS
    max_side: int | None = DEFAULT_MAX_SIDE
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO

    def check(self, width: int, height: int, name: str) -> None:
        if width < 1 or height < 1:
            raise ImageLoadError(f"{name}: image is empty ({width}x{height})")
        if self.max_pixels is not None and width * height > self.max_pixels:
            raise ImageTooLargeError(f"{name}: image has {width}x{height} = {width * height} pixels, over the "
                                     f"limit of {self.max_pixels} (max_pixels)")
        if self.max_side is not None and max(width, height) > self.max_side:
            raise ImageTooLargeError(f"{name}: image is {width}x{height}, a side over the limit of "
                                     f"{self.max_side} pixels (max_side)", "max_image_side")
        ratio = max(width, height) / min(width, height)
        if self.max_aspect_ratio is not None and ratio > self.max_aspect_ratio:
            raise ImageTooLargeError(f"{name}: image is {width}x{height}, an aspect ratio of {ratio:.4g}:1, over "
                                     f"the limit of {self.max_aspect_ratio:g}:1 (max_aspect_ratio)",
                                     "max_image_aspect_ratio")


class OpenedImage:
    """An image whose header has been read and checked against the limits; nothing is decoded yet.

    `decode()` decodes it fully as RGB (once) and closes the file it owns; `close()` without decoding.
    """

    def __init__(self, image: Image.Image, name: str, owned: bool) -> None:
        self._image, self.name, self._owned = image, name, owned

    @property
    def size(self) -> tuple[int, int]:
        return self._image.size

    def decode(self) -> Image.Image:
        try:
            return _decode_rgb(self._image, self.name)
        finally:
            self.close()

    def close(self) -> None:
        """Release the file (the decoded pixels, if any, stay usable), as leaving ``with Image.open(...)`` does."""
        if self._owned:
            self._image.__exit__(None, None, None)


def open_image(image_file: ImageSource, limits: ImageLimits = ImageLimits()) -> OpenedImage:
    """Read and check an image's header (a path, encoded bytes, a binary file object or a PIL image, which is
    never modified). Raises ImageLoadError naming the input; ImageTooLargeError for the limits, which are
    checked here, before decoding; PIL's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) also applies."""
    if isinstance(image_file, Image.Image):
        limits.check(*image_file.size, "PIL image")
        return OpenedImage(image_file, "PIL image", owned=False)
    if isinstance(image_file, (str, os.PathLike)):
        text = os.fspath(image_file)
        if "\0" in str(text) or len(str(text)) > 4096:
            raise ImageLoadError(f"invalid image path (a NUL byte, or over 4096 characters): {str(text)[:80]!r}")
        path = Path(text)
        try:
            is_file = path.is_file()
        except (OSError, ValueError):
            is_file = False
        if not is_file:
            raise ImageLoadError(f"image file not found (or not a file): {str(path)[:300]!r}")
        source: Union[Path, BinaryIO] = path
        name = repr(str(path)[:300])
    elif isinstance(image_file, (bytes, bytearray, memoryview)):
        if len(image_file) == 0:
            raise ImageLoadError("image bytes are empty")
        source, name = io.BytesIO(image_file), f"<{len(image_file)} bytes>"
    elif hasattr(image_file, "read"):
        source, name = image_file, repr(getattr(image_file, "name", "<file object>"))
    else:
        raise TypeError(f"expected a path, bytes, a binary file object or a PIL image, "
                        f"got {type(image_file).__name__}")
    try:
        image = Image.open(source)  # reads the header only
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"{name}: image too large (PIL decompression-bomb limit): {err}") from err
    except UnidentifiedImageError as err:
        raise ImageLoadError(f"{name}: not an image, or a format PIL cannot read") from err
    except (OSError, SyntaxError, EOFError, ValueError) as err:
        raise ImageLoadError(f"{name}: cannot read image: {err}") from err
    try:
        limits.check(*image.size, name)
    except BaseException:
        image.__exit__(None, None, None)
        raise
    return OpenedImage(image, name, owned=True)


def open_rgb_image(image_file: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                   max_side: int | None = DEFAULT_MAX_SIDE,
                   max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO) -> Image.Image:
    """Open and fully decode an image as RGB, exactly as the official ``Image.open(f).convert('RGB')``, after
    checking its size against the limits from the header (see `open_image`)."""
    return open_image(image_file, ImageLimits(max_pixels, max_side, max_aspect_ratio)).decode()


def _decode_rgb(image: Image.Image, name: str) -> Image.Image:
    """Force the full decode (so a truncated file fails here) and convert to RGB."""
    try:
        image.load()
        # convert() on an RGB image is a plain copy; the loaded image is never modified, so skip it.
        return image if image.mode == "RGB" else image.convert("RGB")
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"{name}: image too large (PIL decompression-bomb limit): {err}") from err
    except (OSError, SyntaxError, EOFError, ValueError) as err:
        raise ImageLoadError(f"{name}: cannot decode image (corrupt or truncated?): {err}") from err
