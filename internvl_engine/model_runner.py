"""KV cache sizing and allocation, and one forward of a continuous-batching step.

`execute` flattens every scheduled chunk (decodes and prefill chunks) into one sequence [1, T], inserts the
cached image features at their `<IMG_CONTEXT>` positions, runs the LLM over the paged cache, and computes the
LM head only at the positions that are sampled.
"""
from __future__ import annotations

import torch

from .batch_metadata import prepare_batch
from .cuda_graphs import DecodeGraphRunner
from .engine_attention import AttentionBatch, EngineKVCache, PagedAttention, pad_block_tables
from .models.internvl_chat import InternVLChatModel
from .scheduler import SchedulerOutput


class ModelRunner:
    def __init__(self, model: InternVLChatModel, block_size: int, kv_cache_bytes: int | None,
                 kv_cache_fraction: float, max_model_len: int, max_num_seqs: int,
                 static_decode: bool | None = None) -> None:
        """static_decode: decode-only steps on bucket-sized static buffers (CUDA graphs on CUDA); None = on CUDA."""
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
        self.num_blocks = kv_cache_bytes // per_block - 1  # the last block is the static decode's scratch
        if self.num_blocks < 2:
            raise ValueError(f"KV cache of {kv_cache_bytes} bytes holds fewer than 3 blocks of {per_block} bytes")
        self.block_size = block_size
        self.cache = EngineKVCache(cfg.num_hidden_layers, self.num_blocks + 1, block_size, cfg.num_key_value_heads,
                                   cfg.head_dim, model.dtype, self.device)
        self.decode_graphs = None
        if static_decode or (static_decode is None and self.device.type == "cuda"):
            self.decode_graphs = DecodeGraphRunner(model, self.cache, self.num_blocks, -(-max_model_len // block_size),
                                                   max_batch=max_num_seqs)

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput, features: dict[str, dict[str, torch.Tensor]]
                ) -> tuple[list[str], torch.Tensor]:
        """One step -> (sampled request ids, logits [len(ids), vocab] float32) for the chunks that complete."""
        meta = prepare_batch(output, self.block_size)
        graphs = self.decode_graphs
        if (graphs is not None and len(meta.input_token_ids) == len(output.chunks)
                and not any(chunk.request.images_in(chunk.request.num_computed_tokens,
                                                    chunk.request.num_computed_tokens + 1) for chunk in output.chunks)
                and graphs.can_run(len(output.chunks), max(meta.context_lens))):
            # decode only: every chunk is one token and every one is sampled
            return meta.logit_request_ids, graphs.run(meta.input_token_ids, meta.positions, meta.slot_ids,
                                                      meta.block_tables, meta.context_lens)
        device = self.device
        lm = self.model.language_model
        embeds = lm.embed(torch.tensor(meta.input_token_ids, dtype=torch.long, device=device)[None])  # [1, T, H]
        rope_lengths: list[int] = []
        for (request, count), first_row, end in zip(output.chunks, meta.query_start_locs, meta.context_lens):
            start = end - count
            rope_lengths += [end] * count  # dynamic NTK: the request's KV length after this step
            for image in request.images_in(start, end):
                encoded = features[request.request_id].get(image.content_hash)
                if encoded is None:
                    raise RuntimeError(f"request {request.request_id}: image features missing for a scheduled chunk")
                lo, hi = max(start, image.offset), min(end, image.end)
                rows = slice(first_row + lo - start, first_row + hi - start)
                embeds[0, rows] = encoded[lo - image.offset: hi - image.offset].to(embeds.dtype)
        table = pad_block_tables(meta.block_tables, len(meta.block_tables),
                                 max(len(blocks) for blocks in meta.block_tables))
        batch = AttentionBatch(torch.tensor(meta.slot_ids, dtype=torch.long, device=device), meta.query_start_locs[:-1],
                               meta.query_lens, meta.context_lens, table.to(device),
                               use_triton=self.model.resolved_backend() == "triton")
        hidden = lm(embeds, torch.tensor(meta.positions, device=device)[None], PagedAttention(self.cache, batch),
                    torch.tensor(rope_lengths, device=device)[None])
        rows = torch.tensor(meta.logit_indices, dtype=torch.long, device=device)
        return meta.logit_request_ids, lm.logits(hidden[0].index_select(0, rows))
