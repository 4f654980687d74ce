"""Images tiled on the accelerator: decode on the host, upload the uint8 image, tile and normalise on the device.

The host decodes (PIL) and converts to RGB exactly as the official code; only the uint8 pixels cross the bus
(25 MB for a 4K image instead of 99 MB of float32 tiles). On the device, `kernels.tile_norm` reproduces
Pillow's fixed-point bicubic resize, the crop, the thumbnail and the normalisation bit for bit
("triton" backend), or its PyTorch twin `tile_norm_ref` does ("torch").

Two users:
* `load_image_on_device`: the official `load_image`, with the tiles made on `device`;
* the engine, with `EngineConfig.device_preprocessing`: its preprocessing workers decode and plan an image and
  keep it as a `HostImage` (uint8, in pinned memory where CUDA exists); when the ViT is granted the image's
  first tiles, `DeviceTiler` uploads it on a side copy stream and runs `tile_norm` on the step's stream.
"""
from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .cpu import DEFAULT_MAX_PIXELS, ImageLoadError, ImageSource, open_rgb_image
from .tiling import TilePlan, check_tiling_args, plan_tiles

# Page-locked bytes that waiting images may hold at once (~40 4K images); past it they wait in pageable memory,
# whose upload is staged by the driver and blocks the engine thread for the copy. Pinned memory cannot be
# swapped, and a full queue (max_waiting requests with images) must not lock the host's RAM.
PINNED_BYTES_LIMIT = 1 << 30

_pinned_lock = threading.Lock()
_pinned_bytes = 0


def load_image_on_device(image_file: ImageSource, device: torch.device | str, input_size: int = 448,
                         max_num: int = 12, *, min_num: int = 1, use_thumbnail: bool = True,
                         max_pixels: int | None = DEFAULT_MAX_PIXELS, dtype: torch.dtype = torch.float32,
                         backend: str = "auto") -> torch.Tensor:
    """pixel_values [tiles, 3, input_size, input_size] in `dtype` on `device`; float32 equals `load_image`."""
    from ..kernels.tile_norm import tile_norm, tile_norm_ref

    try:
        check_tiling_args(min_num, max_num, input_size)
    except ValueError as err:
        raise ImageLoadError(str(err)) from None
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    device = torch.device(device)
    image = open_rgb_image(image_file, max_pixels=max_pixels)
    plan = plan_tiles(image.width, image.height, min_num, max_num, input_size, use_thumbnail)
    pixels = torch.from_numpy(np.array(image)).to(device)  # [H, W, 3] uint8 (a writable copy for torch)
    use_triton = backend == "triton" or (backend == "auto" and device.type == "cuda")
    normalise = tile_norm if use_triton else tile_norm_ref
    return normalise(pixels, plan, input_size, out_dtype=dtype)


@dataclass(eq=False)
class HostImage:
    """A decoded image waiting for the device: its RGB pixels and tile plan (what `image_to_pixel_values` would
    take), held in place of its float32 tiles until the ViT needs them."""

    pixels: torch.Tensor  # uint8 [H, W, 3] on the host, contiguous; pinned where CUDA exists (within the limit)
    plan: TilePlan
    image_size: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The shape its tiles will have: [tiles, 3, S, S]."""
        return (self.plan.num_tiles, 3, self.image_size, self.image_size)


def _release_pinned(nbytes: int) -> None:
    global _pinned_bytes
    with _pinned_lock:
        _pinned_bytes -= nbytes


def _host_buffer(height: int, width: int) -> torch.Tensor:
    """uint8 [height, width, 3] on the host: pinned while CUDA exists and PINNED_BYTES_LIMIT allows, else pageable."""
    global _pinned_bytes
    nbytes = height * width * 3
    if torch.cuda.is_available():
        with _pinned_lock:
            pin = _pinned_bytes + nbytes <= PINNED_BYTES_LIMIT
            if pin:
                _pinned_bytes += nbytes
        if pin:
            try:
                buffer = torch.empty((height, width, 3), dtype=torch.uint8, pin_memory=True)
            except RuntimeError:  # the driver refused to lock more memory: pageable will do
                _release_pinned(nbytes)
            else:
                weakref.finalize(buffer, _release_pinned, nbytes)  # the budget comes back with the tensor
                return buffer
    # NumPy's allocation (transparent huge pages on big buffers, see cpu.image_to_pixel_values)
    return torch.from_numpy(np.empty((height, width, 3), dtype=np.uint8))


def host_image(packed: bytes, width: int, height: int, plan: TilePlan, image_size: int) -> HostImage:
    """`packed`: an RGB image's bytes as PIL's `tobytes()` gives them (rows of R, G, B) -> a HostImage holding a
    copy (the only copy made here: the caller hashes the same bytes)."""
    if len(packed) != width * height * 3:
        raise ValueError(f"an RGB {width}x{height} image has {width * height * 3} bytes, got {len(packed)}")
    buffer = _host_buffer(height, width)
    buffer.numpy()[...] = np.frombuffer(packed, dtype=np.uint8).reshape(height, width, 3)
    return HostImage(buffer, plan, image_size)


def preprocesses_on_device(option: bool | None, device: torch.device, backend: str) -> bool:
    """The engine option `device_preprocessing` resolved: None means on with CUDA and the Triton backend."""
    if option is None:
        return device.type == "cuda" and backend == "triton"
    return bool(option)


class DeviceTiler:
    """HostImages -> their tiles [tiles, 3, S, S] in `dtype` on `device`, bit-equal to `image_to_pixel_values`
    cast to `dtype`.

    CUDA: each image is uploaded with a non-blocking copy on a side stream (the copy engine; from pinned memory
    the engine thread never waits for it), and the current stream waits on that copy's event before `tile_norm`
    runs on it. The normalising kernel stays on the current (the step's) stream because the ViT, queued right
    after it there, consumes its output at once: a second compute stream would add stream bookkeeping for the
    tiles and overlap nothing. What does overlap: image k+1's upload with image k's tile_norm, and all of it
    with the engine thread queueing the ViT's kernels behind. Elsewhere (CPU tensors, tests) the pixels are used
    in place.

    `use_triton`: `tile_norm` (CUDA, or any device under TRITON_INTERPRET=1), else `tile_norm_ref`.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, use_triton: bool) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.use_triton = use_triton
        self._copy_stream: torch.cuda.Stream | None = None

    @staticmethod
    def kernel_available(device: torch.device, backend: str) -> bool:
        """Whether `tile_norm` can run on `device` for a model on `backend`: Triton on CUDA, or the interpreter."""
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True
        return torch.device(device).type == "cuda" and backend == "triton"

    def tiles(self, images: Sequence[HostImage]) -> list[torch.Tensor]:
        from ..kernels.tile_norm import tile_norm, tile_norm_ref

        normalise = tile_norm if self.use_triton else tile_norm_ref
        tiles = []
        for image, (pixels, uploaded) in zip(images, self._upload(images)):
            if uploaded is not None:  # image k's kernel waits for its own copy only, not for those queued after it
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(uploaded)
                pixels.record_stream(compute)  # its memory is not reused by the copy stream before the kernel ran
            tiles.append(normalise(pixels, image.plan, image.image_size, out_dtype=self.dtype))
        return tiles

    def _upload(self, images: Sequence[HostImage]) -> list[tuple[torch.Tensor, torch.cuda.Event | None]]:
        """Every image's pixels on the device with the event its copy completes (None: usable at once), all
        copies queued before any kernel."""
        if self.device.type != "cuda":
            return [(image.pixels.to(self.device), None) for image in images]
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        uploads = []
        with torch.cuda.stream(self._copy_stream):
            for image in images:
                # Allocated from the copy stream's pool: a block freed after a kernel read it (record_stream in
                # `tiles`) is reused only once that kernel is done. The pinned source is kept by torch's host
                # allocator until this copy has run, even if the HostImage is dropped first.
                pixels = image.pixels.to(self.device, non_blocking=True)
                uploaded = torch.cuda.Event()
                uploaded.record(self._copy_stream)
                uploads.append((pixels, uploaded))
        return uploads
