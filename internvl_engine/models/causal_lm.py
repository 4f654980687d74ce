"""What the engine calls on any of the family's LLMs (InternLM2, Phi-3): `embed`, `forward`, `logits`, `rotary`.

A subclass provides its token embedding (`embed`), its decoder layers and final norm (`decoder_layers`,
`final_norm`), its output head (`output`) and its rotary (`rotary`: `cos_sin`, `variant`,
`static_rope_lengths`); the forward pass over them is the same for both.
"""
from __future__ import annotations

import abc
from typing import Protocol

import torch
from torch import nn


class KVCacheLike(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class CausalLM(nn.Module, abc.ABC):
    rotary: nn.Module
    decoder_layers: nn.ModuleList
    final_norm: nn.Module
    output: nn.Linear

    @abc.abstractmethod
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [batch, seq] -> embeddings [batch, seq, H]."""

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, cache: KVCacheLike,
                rope_lengths: list[int] | torch.Tensor, output_hidden_states: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """inputs_embeds [batch, seq, H], positions [batch, seq] -> final-norm hidden [batch, seq, H].

        `rope_lengths`: per row (list) or per token ([batch, seq] tensor), the sequence length the official
        rotary sees at this forward (it picks InternLM2's dynamic-NTK base or Phi-3's su factor list). With
        `output_hidden_states`, also the embeddings and each layer's output, the last one replaced by the final
        norm's (the official order).
        """
        cos, sin = self.rotary.cos_sin(positions, rope_lengths, inputs_embeds.dtype)
        hidden = inputs_embeds
        states = [hidden]
        for layer in self.decoder_layers:
            hidden = layer(hidden, cos, sin, cache)
            states.append(hidden)
        hidden = self.final_norm(hidden)
        if output_hidden_states:
            states[-1] = hidden
            return hidden, states
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> float32 logits [..., vocab]; callers pass only the positions they sample."""
        return self.output(hidden).float()
