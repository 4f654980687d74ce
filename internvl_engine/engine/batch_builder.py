"""A scheduled step -> the worker's `BatchMetadata` (plain Python: no torch here).

Read between schedule() and update(): a chunk starts at its request's num_computed_tokens.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..worker.batch_metadata import BatchMetadata
from .scheduler import ScheduledChunk


def build_batch(chunks: Sequence[ScheduledChunk], block_size: int,
                features: Mapping[str, Mapping[str, Any]] | None = None) -> BatchMetadata:
    """chunks: a step's (or part of a step's) scheduled chunks; features: request id -> image content hash -> features [image tokens, hidden] (what the ViT produced)."""
    input_token_ids: list[int] = []
    positions: list[int] = []
    rope_lengths: list[int] = []
    slot_ids: list[int] = []
    query_start_locs = [0]
    query_lens: list[int] = []
    context_lens: list[int] = []
    block_tables: list[list[int]] = []
    logit_indices: list[int] = []
    logit_request_ids: list[str] = []
    image_inserts: list[tuple[int, Any]] = []
    total = 0
    for request, count in chunks:
        block_ids = request.block_ids
        start = request.num_computed_tokens
        end = start + count
        num_prompt = len(request.prompt_token_ids)
        if count == 1 and start >= num_prompt:  # decode: one output token, one slot (the common case, kept cheap)
            input_token_ids.append(request.output_token_ids[start - num_prompt])
            positions.append(start)
            rope_lengths.append(start + 1 + request.rope_length_offset)
            slot_ids.append(block_ids[start // block_size] * block_size + start % block_size)
        else:
            input_token_ids += request.token_ids_in(start, end)
            positions += range(start, end)
            rope_lengths += [request.rope_length(position) for position in range(start, end)]
            position = start
            while position < end:  # one contiguous slot range per block
                block_index, offset = divmod(position, block_size)
                stop = min(end, position - offset + block_size)
                first_slot = block_ids[block_index] * block_size + offset
                slot_ids += range(first_slot, first_slot + stop - position)
                position = stop
            for image in request.images_in(start, end):
                encoded = (features or {}).get(request.request_id, {}).get(image.content_hash)
                if encoded is None:
                    raise RuntimeError(f"request {request.request_id}: image features missing for a scheduled chunk")
                lo, hi = max(start, image.offset), min(end, image.end)
                image_inserts.append((total + lo - start, encoded[lo - image.offset: hi - image.offset]))
        total += count
        query_start_locs.append(total)
        query_lens.append(count)
        context_lens.append(end)
        block_tables.append(block_ids)  # exactly ceil(end / block_size) blocks: append allocates no more
        if end == num_prompt + len(request.output_token_ids):
            logit_indices.append(total - 1)
            logit_request_ids.append(request.request_id)
    return BatchMetadata(input_token_ids, positions, rope_lengths, slot_ids, query_start_locs, query_lens,
                         context_lens, block_tables, logit_indices, logit_request_ids, image_inserts)
