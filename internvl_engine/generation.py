"""The simple generation loop behind `chat` / `batch_chat`: one prefill, then one token per step.

Semantics follow transformers 4.37 `generate` as the official `chat` uses it: positions count from each
row's first real token (left padding), a finished row keeps emitting the pad id, the LM head runs only on the
positions that are sampled, and the repetition penalty sees the ids `generate` holds (the BOS it seeds when
given only embeddings, then the generated ids).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .kv_cache import DenseKVCache
from .paged_kv_cache import PagedKVCache
from .models.internvl_chat import InternVLChatModel
from .sampler import GenerationConfig, Sampler


@dataclass
class GenerationResult:
    sequences: list[list[int]]  # per row: generated ids, up to and including the stop id
    prefill_logits: torch.Tensor | None  # [batch, vocab] of the last prompt position
    step_logits: list[torch.Tensor]  # per step [batch, vocab] (only when asked for)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


def _synchronize(device: torch.device) -> None:
    """Stage timings must include queued GPU work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_kv_cache(model: InternVLChatModel, batch: int, capacity: int, dtype: torch.dtype,
                  device: torch.device) -> DenseKVCache | PagedKVCache:
    """The torch backend keeps the official dense cache; the triton backend pages it for the decode kernel."""
    cfg = model.language_model.cfg
    if model.resolved_backend() == "triton":
        return PagedKVCache(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, cfg.head_dim, capacity, dtype,
                            device, use_triton=True)
    return DenseKVCache(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, cfg.head_dim, capacity, dtype, device)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq] 0/1 -> positions counted from each row's first real token; padding gets 1 (official)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


@torch.inference_mode()
def generate(model: InternVLChatModel, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
             cfg: GenerationConfig, stop_ids: set[int], pad_id: int, bos_id: int,
             keep_logits: bool = False) -> GenerationResult:
    """inputs_embeds [batch, seq, H], attention_mask [batch, seq] -> generated ids per row."""
    lm = model.language_model
    batch, seq, _ = inputs_embeds.shape
    device = inputs_embeds.device
    attention_mask = attention_mask.to(device)
    cache = make_kv_cache(model, batch, seq + cfg.max_new_tokens, inputs_embeds.dtype, device)
    sampler = Sampler(cfg, device)
    positions = positions_from_mask(attention_mask)

    start = time.perf_counter()
    cache.begin_forward(attention_mask.bool())
    hidden = lm(inputs_embeds, positions, cache, cache.rope_lengths())
    cache.end_forward()
    logits = lm.logits(hidden[:, -1])  # [batch, vocab]
    _synchronize(device)
    first_token_ready = time.perf_counter()
    prefill_logits = logits if keep_logits else None

    seen = torch.full((batch, 1), bos_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    step_logits: list[torch.Tensor] = []
    next_positions = positions[:, -1:] + 1
    for step in range(cfg.max_new_tokens):
        if keep_logits:
            step_logits.append(logits)
        tokens = sampler(logits, seen)
        tokens = torch.where(finished, torch.full_like(tokens, pad_id), tokens)
        seen = torch.cat([seen, tokens[:, None]], dim=1)
        finished |= torch.isin(tokens, stop)
        if bool(finished.all()) or step == cfg.max_new_tokens - 1:
            break
        embeds = lm.embed(tokens[:, None])
        cache.begin_forward(torch.ones(batch, 1, dtype=torch.bool, device=device))
        hidden = lm(embeds, next_positions, cache, cache.rope_lengths())
        cache.end_forward()
        logits = lm.logits(hidden[:, -1])
        next_positions = next_positions + 1

    _synchronize(device)
    done = time.perf_counter()
    sequences = []
    for row in seen[:, 1:].tolist():
        out = []
        for token in row:
            out.append(token)
            if token in stop_ids:
                break
        sequences.append(out)
    return GenerationResult(sequences=sequences, prefill_logits=prefill_logits, step_logits=step_logits,
                            prefill_seconds=first_token_ready - start, decode_seconds=done - first_token_ready)
