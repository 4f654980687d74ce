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


def warp(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Temperature, top-k, top-p on float32 logits [batch, vocab]; filtered entries become -inf."""
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k > 0:
        k = min(cfg.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - cfg.top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


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
