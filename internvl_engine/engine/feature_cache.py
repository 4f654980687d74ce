"""Image features (`extract_feature` output) cached by image content hash + tile count, bounded by bytes, LRU.

The same image sent twice (or by many requests) is encoded once: its 256 visual tokens per tile are computed
by the ViT a single time and reused while they stay in the cache.
"""
from __future__ import annotations

from collections import OrderedDict

import torch


class FeatureCache:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"feature cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> torch.Tensor | None:
        """The features [tiles * 256, hidden] for `key`, marking them most recently used; counts hit/miss."""
        features = self._entries.get(key)
        if features is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return features

    def put(self, key: str, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.max_bytes or key in self._entries:
            return
        while self.num_bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.num_bytes -= evicted.numel() * evicted.element_size()
        self._entries[key] = features
        self.num_bytes += size
