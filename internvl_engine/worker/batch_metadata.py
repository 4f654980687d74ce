"""What the model runner needs for one step, as flat Python lists built by the engine (`engine/batch_builder`).

All chunks of a step are packed along one token axis (prefill chunks and decodes alike, varlen style):
chunk i owns flat tokens [query_start_locs[i], query_start_locs[i + 1]). Nothing here refers to the engine's
request objects, so the worker depends on no engine type.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BatchMetadata:
    input_token_ids: list[int]  # [num_batched_tokens]
    positions: list[int]  # [num_batched_tokens] index of each token in its request's sequence
    # [num_batched_tokens] the sequence length each token's rotary base is picked from (dynamic NTK); see
    # Request.rope_length. Only lengths past max_position_embeddings change anything.
    rope_lengths: list[int]
    slot_ids: list[int]  # [num_batched_tokens] block_id * block_size + offset: where each new K/V is stored
    query_start_locs: list[int]  # [num_chunks + 1] cumulative query lengths (cu_seqlens for varlen kernels)
    query_lens: list[int]  # [num_chunks] tokens computed this step
    context_lens: list[int]  # [num_chunks] tokens with K/V after this step: cached + new, what attention reads
    # [num_chunks][ceil(context_len / block_size)]: the requests' own block_ids lists, not copies (copying 256 tables
    # of 1K-4K tokens would cost 160 µs a step). They stay valid until the next schedule() appends to them. A list
    # only grows by appends while its request holds blocks (freeing replaces it): the static decode path relies on
    # that to copy only a list's new blocks to the device.
    block_tables: list[list[int]]
    # Flat indices of the tokens whose logits are sampled: the last token of each chunk that completes its request
    # (the LM head runs on these rows only). logit_request_ids[j] is the request sampled at logit_indices[j].
    logit_indices: list[int]
    logit_request_ids: list[str]
    # Image features to put in place of <IMG_CONTEXT> embeddings: (first flat row, features [rows, hidden]).
    image_inserts: list[tuple[int, Any]]

    @property
    def is_decode_only(self) -> bool:
        """Every chunk computes one text token and is sampled: the shape a static (CUDA-graph) step handles."""
        return len(self.input_token_ids) == len(self.query_lens) == len(self.logit_indices) and not self.image_inserts
