"""KV cache sizing and allocation, and one forward of a continuous-batching step.

`execute` flattens every scheduled chunk (decodes and prefill chunks) into one sequence [1, T], inserts the
cached image features at their `<IMG_CONTEXT>` positions, runs the LLM over the paged cache, and computes the
LM head only at the positions that are sampled.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .engine_attention import AttentionBatch, EngineKVCache, PagedAttention
from .models.internvl_chat import InternVLChatModel


class ModelRunner:
    def __init__(self, model: InternVLChatModel, block_size: int, kv_cache_bytes: int | None,
                 kv_cache_fraction: float) -> None:
        self.model = model
        self.device = model.device
        cfg = model.config.llm
        per_block = EngineKVCache.bytes_per_block(cfg.num_hidden_layers, block_size, cfg.num_key_value_heads,
                                                  cfg.head_dim, model.dtype)
        if kv_cache_bytes is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                kv_cache_bytes = int(free * kv_cache_fraction)
            else:
                kv_cache_bytes = 256 << 20
        self.num_blocks = kv_cache_bytes // per_block
        if self.num_blocks < 2:
            raise ValueError(f"KV cache of {kv_cache_bytes} bytes holds fewer than 2 blocks of {per_block} bytes")
        self.block_size = block_size
        self.cache = EngineKVCache(cfg.num_hidden_layers, self.num_blocks, block_size, cfg.num_key_value_heads,
                                   cfg.head_dim, model.dtype, self.device)

    @torch.inference_mode()
    def execute(self, chunks: Sequence, features: dict[str, dict[str, torch.Tensor]],
                sample_request_ids: Sequence[str]) -> torch.Tensor:
        """chunks: ScheduledChunk(request, num_new_tokens) -> logits [len(sample_request_ids), vocab] float32."""
        token_ids, positions, slots, rope_lengths = [], [], [], []
        query_starts, query_lens, context_lens, tables = [], [], [], []
        image_rows: list[tuple[int, torch.Tensor, int, int]] = []  # (flattened row, features, feature row, count)
        last_row: dict[str, int] = {}
        for chunk in chunks:
            request, start = chunk.request, chunk.request.num_computed_tokens
            end = start + chunk.num_new_tokens
            sequence = request.all_token_ids
            query_starts.append(len(token_ids))
            query_lens.append(chunk.num_new_tokens)
            context_lens.append(end)
            tables.append(request.block_ids)
            for image in request.images_in(start, end):
                first, last = max(start, image.offset), min(end, image.end)
                encoded = features[request.request_id].get(image.content_hash)
                if encoded is None:
                    raise RuntimeError(f"request {request.request_id}: image features missing for a scheduled chunk")
                image_rows.append((len(token_ids) + first - start, encoded, first - image.offset, last - first))
            for position in range(start, end):
                block = request.block_ids[position // self.block_size]
                slots.append(block * self.block_size + position % self.block_size)
            token_ids.extend(sequence[start:end])
            positions.extend(range(start, end))
            rope_lengths.extend([end] * chunk.num_new_tokens)
            last_row[request.request_id] = len(token_ids) - 1
        device = self.device
        ids = torch.tensor(token_ids, dtype=torch.long, device=device)[None]  # [1, T]
        lm = self.model.language_model
        embeds = lm.embed(ids)
        for row, encoded, feature_row, count in image_rows:
            embeds[0, row: row + count] = encoded[feature_row: feature_row + count].to(embeds.dtype)
        width = max(len(t) for t in tables)
        table = torch.zeros(len(tables), width, dtype=torch.int32)
        for i, blocks in enumerate(tables):
            table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        batch = AttentionBatch(torch.tensor(slots, dtype=torch.long, device=device), query_starts, query_lens,
                               context_lens, table.to(device), use_triton=self.model.resolved_backend() == "triton")
        hidden = lm(embeds, torch.tensor(positions, device=device)[None], PagedAttention(self.cache, batch),
                    torch.tensor(rope_lengths, device=device)[None])
        rows = torch.tensor([last_row[rid] for rid in sample_request_ids], dtype=torch.long, device=device)
        return lm.logits(hidden[0].index_select(0, rows))
