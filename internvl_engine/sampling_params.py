"""Per-request sampling parameters for the engine, and one batched sampling call that applies each row's own.

vLLM conventions: `temperature=0` is greedy; `top_k=-1`/`0` and `top_p=1` disable those filters; the
repetition penalty sees the prompt and the outputs. A seeded request draws from its own generator, so its
tokens do not depend on what else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or a non-negative integer, got {self.top_k!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], histories: list[list[int]],
                 generators: list[torch.Generator | None]) -> list[int]:
    """logits [batch, vocab] float32 -> one token per row, each row with its own parameters.

    Greedy rows take the argmax after their repetition penalty; sampling rows are filtered in one batched
    pass (per-row temperature, top-k, top-p as tensors) and drawn with their own generator if seeded.
    The single `.tolist()` at the end is the only host sync.
    """
    batch, vocab = logits.shape
    device = logits.device
    penalties = torch.tensor([p.repetition_penalty for p in params], device=device)
    if bool((penalties != 1.0).any()):
        logits = logits.clone()
        for row, (p, history) in enumerate(zip(params, histories)):
            if p.repetition_penalty != 1.0 and history:
                seen = torch.tensor(sorted(set(history)), device=device)
                score = logits[row, seen]
                logits[row, seen] = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
    greedy_tokens = logits.argmax(dim=-1)
    sampling_rows = [row for row, p in enumerate(params) if not p.greedy]
    if not sampling_rows:
        return greedy_tokens.tolist()
    rows = torch.tensor(sampling_rows, device=device)
    scores = logits[rows] / torch.tensor([params[r].temperature for r in sampling_rows], device=device)[:, None]
    top_k = torch.tensor([params[r].top_k if params[r].top_k > 0 else vocab for r in sampling_rows], device=device)
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)[None, :]
    drop = ranks >= top_k[:, None].clamp(max=vocab)
    top_p = torch.tensor([params[r].top_p for r in sampling_rows], device=device)[:, None]
    probs = sorted_scores.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p
    sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
    probs = sorted_scores.softmax(dim=-1)
    drawn = []
    for i, row in enumerate(sampling_rows):
        choice = torch.multinomial(probs[i], 1, generator=generators[row])
        drawn.append(order[i, choice])
    sampled = torch.cat(drawn)
    tokens = greedy_tokens.clone()
    tokens[rows] = sampled
    return tokens.tolist()


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.seed is None or params.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator
