"""Decode steps on static, bucket-sized buffers, replayed as CUDA graphs on a GPU (eager elsewhere).

A decode-only step (every scheduled request adds one token, no image) has a fixed shape once the batch is
padded to a bucket: token ids, positions, slots, block tables (full width) and context lengths live in static
buffers, padding rows write to a reserved scratch slot and read one token of it. On CUDA the step is captured
once per bucket and replayed; the first replay is checked against the eager result and a bucket whose graph
disagrees (or fails to capture) stays eager. On CPU the same static path runs eagerly, which is what the tests
check against the dynamic path.

Buckets are captured when first used; `capture_all` captures (on CPU: warms up) every bucket ahead of time, with
a tqdm bar "capturing decode graphs" on stderr (`progress=False` for none).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .attention import KVCache, pad_block_tables
from ..models.internvl_chat import InternVLChatModel

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
_SPLIT_TOKENS = 512  # tokens per paged-decode split in a static (graph) step


class _DecodeAttention:
    """The `cache` of a static decode forward: store K/V through `slots`, attend with paged decode."""

    def __init__(self, cache: KVCache, slots: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                 use_triton: bool) -> None:
        self.cache, self.slots, self.tables, self.lens, self.use_triton = cache, slots, tables, lens, use_triton

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [1, heads, B, d]; k, v [1, kv_heads, B, d] -> [1, heads, B, d]."""
        from ..kernels.paged_decode import paged_decode, paged_decode_ref

        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys.view(-1, *keys.shape[2:])[self.slots] = k[0].transpose(0, 1)
        values.view(-1, *values.shape[2:])[self.slots] = v[0].transpose(0, 1)
        queries = q[0].transpose(0, 1)  # [B, heads, d]
        if self.use_triton:
            # A graph fixes the split count, so fix the split SIZE instead (as vLLM's 512-token partitions): the
            # splits past a row's context exit at once, and long contexts still spread over many programs.
            num_splits = max(1, -(-self.tables.shape[1] * self.cache.block_size // _SPLIT_TOKENS))
            out = paged_decode(queries, keys, values, self.tables, self.lens, num_splits=num_splits, validate=False,
                               sliding_window=self.cache.sliding_window)
        else:
            out = paged_decode_ref(queries, keys, values, self.tables, self.lens,
                                   sliding_window=self.cache.sliding_window)
        return out.transpose(0, 1).unsqueeze(0)


class DecodeGraphRunner:
    def __init__(self, model: InternVLChatModel, cache: KVCache, scratch_block: int, max_blocks_per_seq: int,
                 max_batch: int = BUCKETS[-1], progress: bool = True) -> None:
        """progress: whether `capture_all` shows its tqdm bar by default."""
        self.model = model
        self.progress = progress
        self.cache = cache
        self.device = model.device
        self.use_graphs = self.device.type == "cuda"
        self.buckets = [b for b in BUCKETS if b <= max_batch] or [max_batch]
        size = self.buckets[-1]
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * cache.block_size
        self.ids = torch.zeros(size, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(size, dtype=torch.long, device=self.device)
        self.slots = torch.full((size,), self.scratch_slot, dtype=torch.long, device=self.device)
        self.tables = torch.full((size, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=self.device)
        self.lens = torch.ones(size, dtype=torch.int32, device=self.device)
        self.rope_lengths = torch.ones(size, dtype=torch.long, device=self.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.eager_buckets: set[int] = set()
        self._pool = None

    def can_run(self, num_seqs: int, max_rope_length: int) -> bool:
        """Static shapes need a bucket, and a rotation the graph can pick per row: always for su (a tensor op on
        the rope lengths), only the unscaled base for dynamic NTK (its base is picked on the host)."""
        rotary = self.model.language_model.rotary
        return num_seqs <= self.buckets[-1] and (rotary.static_rope_lengths or rotary.variant(max_rope_length) is None)

    def _forward(self, bucket: int) -> torch.Tensor:
        """The decode step on the first `bucket` rows of the static buffers -> logits [bucket, vocab]."""
        lm = self.model.language_model
        attention = _DecodeAttention(self.cache, self.slots[:bucket], self.tables[:bucket], self.lens[:bucket],
                                     self.model.resolved_backend() == "triton")
        embeds = lm.embed(self.ids[:bucket][None])  # [1, B, H]
        rope_lengths = self.rope_lengths[:bucket][None] if lm.rotary.static_rope_lengths else [0]  # [0]: unscaled
        hidden = lm(embeds, self.positions[:bucket][None], attention, rope_lengths)
        return lm.logits(hidden[0])

    @torch.inference_mode()
    def run(self, token_ids: list[int], positions: list[int], slots: list[int], block_tables: list[list[int]],
            context_lens: list[int], rope_lengths: list[int]) -> torch.Tensor:
        """One decode step for n sequences -> logits [n, vocab] float32."""
        n = len(token_ids)
        bucket = next(b for b in self.buckets if b >= n)
        width = self.tables.shape[1]
        table = pad_block_tables(block_tables, bucket, width, fill=self.scratch_block)
        pad = bucket - n
        self.ids[:bucket].copy_(torch.tensor(token_ids + [0] * pad), non_blocking=True)
        self.positions[:bucket].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.slots[:bucket].copy_(torch.tensor(slots + [self.scratch_slot] * pad), non_blocking=True)
        self.lens[:bucket].copy_(torch.tensor(context_lens + [1] * pad, dtype=torch.int32), non_blocking=True)
        self.rope_lengths[:bucket].copy_(torch.tensor(rope_lengths + [1] * pad), non_blocking=True)
        self.tables[:bucket].copy_(table, non_blocking=True)
        if not self.use_graphs or bucket in self.eager_buckets:
            return self._forward(bucket)[:n]
        if bucket not in self.graphs:
            return self._capture(bucket)[:n]
        graph, logits = self.graphs[bucket]
        graph.replay()
        return logits[:n].clone()

    @torch.inference_mode()
    def capture_all(self, progress: bool | None = None) -> None:
        """Capture every bucket's graph now (the buckets first used later would each be captured in the middle of
        a step), under a tqdm bar over the buckets; a bucket whose graph fails or disagrees stays eager, as in
        `run`. On CPU, where nothing is captured, each bucket's static step runs once (a warm-up). The steps run on
        padding rows only (they write the scratch slot, never a request's cache): results are unchanged.
        progress: show the bar (default: the runner's `progress`)."""
        show = self.progress if progress is None else progress
        pending = [b for b in self.buckets if b not in self.graphs and b not in self.eager_buckets]
        self._reset_padding()
        for bucket in tqdm(pending, desc="capturing decode graphs", unit="bucket", disable=not show or not pending):
            if self.use_graphs:
                self._capture(bucket)
            else:
                self._forward(bucket)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _reset_padding(self) -> None:
        """Every row of the static buffers a padding row: token 0 at position 0, one token of the scratch slot."""
        self.ids.zero_()
        self.positions.zero_()
        self.slots.fill_(self.scratch_slot)
        self.tables.fill_(self.scratch_block)
        self.lens.fill_(1)
        self.rope_lengths.fill_(1)

    def _capture(self, bucket: int) -> torch.Tensor:
        """Warm up (compiles the kernels), capture, replay once and compare with the eager logits."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                eager = self._forward(bucket)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._forward(bucket)
            self._pool = graph.pool()
            graph.replay()
        except RuntimeError:
            self.eager_buckets.add(bucket)
            return eager
        if not torch.allclose(logits, eager, rtol=1e-3, atol=1e-3):
            self.eager_buckets.add(bucket)  # never trust a graph that disagrees with the eager step
            return eager
        self.graphs[bucket] = (graph, logits)
        return logits.clone()
