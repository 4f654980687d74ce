"""Per-step batch metadata as flat Python lists: what the model runner turns into device tensors (no torch here).

All chunks of a step are packed along one token axis (prefill chunks and decodes alike, varlen style):
chunk i owns flat tokens [query_start_locs[i], query_start_locs[i + 1]).
"""
from __future__ import annotations

from dataclasses import dataclass

from .scheduler import SchedulerOutput


@dataclass(frozen=True)
class BatchMetadata:
    input_token_ids: list[int]  # [num_batched_tokens]
    positions: list[int]  # [num_batched_tokens] index of each token in its request's sequence
    slot_ids: list[int]  # [num_batched_tokens] block_id * block_size + offset: where each new K/V is stored
    query_start_locs: list[int]  # [num_chunks + 1] cumulative query lengths (cu_seqlens for varlen kernels)
    query_lens: list[int]  # [num_chunks] tokens computed this step
    context_lens: list[int]  # [num_chunks] tokens with K/V after this step: cached + new, what attention reads
    # [num_chunks][ceil(context_len / block_size)]: the requests' own block_ids lists, not copies (copying 256 tables
    # of 1K-4K tokens would cost 160 µs a step). They stay valid until the next schedule() appends to them.
    block_tables: list[list[int]]
    # Flat indices of the tokens whose logits are sampled: the last token of each chunk that completes its request
    # (the LM head runs on these rows only). logit_request_ids[j] is the request sampled at logit_indices[j].
    logit_indices: list[int]
    logit_request_ids: list[str]


def prepare_batch(output: SchedulerOutput, block_size: int) -> BatchMetadata:
    """Read between schedule() and update(): a chunk starts at its request's num_computed_tokens."""
    input_token_ids: list[int] = []
    positions: list[int] = []
    slot_ids: list[int] = []
    query_start_locs = [0]
    query_lens: list[int] = []
    context_lens: list[int] = []
    block_tables: list[list[int]] = []
    logit_indices: list[int] = []
    logit_request_ids: list[str] = []
    total = 0
    for request, count in output.chunks:
        block_ids = request.block_ids
        start = request.num_computed_tokens
        end = start + count
        if count == 1:  # decode: one token, one slot (the common case, kept cheap)
            num_prompt = len(request.prompt_token_ids)
            input_token_ids.append(request.output_token_ids[start - num_prompt] if start >= num_prompt
                                   else request.prompt_token_ids[start])
            positions.append(start)
            slot_ids.append(block_ids[start // block_size] * block_size + start % block_size)
        else:
            input_token_ids += request.token_ids_in(start, end)
            positions += range(start, end)
            position = start
            while position < end:  # one contiguous slot range per block
                block_index, offset = divmod(position, block_size)
                stop = min(end, position - offset + block_size)
                first_slot = block_ids[block_index] * block_size + offset
                slot_ids += range(first_slot, first_slot + stop - position)
                position = stop
        total += count
        query_start_locs.append(total)
        query_lens.append(count)
        context_lens.append(end)
        block_tables.append(block_ids)  # exactly ceil(end / block_size) blocks: append allocates no more
        if end == len(request.prompt_token_ids) + len(request.output_token_ids):
            logit_indices.append(total - 1)
            logit_request_ids.append(request.request_id)
    return BatchMetadata(input_token_ids, positions, slot_ids, query_start_locs, query_lens, context_lens,
                         block_tables, logit_indices, logit_request_ids)
