"""The engine's ViT work: encode the tile slices a step was granted, keep images encoded part-way, and hand every
request the features of its images (complete, or as far as they are encoded).

An image's tiles are independent, so its features are built slice by slice over several steps: tile t fills rows
[t * tokens_per_tile, (t + 1) * tokens_per_tile) of one buffer per image content, shared by every request with
that content. When the last tile is in, the buffer goes to the feature cache and into each request's features,
and the request's tiles are dropped.

With device preprocessing (EngineConfig.device_preprocessing) a request holds a decoded uint8 `HostImage` in place
of its tiles; the first step that grants one of its tiles makes all of them on the model's device (`DeviceTiler`:
upload on a side copy stream, `tile_norm` on the step's stream ahead of the ViT) and every request holding that
content gets the same tensor, kept until the image is encoded.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..models.internvl_chat import InternVLChatModel
from ..preprocessing.device import DeviceTiler, HostImage, preprocesses_on_device
from .feature_cache import FeatureCache
from .request import ImageSpan
from .request_state import RequestState
from .scheduler import TileSlice


@dataclass
class _Partial:
    buffer: torch.Tensor  # [num_tiles * tokens_per_tile, hidden]: the rows of encoded tiles are filled
    encoded: list[bool]  # [num_tiles]: slices may start past tile 0 (a prefix-cache hit mid-image skips those)


class VisionWork:
    def __init__(self, model: InternVLChatModel, feature_cache: FeatureCache) -> None:
        self.model = model
        self.feature_cache = feature_cache
        self._partial: dict[str, _Partial] = {}  # content hash -> an image encoded part-way
        self._tiler: DeviceTiler | None = None  # made when the first HostImage is to be tiled
        # tiles [n, 3, 448, 448] -> features [n, 256, hidden] in place of the model's own (None): tensor parallelism
        # splits the tiles over its ranks
        self.extract_feature = None

    def preprocesses_on_device(self, option: bool | None) -> bool:
        """EngineConfig.device_preprocessing resolved for this model: None means on with CUDA and Triton."""
        return preprocesses_on_device(option, self.model.device, self.model.resolved_backend())

    def tiles_ready(self, state: RequestState, image: ImageSpan, first: int) -> int:
        """Consecutive tiles of `image` from tile `first` whose features exist (a feature-cache hit is attached to
        `state`: then all of them)."""
        key = image.content_hash
        if key in state.features:
            return image.num_tiles - first
        partial = self._partial.get(key)
        if partial is not None:
            count = 0
            while first + count < image.num_tiles and partial.encoded[first + count]:
                count += 1
            return count
        cached = self.feature_cache.get(key)
        if cached is not None:
            state.features[key] = cached
            state.pixel_values.pop(key, None)
            return image.num_tiles - first
        return 0

    def features(self, state: RequestState) -> dict[str, torch.Tensor]:
        """The request's image features by content hash: complete ones and the buffers of those part-way."""
        features = dict(state.features)
        for key in state.pixel_values:
            partial = self._partial.get(key)
            if partial is not None:
                features[key] = partial.buffer
        return features

    def encode(self, slices: Sequence[TileSlice], states: Mapping[str, RequestState]) -> float:
        """Run the ViT over the slices' tiles in one batch; returns the seconds it took (on CUDA the device's time:
        synchronised before and after, device tiling included). Raises what the ViT raises (the caller isolates
        failures); nothing is recorded unless the whole batch succeeds."""
        device, dtype = self.model.device, self.model.dtype
        synchronize = device.type == "cuda"
        if synchronize:  # idle in practice: the previous step ended by reading its sampled tokens
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            self._tile_on_device(slices, states)
            # Each slice on the device in the model's dtype before the batch is joined: tiles made on the device
            # and CPU tiles (pixel_values given with a request) may share a step.
            pixels = [states[s.request.request_id].pixel_values[s.image.content_hash][s.start_tile: s.end_tile]
                      .to(device=device, dtype=dtype) for s in slices]
            batch = pixels[0] if len(pixels) == 1 else torch.cat(pixels)  # [tiles, 3, 448, 448]
            features = (self.extract_feature or self.model.extract_feature)(batch)  # [tiles, tokens_per_tile, hidden]
        offset = 0
        for tile_slice in slices:
            count = tile_slice.num_tiles
            encoded = features[offset: offset + count].reshape(-1, features.shape[-1])
            offset += count
            self._record(tile_slice, encoded, states)
        if synchronize:  # else the time would be that of queueing the kernels, not of running them
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    def _tile_on_device(self, slices: Sequence[TileSlice], states: Mapping[str, RequestState]) -> None:
        """The step's images still held as a HostImage become their tiles on the model's device, once per content:
        every request holding that content gets the same tensor (the HostImage, pinned memory included, is
        dropped)."""
        waiting: dict[str, HostImage] = {}
        for tile_slice in slices:
            value = states[tile_slice.request.request_id].pixel_values[tile_slice.image.content_hash]
            if isinstance(value, HostImage):
                waiting.setdefault(tile_slice.image.content_hash, value)
        if not waiting:
            return
        if self._tiler is None:
            use_kernel = DeviceTiler.kernel_available(self.model.device, self.model.resolved_backend())
            self._tiler = DeviceTiler(self.model.device, self.model.dtype, use_kernel)
        for key, tiles in zip(waiting, self._tiler.tiles(list(waiting.values()))):
            for state in states.values():
                if isinstance(state.pixel_values.get(key), HostImage):
                    state.pixel_values[key] = tiles

    def _record(self, tile_slice: TileSlice, encoded: torch.Tensor, states: Mapping[str, RequestState]) -> None:
        image, key = tile_slice.image, tile_slice.image.content_hash
        per_tile = image.num_tokens // image.num_tiles
        partial = self._partial.get(key)
        if partial is None:
            if tile_slice.start_tile == 0 and tile_slice.end_tile == image.num_tiles:  # whole: no copy
                self._complete(key, encoded, states)
                return
            partial = self._partial[key] = _Partial(encoded.new_empty(image.num_tokens, encoded.shape[-1]),
                                                    [False] * image.num_tiles)
        partial.buffer[tile_slice.start_tile * per_tile: tile_slice.end_tile * per_tile] = encoded
        partial.encoded[tile_slice.start_tile: tile_slice.end_tile] = [True] * tile_slice.num_tiles
        if all(partial.encoded):
            del self._partial[key]
            self._complete(key, partial.buffer, states)

    def _complete(self, key: str, features: torch.Tensor, states: Mapping[str, RequestState]) -> None:
        self.feature_cache.put(key, features)
        for state in states.values():  # every request with this content: pinned until it finishes
            if key in state.pixel_values:
                state.features[key] = features
                del state.pixel_values[key]  # the tiles are no longer needed

    def release(self, state: RequestState, states: Mapping[str, RequestState]) -> None:
        """A request is gone: drop part-way images no other live request (in `states`) still holds."""
        for key in state.pixel_values:
            if key in self._partial and not any(key in other.pixel_values for other in states.values()
                                                if other is not state):
                del self._partial[key]
