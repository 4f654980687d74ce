"""The batched sampler: one call picks the next token of every sampled row, each with its own parameters.

Order and tie rules as in transformers' `generate` (the official `chat` relies on them): the logit bias (OpenAI's
`logit_bias`, applied first as vLLM does), repetition penalty, then (sampling rows only) temperature, top-k,
top-p, then a draw.

No host sync before the tokens: the rows' parameters reach the device in one pinned, non_blocking copy per
dtype (`staging.to_device`), the penalty and the bias are one gather/scatter each over the batch, and a draw is
the exponential race `argmax(probs / q)` with q ~ Exp(1), in one batched op. Rows that share a generator (the
rows of one `batch_chat`; every unseeded row, which uses torch's global generator as transformers does) take
their noise from one `exponential_` call on it, in row order, and a seeded request's row from its own
generator: its tokens never depend on the rest of the batch. That is how `torch.multinomial` draws one sample
(its fast path fills an Exp(1) tensor from the generator and takes the same argmax), so the streams are the
ones multinomial would consume, without its two validation syncs. A row marked `official_draw` still goes
through `torch.multinomial` itself, so the model card's random stream is exactly transformers'.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .staging import device_guard, to_device


class RowSampling(NamedTuple):
    """How one row is sampled. temperature 0 is greedy; top_k <= 0 and top_p == 1 disable those filters."""

    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    penalized_ids: Sequence[int]  # ids the repetition penalty applies to (empty when it is 1.0)
    generator: torch.Generator | None  # None: torch's global generator
    logit_bias: Sequence[tuple[int, float]] = ()  # (token id, bias added to its logit); ids within the vocabulary
    # True: drawn by torch.multinomial from `generator`, together with the other rows sharing it (transformers'
    # call, two host syncs); False: by the batched exponential race, which gives the same draws without a sync.
    official_draw: bool = True


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [batch, vocab]; seen [batch, n] ids already in the sequence: divide positive, multiply negative.

    A row may repeat an id (padding): the gathered score, and so the scattered one, is the same each time."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    score = logits.gather(1, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, seen, score)


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
                  ) -> torch.Tensor:
    """Per-row temperature, top-k, top-p on float32 logits [batch, vocab]; filtered entries become -inf.

    temperature, top_p: [batch] float; top_k: [batch] int (0 = off). transformers' order and tie rules: top-k
    keeps every logit equal to the k-th, top-p drops tokens whose cumulative mass from the least likely is at
    most 1 - top_p and always keeps the most likely one.
    """
    vocab = logits.shape[-1]
    logits = logits / temperature[:, None]
    ascending, order = torch.sort(logits, dim=-1)  # [batch, vocab]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    kth = ascending.gather(1, (vocab - k)[:, None])  # the k-th largest logit of each row
    ascending = ascending.masked_fill(ascending < kth, float("-inf"))
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = (cumulative <= (1 - top_p)[:, None]) & (top_p < 1.0)[:, None]
    remove_sorted[:, -1] = False  # always keep the most likely token
    remove_sorted |= ascending == float("-inf")
    return logits.masked_fill(remove_sorted.scatter(1, order, remove_sorted), float("-inf"))


def _generator_groups(rows: Sequence[RowSampling], indices: Sequence[int]) -> list[list[int]]:
    """`indices` grouped by their row's generator (None is torch's global one), in row order within a group."""
    groups: dict[int, list[int]] = {}
    for index in indices:
        groups.setdefault(id(rows[index].generator), []).append(index)
    return list(groups.values())


def sample_batch(logits: torch.Tensor, rows: Sequence[RowSampling]) -> list[int | None]:
    """logits [batch, vocab] float32 -> one token per row, or None for a row that cannot be sampled.

    Greedy rows take the argmax after their repetition penalty; sampling rows are filtered in one batched pass
    (per-row temperature, top-k, top-p as tensors). A row whose logits hold nan or +inf, or whose filtered
    distribution is not finite, is that row's failure alone: it gets None (its request fails) and draws from a
    stand-in distribution so the batched draw never raises. The single `.tolist()` at the end is the only host
    sync (besides torch.multinomial's own, for `official_draw` rows).
    """
    if logits.shape[0] != len(rows):
        raise ValueError(f"{logits.shape[0]} rows of logits for {len(rows)} rows of sampling parameters")
    with device_guard(logits.device):  # torch's global CUDA generator is the current device's
        return _sample_batch(logits, rows)


def _sample_batch(logits: torch.Tensor, rows: Sequence[RowSampling]) -> list[int | None]:
    device = logits.device
    count = len(rows)
    biased = [(index, token, value) for index, row in enumerate(rows) for token, value in row.logit_bias]
    # Penalised rows by penalty value (one group per value, usually one): a Python-float penalty keeps transformers'
    # arithmetic exactly (on CUDA, dividing by a Python float multiplies by its reciprocal; by a tensor, it divides).
    penalties: dict[float, list[int]] = {}
    for index, row in enumerate(rows):
        if row.repetition_penalty != 1.0 and row.penalized_ids:
            penalties.setdefault(row.repetition_penalty, []).append(index)
    sampling = [index for index, row in enumerate(rows) if row.temperature != 0]
    position = {index: p for p, index in enumerate(sampling)}  # row -> its row in the sampling rows' tensors
    official = _generator_groups(rows, [index for index in sampling if rows[index].official_draw])
    raced = _generator_groups(rows, [index for index in sampling if not rows[index].official_draw])
    raced_rows = [index for group in raced for index in group]  # grouped by generator: one noise block each

    # Every index list in one host->device copy, every float in another.
    penalty_lists: list[list[int]] = []  # per penalty value: its rows [members], their ids [members * width]
    for members in penalties.values():
        seen = [list(set(rows[index].penalized_ids)) for index in members]
        width = max(len(ids) for ids in seen)  # shorter rows repeat their first id: a repeat changes nothing
        flat: list[int] = []
        for ids in seen:
            flat += ids
            flat += ids[:1] * (width - len(ids))
        penalty_lists += [members, flat]
    int_lists = [sampling, [max(row.top_k, 0) for row in map(rows.__getitem__, sampling)],
                 [index for index, _, _ in biased], [token for _, token, _ in biased],
                 raced_rows, [position[index] for index in raced_rows],
                 *([position[index] for index in group] for group in official), *official, *penalty_lists]
    staged = to_device(device, int_lists)
    picked, top_k, bias_rows, bias_tokens, raced_index, raced_positions = staged[:6]
    official_positions = staged[6: 6 + len(official)]
    official_index = staged[6 + len(official): 6 + 2 * len(official)]
    penalty_staged = staged[6 + 2 * len(official):]
    temperature, top_p, bias_values = to_device(device, [
        [rows[index].temperature for index in sampling], [rows[index].top_p for index in sampling],
        [value for _, _, value in biased]], dtype=torch.float32)

    if biased or penalties:
        logits = logits.clone()
    if biased:  # one scatter for every row's bias
        logits.index_put_((bias_rows, bias_tokens), bias_values, accumulate=True)
    for penalty, members, seen in zip(penalties, penalty_staged[0::2], penalty_staged[1::2]):
        seen = seen.view(len(members), -1)  # [members, width]
        logits.index_copy_(0, members, apply_repetition_penalty(logits.index_select(0, members), seen, penalty))
    failed = ~(logits < float("inf")).all(dim=-1)  # [batch]: nan or +inf anywhere (-inf is a masked token)
    tokens = logits.argmax(dim=-1)
    if sampling:
        probs = filter_logits(logits.index_select(0, picked), temperature, top_k, top_p).softmax(dim=-1)
        bad = ~torch.isfinite(probs).all(dim=-1) | ~(probs.sum(dim=-1) > 0)  # [len(sampling)]
        failed[picked] |= bad
        probs = torch.where(bad[:, None], torch.ones_like(probs), probs)  # a harmless stand-in for failed rows
        if raced_rows:
            chosen = probs.index_select(0, raced_positions)  # [raced, vocab], grouped by generator
            noise = torch.empty_like(chosen)
            start = 0
            for group in raced:  # one exponential_ per generator, over its rows in row order
                noise[start: start + len(group)].exponential_(generator=rows[group[0]].generator)
                start += len(group)
            # argmax(p / q), q ~ Exp(1): a draw from p (Gumbel-max in exponential form); q is never 0 in practice,
            # and the clamp keeps a 0 from turning a masked token's 0 / 0 into a nan that argmax would pick.
            tokens.index_copy_(0, raced_index, (chosen / noise.clamp(min=torch.finfo(noise.dtype).tiny)).argmax(-1))
        for group, positions, index in zip(official, official_positions, official_index):
            draws = torch.multinomial(probs.index_select(0, positions), 1, generator=rows[group[0]].generator)
            tokens.index_copy_(0, index, draws.squeeze(1))
    values = torch.cat([tokens, failed.to(tokens.dtype)]).tolist()
    return [None if values[count + index] else token for index, token in enumerate(values[:count])]
