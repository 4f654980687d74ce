"""Per-request sampling parameters for the engine, and one batched sampling call that applies each row's own.

vLLM conventions: `temperature=0` is greedy; `top_k=-1`/`0` and `top_p=1` disable those filters; the
repetition penalty sees the prompt and the outputs. A seeded request draws from its own generator, so its
tokens do not depend on what else is in the batch. `max_tokens=None` generates up to the context length;
`stop` strings end a request where they appear in its text (they are not part of the output).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sampler import apply_repetition_penalty, filter_logits


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool)
                                            or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
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
    device = logits.device
    penalised = [row for row, p in enumerate(params) if p.repetition_penalty != 1.0 and histories[row]]
    if penalised:
        logits = logits.clone()
    for row in penalised:
        seen = torch.tensor(sorted(set(histories[row])), device=device)[None]
        logits[row: row + 1] = apply_repetition_penalty(logits[row: row + 1], seen, params[row].repetition_penalty)
    tokens = logits.argmax(dim=-1)
    sampling_rows = [row for row, p in enumerate(params) if not p.greedy]
    if sampling_rows:
        rows = torch.tensor(sampling_rows, device=device)
        chosen = [params[r] for r in sampling_rows]
        filtered = filter_logits(logits[rows], torch.tensor([p.temperature for p in chosen], device=device),
                                 torch.tensor([max(p.top_k, 0) for p in chosen], device=device),
                                 torch.tensor([p.top_p for p in chosen], device=device))
        probs = filtered.softmax(dim=-1)
        for i, row in enumerate(sampling_rows):  # each seeded request draws from its own generator
            tokens[row] = torch.multinomial(probs[i], 1, generator=generators[row])[0]
    return tokens.tolist()


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.seed is None or params.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator
