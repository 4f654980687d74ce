"""Decode steps on static, bucket-sized buffers, replayed as CUDA graphs on a GPU (eager elsewhere).

A decode-only step (every scheduled request adds one token, no image) has a fixed shape once the batch is
padded to a bucket: token ids, positions, slots, context and rope lengths live in one static buffer, block tables
in a full-width static table, and padding rows write to a reserved scratch slot and read one token of it. On CUDA
the step is captured once per bucket and replayed; the first replay is checked against the eager result
(`graph_disagreement`, a tolerance scaled to the model's dtype) and a bucket whose graph disagrees or fails to
capture stays eager: it is logged and listed in `disabled_buckets`. On CPU the same static path runs eagerly,
which is what the tests check against the dynamic path.

A step's host work is one pinned, non_blocking copy (the five input rows and the block-table entries that
changed) and no sync: the table keeps each row's blocks between steps, and only blocks a request appended since
(one every block_size steps) or rows whose request changed are written. Paged decode sizes its splits from the
device-side context lengths, so the graph captured for the longest context serves any.

`capture_all` captures (on CPU: warms up) every bucket ahead of time, with a tqdm bar "capturing decode graphs"
on stderr (`progress=False` for none); a bucket not captured yet is captured when a step first needs it.
"""
from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from ..models.internvl_chat import InternVLChatModel
from .attention import KVCache
from .staging import device_guard, to_device

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
_INPUT_ROWS = 5  # token ids, positions, slots, context lengths, rope lengths: [5, bucket] int64 per step
# Graph vs eager logits: |difference| <= ATOL + rtol * (the row's largest |logit|), rtol = max(RTOL,
# EPS_MULTIPLE * eps(dtype)). bf16: 6% of the largest logit, fp16 0.8%, fp32 0.1%.
GRAPH_ATOL, GRAPH_RTOL, GRAPH_EPS_MULTIPLE = 1e-3, 1e-3, 8


def graph_disagreement(graph: torch.Tensor, eager: torch.Tensor, dtype: torch.dtype) -> str | None:
    """Why a graph's logits [rows, vocab] cannot stand in for the eager step's (None: they agree).

    The logits are float32 but come from `dtype` activations, and a replay may differ from the eager step by a
    few `dtype` roundings of the hidden states (cuBLAS may pick other kernels under capture, reductions may be
    reordered): a fixed 1e-3 tolerance rejects sound bf16 graphs. The tolerance scales with eps(dtype) and each
    row's largest logit; within it the argmax token can only change where the top two logits are within twice
    the tolerance of each other. Non-finite logits must be the same in both."""
    if graph.shape != eager.shape:
        return f"the graph's logits have shape {tuple(graph.shape)}, the eager step's {tuple(eager.shape)}"
    graph, eager = graph.float(), eager.float()
    finite = torch.isfinite(eager)
    if not torch.equal(finite, torch.isfinite(graph)) or not torch.equal(graph[~finite], eager[~finite]):
        return "their non-finite logits differ"
    graph, eager = graph.where(finite, 0.0), eager.where(finite, 0.0)
    rtol = max(GRAPH_RTOL, GRAPH_EPS_MULTIPLE * torch.finfo(dtype).eps)
    tolerance = GRAPH_ATOL + rtol * eager.abs().amax(dim=-1)  # [rows]
    error = (graph - eager).abs().amax(dim=-1)  # [rows]
    worst = int((error / tolerance).argmax())
    if error[worst] > tolerance[worst]:
        return (f"max |graph - eager| {float(error[worst]):.3g} exceeds {float(tolerance[worst]):.3g} "
                f"({GRAPH_ATOL:g} + {rtol:.3g} x the row's largest |logit|, for {dtype})")
    return None


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
            # The split count follows the full-width table (fixed at capture); each row's splits are sized from
            # its own context length on the device, and those past it return at once.
            out = paged_decode(queries, keys, values, self.tables, self.lens, validate=False,
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
        # A bucket-b step reads its inputs from inputs[: 5 * b] as [5, b] (see _INPUT_ROWS): one copy writes them.
        self.inputs = torch.zeros(_INPUT_ROWS * size, dtype=torch.long, device=self.device)
        self.tables = torch.full((size, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=self.device)
        # What each table row holds: the block list last copied into it (None: a padding row, whose first entry is
        # the scratch block) and how many of its blocks. A request's block list only grows by appends while it
        # holds blocks (block_manager.free replaces the list), so the same list needs only its new blocks.
        self._row_lists: list[list[int] | None] = [None] * size
        self._row_lengths = [0] * size
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.disabled_buckets: dict[int, str] = {}  # bucket -> why its graph is not used (it runs eagerly)
        self._pool = None

    def can_run(self, num_seqs: int, max_rope_length: int) -> bool:
        """Static shapes need a bucket, and a rotation the graph can pick per row: always for su (a tensor op on
        the rope lengths), only the unscaled base for dynamic NTK (its base is picked on the host)."""
        rotary = self.model.language_model.rotary
        return num_seqs <= self.buckets[-1] and (rotary.static_rope_lengths or rotary.variant(max_rope_length) is None)

    def _step_inputs(self, bucket: int) -> torch.Tensor:
        """[5, bucket] int64 view of the static inputs: ids, positions, slots, context lengths, rope lengths."""
        return self.inputs[: _INPUT_ROWS * bucket].view(_INPUT_ROWS, bucket)

    def _forward(self, bucket: int) -> torch.Tensor:
        """The decode step on the first `bucket` rows of the static buffers -> logits [bucket, vocab]."""
        lm = self.model.language_model
        ids, positions, slots, context_lens, rope_lengths = self._step_inputs(bucket)
        attention = _DecodeAttention(self.cache, slots, self.tables[:bucket], context_lens.to(torch.int32),
                                     self.model.resolved_backend() == "triton")
        embeds = lm.embed(ids[None])  # [1, B, H]
        rope = rope_lengths[None] if lm.rotary.static_rope_lengths else [0]  # [0]: the unscaled base
        hidden = lm(embeds, positions[None], attention, rope)
        return lm.logits(hidden[0])

    @torch.inference_mode()
    def run(self, token_ids: list[int], positions: list[int], slots: list[int], block_tables: list[list[int]],
            context_lens: list[int], rope_lengths: list[int]) -> torch.Tensor:
        """One decode step for n sequences -> logits [n, vocab] float32."""
        n = len(token_ids)
        bucket = next(b for b in self.buckets if b >= n)
        pad = bucket - n
        index, blocks, row_lists, row_lengths = self._table_updates(block_tables, bucket)
        inputs = (token_ids + [0] * pad + positions + [0] * pad + slots + [self.scratch_slot] * pad
                  + context_lens + [1] * pad + rope_lengths + [1] * pad)
        with device_guard(self.device):
            staged, index, blocks = to_device(self.device, [inputs, index, blocks])
            self.inputs[: _INPUT_ROWS * bucket].copy_(staged)
            if index.numel():
                self.tables.view(-1).index_copy_(0, index, blocks.to(torch.int32))
            self._row_lists[:bucket], self._row_lengths[:bucket] = row_lists, row_lengths
            if not self.use_graphs or bucket in self.disabled_buckets:
                return self._forward(bucket)[:n]
            if bucket not in self.graphs:
                return self._capture(bucket)[:n]
            graph, logits = self.graphs[bucket]
            graph.replay()
            return logits[:n].clone()

    def _table_updates(self, block_tables: list[list[int]], bucket: int
                       ) -> tuple[list[int], list[int], list[list[int] | None], list[int]]:
        """The table entries (flat indices, block ids) that make rows [0, bucket) hold this step's tables, padding
        rows past them; and what the rows then hold (kept once the copy is queued)."""
        width = self.tables.shape[1]
        index: list[int] = []
        blocks: list[int] = []
        row_lists, row_lengths = self._row_lists[:bucket], self._row_lengths[:bucket]
        for row, table in enumerate(block_tables):
            start = row_lengths[row] if row_lists[row] is table and row_lengths[row] <= len(table) else 0
            if start < len(table):
                index += range(row * width + start, row * width + len(table))
                blocks += table[start:]
            row_lists[row], row_lengths[row] = table, len(table)
        for row in range(len(block_tables), bucket):
            if row_lists[row] is not None:  # a request's row last time: a padding row now
                index.append(row * width)
                blocks.append(self.scratch_block)
                row_lists[row], row_lengths[row] = None, 0
        return index, blocks, row_lists, row_lengths

    @torch.inference_mode()
    def capture_all(self, progress: bool | None = None) -> None:
        """Capture every bucket's graph now (the buckets first used later would each be captured in the middle of
        a step), under a tqdm bar over the buckets; a bucket whose graph fails or disagrees stays eager, as in
        `run`. On CPU, where nothing is captured, each bucket's static step runs once (a warm-up). The steps run on
        padding rows only (they write the scratch slot, never a request's cache): results are unchanged.
        progress: show the bar (default: the runner's `progress`)."""
        show = self.progress if progress is None else progress
        pending = [b for b in self.buckets if b not in self.graphs and b not in self.disabled_buckets]
        with device_guard(self.device):
            self.tables.fill_(self.scratch_block)
            self._row_lists, self._row_lengths = [None] * len(self._row_lists), [0] * len(self._row_lengths)
            for bucket in tqdm(pending, desc="capturing decode graphs", unit="bucket", disable=not show or not pending):
                self._write_padding_inputs(bucket)
                if self.use_graphs:
                    self._capture(bucket)
                else:
                    self._forward(bucket)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

    def _write_padding_inputs(self, bucket: int) -> None:
        """Every row of the bucket a padding row: token 0 at position 0, one token of the scratch slot."""
        ids, positions, slots, context_lens, rope_lengths = self._step_inputs(bucket)
        ids.zero_()
        positions.zero_()
        slots.fill_(self.scratch_slot)
        context_lens.fill_(1)
        rope_lengths.fill_(1)

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
            reason = graph_disagreement(logits, eager, self.model.dtype)
        except RuntimeError as err:
            reason = f"capture failed: {err}"
        if reason is not None:  # never trust a graph that disagrees with the eager step
            self.disable(bucket, reason)
            return eager
        self.graphs[bucket] = (graph, logits)
        return logits.clone()

    def disable(self, bucket: int, reason: str) -> None:
        """Run `bucket` eagerly from now on; logged, and listed in `disabled_buckets` (a server metric)."""
        self.graphs.pop(bucket, None)
        self.disabled_buckets[bucket] = reason
        logger.warning("decode CUDA graph for batch bucket %d disabled, the bucket runs eagerly: %s", bucket, reason)
