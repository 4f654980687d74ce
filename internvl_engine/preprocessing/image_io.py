"""Opening images safely: a path, bytes, a file object or a PIL image -> a fully decoded RGB PIL image.

The pixel count is checked from the header before decoding (a 20000x20000 PNG bomb is refused without being
decoded), a truncated file fails here rather than later, and every problem raises `ImageLoadError` naming the
input (`ImageTooLargeError` for size limits, HTTP 413 in the server).
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO, Union

from PIL import Image, UnidentifiedImageError

# Checked against the header before decoding. 100 MP is ~2.5x a 4K x 4K photo; a decoded RGB image of
# that size already takes 300 MB, and the resize and tiles several times more.
DEFAULT_MAX_PIXELS = 100_000_000

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image]


class ImageLoadError(ValueError):
    """The image cannot be loaded or preprocessed; the message names the input and the problem."""


class ImageTooLargeError(ImageLoadError):
    """The image has more pixels than allowed (ours or PIL's decompression-bomb limit): HTTP 413 in the server."""


def open_rgb_image(image_file: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image as RGB, exactly as the official ``Image.open(f).convert('RGB')``.

    Accepts a path, encoded bytes, a binary file object or a PIL image (never modified). The pixel
    count is checked against `max_pixels` (None: no limit of ours) from the header, before decoding;
    PIL's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, left untouched) still applies.
    """
    if isinstance(image_file, Image.Image):
        return _decode_rgb(image_file, "PIL image", max_pixels)
    if isinstance(image_file, (str, os.PathLike)):
        path = Path(image_file)
        if not path.is_file():
            raise ImageLoadError(f"image file not found (or not a file): {str(path)!r}")
        source: Union[Path, BinaryIO] = path
        name = repr(str(path))
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
        with Image.open(source) as image:  # reads the header only
            return _decode_rgb(image, name, max_pixels)
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"{name}: image too large (PIL decompression-bomb limit): {err}") from err
    except UnidentifiedImageError as err:
        raise ImageLoadError(f"{name}: not an image, or a format PIL cannot read") from err
    except OSError as err:
        raise ImageLoadError(f"{name}: cannot read image: {err}") from err


def _decode_rgb(image: Image.Image, name: str, max_pixels: int | None) -> Image.Image:
    """Check the size, force the full decode (so a truncated file fails here) and convert to RGB."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageLoadError(f"{name}: image is empty ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(f"{name}: image has {width}x{height} = {width * height} pixels, over the "
                             f"limit of {max_pixels} (max_pixels)")
    try:
        image.load()
        # convert() on an RGB image is a plain copy; the loaded image is never modified, so skip it.
        return image if image.mode == "RGB" else image.convert("RGB")
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"{name}: image too large (PIL decompression-bomb limit): {err}") from err
    except (OSError, SyntaxError, EOFError, ValueError) as err:
        raise ImageLoadError(f"{name}: cannot decode image (corrupt or truncated?): {err}") from err
