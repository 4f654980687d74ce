"""KV cache sizing and allocation, and one forward of a continuous-batching step.

`execute` takes the step's flat `BatchMetadata` (decodes and prefill chunks packed into one sequence [1, T]),
puts the image features at their `<IMG_CONTEXT>` rows, runs the LLM over the paged cache, and computes the LM
head only at the positions that are sampled. Decode-only steps go to the static (CUDA-graph) path when it can
take them.

No host sync between the step's first kernel and its logits: the step's lists reach the device in pinned,
non_blocking copies (`staging.to_device`: one for the runner's lists, one for the attention's), and what the host
already knows (the longest rope length, the prefill chunks' lengths) is passed down rather than read back from the
device. The sampler's single `.tolist()` is the step's one sync. Everything runs with the engine's device current
(`device_guard`): Triton launches, and CUDA graphs capture, on the current device.
"""
from __future__ import annotations

import torch

from ..models.internvl_chat import InternVLChatModel
from .attention import AttentionBatch, KVCache, PagedAttention
from .batch_metadata import BatchMetadata
from .cuda_graphs import DecodeGraphRunner
from .staging import device_guard, padded_rows, to_device


class ModelRunner:
    def __init__(self, model: InternVLChatModel, block_size: int, kv_cache_bytes: int | None,
                 kv_cache_fraction: float, max_model_len: int, max_num_seqs: int,
                 static_decode: bool | None = None, capture_graphs_at_startup: bool = True) -> None:
        """static_decode: decode-only steps on bucket-sized static buffers (CUDA graphs on CUDA); None = on CUDA.
        capture_graphs_at_startup: capture every bucket's graph now (False: each when a step first needs it)."""
        self.model = model
        self.device = model.device
        cfg = model.config.llm
        per_block = self.bytes_per_block(model, block_size)
        if kv_cache_bytes is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                kv_cache_bytes = int(free * kv_cache_fraction)
            else:
                kv_cache_bytes = 256 << 20
        self.num_blocks = kv_cache_bytes // per_block - 1  # the last block is the static decode's scratch
        if self.num_blocks < 2:
            raise ValueError(f"KV cache of {kv_cache_bytes} bytes holds fewer than 3 blocks of {per_block} bytes")
        self.block_size = block_size
        window = cfg.sliding_window if cfg.sliding_window is not None and cfg.sliding_window < max_model_len else None
        self.cache = KVCache(cfg.num_hidden_layers, self.num_blocks + 1, block_size, cfg.num_key_value_heads,
                             cfg.head_dim, model.dtype, self.device, sliding_window=window)
        self.decode_graphs = None
        if static_decode or (static_decode is None and self.device.type == "cuda"):
            self.decode_graphs = DecodeGraphRunner(model, self.cache, self.num_blocks, -(-max_model_len // block_size),
                                                   max_batch=max_num_seqs)
            if self.device.type == "cuda" and capture_graphs_at_startup:
                self.decode_graphs.capture_all()  # under a progress bar, not in the middle of a served step

    @staticmethod
    def bytes_per_block(model: InternVLChatModel, block_size: int) -> int:
        cfg = model.config.llm
        return KVCache.bytes_per_block(cfg.num_hidden_layers, block_size, cfg.num_key_value_heads, cfg.head_dim,
                                       model.dtype)

    @torch.inference_mode()
    def execute(self, meta: BatchMetadata) -> torch.Tensor:
        """One step -> logits [len(meta.logit_indices), vocab] float32 (rows in meta.logit_request_ids order)."""
        with device_guard(self.device):  # Triton launches on the current device: make it this engine's
            return self._execute(meta)

    def _execute(self, meta: BatchMetadata) -> torch.Tensor:
        longest_rope = max(meta.rope_lengths)
        graphs = self.decode_graphs
        if graphs is not None and meta.is_decode_only and graphs.can_run(len(meta.query_lens), longest_rope):
            return graphs.run(meta.input_token_ids, meta.positions, meta.slot_ids, meta.block_tables,
                              meta.context_lens, meta.rope_lengths)
        lm = self.model.language_model
        num_chunks = len(meta.block_tables)
        width = max(len(blocks) for blocks in meta.block_tables)
        ids, positions, rope_lengths, slots, rows, table = to_device(self.device, [
            meta.input_token_ids, meta.positions, meta.rope_lengths, meta.slot_ids, meta.logit_indices,
            padded_rows(meta.block_tables, width, 0)])
        embeds = lm.embed(ids[None])  # [1, T, H]
        for first_row, features in meta.image_inserts:
            embeds[0, first_row: first_row + features.shape[0]] = features.to(embeds.dtype)
        batch = AttentionBatch(slots, meta.query_start_locs[:-1], meta.query_lens, meta.context_lens,
                               table.view(num_chunks, width).to(torch.int32),  # [chunks, width]
                               use_triton=self.model.resolved_backend() == "triton")
        # Per-token rope lengths [1, T] with their maximum, which the rotary needs and the host knows.
        hidden = lm(embeds, positions[None], PagedAttention(self.cache, batch), (rope_lengths[None], longest_rope))
        return lm.logits(hidden[0].index_select(0, rows))
