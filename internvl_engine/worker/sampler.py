"""The batched sampler: one call picks the next token of every sampled row, each with its own parameters.

Order and tie rules as in transformers' `generate` (the official `chat` relies on them): the logit bias (OpenAI's
`logit_bias`, applied first as vLLM does), repetition penalty, then (sampling rows only) temperature, top-k, top-p, then a draw. Rows that share a generator (the rows of one
`batch_chat`, or every unseeded row, which use torch's global generator as transformers does) draw in one
`multinomial` call, in row order, so a batch consumes one random stream as the official batched draw does.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class RowSampling(NamedTuple):
    """How one row is sampled. temperature 0 is greedy; top_k <= 0 and top_p == 1 disable those filters."""

    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    penalized_ids: Sequence[int]  # ids the repetition penalty applies to (empty when it is 1.0)
    generator: torch.Generator | None  # None: torch's global generator
    logit_bias: Sequence[tuple[int, float]] = ()  # (token id, bias added to its logit); ids within the vocabulary


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [batch, vocab]; seen [batch, n] ids already in the sequence: divide positive, multiply negative."""
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


def sample_batch(logits: torch.Tensor, rows: Sequence[RowSampling]) -> list[int | None]:
    """logits [batch, vocab] float32 -> one token per row, or None for a row that cannot be sampled.

    Greedy rows take the argmax after their repetition penalty; sampling rows are filtered in one batched pass
    (per-row temperature, top-k, top-p as tensors). A row whose logits hold nan or +inf, or whose filtered
    distribution is not finite, is that row's failure alone: it gets None (its request fails) and draws from a
    stand-in distribution so the batched draw never raises. The single `.tolist()` at the end is the only host
    sync.
    """
    device = logits.device
    penalized = [index for index, row in enumerate(rows) if row.repetition_penalty != 1.0 and row.penalized_ids]
    biased = [(index, token, value) for index, row in enumerate(rows) for token, value in row.logit_bias]
    if penalized or biased:
        logits = logits.clone()
    if biased:  # one scatter for every row's bias: [entries] row, token, value
        where, tokens, values = zip(*biased)
        logits.index_put_((torch.tensor(where, device=device), torch.tensor(tokens, device=device)),
                          torch.tensor(values, dtype=logits.dtype, device=device), accumulate=True)
    for index in penalized:
        row = rows[index]
        seen = torch.tensor(sorted(set(row.penalized_ids)), device=device)[None]
        logits[index: index + 1] = apply_repetition_penalty(logits[index: index + 1], seen, row.repetition_penalty)
    failed = ~(logits < float("inf")).all(dim=-1)  # [batch]: nan or +inf anywhere (-inf is a masked token)
    tokens = logits.argmax(dim=-1)
    sampling = [index for index, row in enumerate(rows) if row.temperature != 0]
    if sampling:
        picked = torch.tensor(sampling, device=device)
        chosen = [rows[index] for index in sampling]
        filtered = filter_logits(logits[picked], torch.tensor([row.temperature for row in chosen], device=device),
                                 torch.tensor([max(row.top_k, 0) for row in chosen], device=device),
                                 torch.tensor([row.top_p for row in chosen], device=device))
        probs = filtered.softmax(dim=-1)
        bad = ~torch.isfinite(probs).all(dim=-1) | ~(probs.sum(dim=-1) > 0)  # [len(sampling)]
        failed[picked] |= bad
        probs = torch.where(bad[:, None], torch.ones_like(probs), probs)  # a harmless stand-in for failed rows
        groups: dict[int, list[int]] = {}  # generator identity -> positions in `sampling`, in row order
        for position, row in enumerate(chosen):
            groups.setdefault(id(row.generator), []).append(position)
        for positions in groups.values():
            generator = chosen[positions[0]].generator
            draws = torch.multinomial(probs[positions], 1, generator=generator).squeeze(1)
            tokens[picked[positions]] = draws
    values = torch.cat([tokens, failed.to(tokens.dtype)]).tolist()
    count = len(rows)
    return [None if values[count + index] else token for index, token in enumerate(values[:count])]
