"""Token selection with the transformers `generate` semantics the official `chat` relies on.

Order as in transformers: repetition penalty, then (sampling only) temperature, top-k, top-p, then a draw.
Defaults follow the InternLM2 generation config the official model inherits (top_k=50, top_p=1.0,
temperature=1.0), so `dict(max_new_tokens=..., do_sample=True)` samples exactly like the model card.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

_KNOWN_KEYS = {"max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed",
               "num_beams", "eos_token_id", "pad_token_id", "max_length", "min_new_tokens"}


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 19  # transformers' default max_length 20 minus the BOS that generate() seeds
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> "GenerationConfig":
        """From the dict users pass to `chat` (unknown keys are an error; beam search is not supported)."""
        options = dict(options or {})
        unknown = set(options) - _KNOWN_KEYS
        if unknown:
            raise ValueError(f"unsupported generation_config key(s): {sorted(unknown)}")
        if options.get("num_beams", 1) != 1:
            raise ValueError("beam search (num_beams > 1) is not supported")
        kwargs = {k: options[k] for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
                                           "repetition_penalty", "seed") if options.get(k) is not None}
        return cls(**kwargs)


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
    most 1 - top_p and always keeps the most likely one. One batched pass serves `chat` and the engine.
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


def warp(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """`filter_logits` with one configuration for every row."""
    rows = logits.shape[0]
    return filter_logits(logits, torch.full((rows,), float(cfg.temperature), device=logits.device),
                         torch.full((rows,), cfg.top_k, device=logits.device),
                         torch.full((rows,), float(cfg.top_p), device=logits.device))


class Sampler:
    """Picks the next token of every row; seeded draws are reproducible run to run."""

    def __init__(self, cfg: GenerationConfig, device: torch.device | str) -> None:
        self.cfg = cfg
        self.generator: torch.Generator | None = None
        if cfg.do_sample and cfg.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(cfg.seed)

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """logits [batch, vocab] float32, seen [batch, n] -> next ids [batch] int64."""
        logits = apply_repetition_penalty(logits, seen, self.cfg.repetition_penalty)
        if not self.cfg.do_sample:
            return logits.argmax(dim=-1)
        probs = warp(logits, self.cfg).softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
