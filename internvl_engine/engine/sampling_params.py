"""Per-request sampling parameters (plain Python: no torch here).

vLLM conventions: `temperature=0` is greedy; `top_k=-1`/`0` and `top_p=1` disable those filters; the
repetition penalty sees the prompt and the outputs. A seeded request draws from its own generator, so its
tokens do not depend on what else is in the batch. `max_tokens=None` generates up to the context length;
`stop` strings end a request where they appear in its text (they are not part of the output).

Two options carry the official model card's semantics, which `model.chat`/`batch_chat` set: `penalty_context_ids`
(transformers' `generate` given only embeddings penalises the BOS it seeds and the outputs, not the prompt) and
`generator` (the rows of one `batch_chat` draw from one random stream).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    # Ids the repetition penalty sees before the outputs; None: the prompt's (vLLM).
    penalty_context_ids: tuple[int, ...] | None = None
    # A torch.Generator to draw from, shared by requests that must consume one random stream (overrides seed);
    # None with no seed: torch's global generator.
    generator: Any = field(default=None, compare=False)
    # RequestOutput.logits: the float32 logits [outputs, vocab] each token was sampled from (before the
    # penalty and temperature), as transformers' `output_logits`; for comparisons with other implementations.
    return_logits: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool)
                                            or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.penalty_context_ids is not None:
            object.__setattr__(self, "penalty_context_ids", tuple(self.penalty_context_ids))
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
