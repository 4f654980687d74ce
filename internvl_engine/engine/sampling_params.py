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

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

# The ranges the sampler's arithmetic can take (float32 logits, int32/int64 tensors). A value outside them would
# overflow or turn a row into inf/nan; it is refused here so that one request can never fail a batched step.
MIN_TEMPERATURE = 1e-5  # temperature is 0 (greedy) or at least this: logits / 1e-40 is inf in float32
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 2**31 - 1  # int32; the sampler clamps it to the vocabulary
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 bans a token, +100 all but forces it
SEED_RANGE = (-2**63, 2**63 - 1)  # int64


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
    # OpenAI's logit_bias: token id -> bias in [-100, 100], added to that token's logit before the penalty and
    # sampling (greedy rows too). Given as a mapping, kept as sorted (id, bias) pairs so the params stay hashable.
    logit_bias: Any = None

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
        _check_number("temperature", self.temperature)
        if self.temperature != 0 and not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                             f"got {self.temperature!r}")
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be -1 (off) or an integer in [0, {MAX_TOP_K}], got {self.top_k!r}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}], "
                             f"got {self.repetition_penalty!r}")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise ValueError(f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (int64), got {self.seed!r}")
        if not all(_is_int(i) for i in self.stop_token_ids):  # any integer: one outside the vocabulary never stops
            raise ValueError(f"stop_token_ids must be integers, got {self.stop_token_ids!r:.200}")
        if self.penalty_context_ids is not None and not all(_is_int(i) and 0 <= i < 2**31
                                                            for i in self.penalty_context_ids):
            raise ValueError(f"penalty_context_ids must be token ids (non-negative integers), got "
                             f"{self.penalty_context_ids!r:.200}")

        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", _logit_bias_pairs(self.logit_bias) or None)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _logit_bias_pairs(bias: Any) -> tuple[tuple[int, float], ...]:
    items = bias.items() if isinstance(bias, Mapping) else bias
    try:
        pairs = [(token, value) for token, value in items]
    except (TypeError, ValueError):
        raise ValueError(f"logit_bias must map token ids to numbers, got {bias!r:.200}") from None
    for token, value in pairs:
        if not _is_int(token) or token < 0:
            raise ValueError(f"logit_bias keys must be token ids (non-negative integers), got {token!r:.50}")
        _check_number(f"logit_bias[{token}]", value)
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias[{token}] must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {value!r}")
    if len({token for token, _ in pairs}) != len(pairs):
        raise ValueError("logit_bias has a token id more than once")
    return tuple(sorted((token, float(value)) for token, value in pairs))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
