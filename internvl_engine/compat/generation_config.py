"""The `generation_config` dict of the model card (`dict(max_new_tokens=1024, do_sample=False)`), with the
transformers `generate` semantics the official `chat` relies on, turned into the engine's `SamplingParams`.

Defaults follow the InternLM2 generation config the official model inherits (top_k=50, top_p=1.0,
temperature=1.0), so `dict(max_new_tokens=..., do_sample=True)` samples exactly like the model card.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..engine.sampling_params import SamplingParams

_KNOWN_KEYS = {"max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed",
               "num_beams", "eos_token_id", "pad_token_id", "max_length", "min_new_tokens"}
# `generate` also takes output_logits and return_dict_in_generate; `chat` returns text, so it refuses them.


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 19  # transformers' default max_length 20 minus the BOS that generate() seeds
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None  # None: the LLM config's eos_token_id
    pad_token_id: int | None = None  # None: the LLM config's pad_token_id

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
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if isinstance(self.eos_token_id, (list, tuple)):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | "GenerationConfig" | None) -> "GenerationConfig":
        """From the dict users pass to `chat` (unknown keys are an error; beam search is not supported)."""
        if isinstance(options, GenerationConfig):
            return options
        options = dict(options or {})
        unknown = set(options) - _KNOWN_KEYS
        if unknown:
            raise ValueError(f"unsupported generation_config key(s): {sorted(unknown)}")
        if options.get("num_beams", 1) != 1:
            raise ValueError("beam search (num_beams > 1) is not supported")
        kwargs = {k: options[k] for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
                                           "repetition_penalty", "seed", "eos_token_id", "pad_token_id")
                  if options.get(k) is not None}
        return cls(**kwargs)

    def stop_token_ids(self, default_eos: int) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return (default_eos,)
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def sampling_params(self, max_tokens: int, stop_token_ids: Sequence[int], bos_token_id: int, generator: Any,
                        vocab_size: int, return_logits: bool = False) -> SamplingParams:
        """The engine's parameters for one row: stops only at `stop_token_ids` (as `generate` stops only at its
        eos_token_id), the penalty over the BOS that `generate` seeds plus the outputs, `generator` shared, top_k
        clamped to the vocabulary (as transformers' TopKLogitsWarper does)."""
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature if self.do_sample else 0.0,
                              top_p=self.top_p, top_k=min(self.top_k, vocab_size), repetition_penalty=self.repetition_penalty,
                              stop_token_ids=tuple(stop_token_ids), ignore_eos=True,
                              penalty_context_ids=(bos_token_id,), generator=generator, return_logits=return_logits)
