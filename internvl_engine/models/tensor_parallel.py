"""Megatron-style tensor parallelism for the LLM, by module surgery on a normally built model.

`TensorParallelShard(rank, world_size).apply(model)` keeps, in place, only this rank's slice of every LLM
matrix, so the model files need no change:
- column-parallel (output rows split; no communication): InternLM2's `wqkv` by whole KV groups (its rows are
  [groups q heads, 1 k head, 1 v head] per KV head), Phi-3's `qkv_proj` (q, k and v rows each split),
  `w1`/`w3` and Phi-3's `gate_up_proj` (gate and up halves split separately);
- row-parallel (input columns split, one all-reduce of the output): `wo`/`o_proj` and `w2`/`down_proj`; a bias
  is kept on rank 0 only (zeros elsewhere) so the sum adds it once;
- vocab-parallel embedding (each rank looks up its rows, an all-reduce sums) and LM head (each rank computes
  its vocab columns, gathered on rank 0; vocab need not divide: the last rank holds fewer rows).
The attention modules get this rank's head counts, and `model.config.llm` becomes a `ShardedLLMConfig` (head
counts per rank, head_dim unchanged), so the KV cache each rank allocates holds its own KV heads only.

Int8 Linears (`Int8Linear`: int8 `weight` [out, in], per-row `SCB`) split the same way: a column split takes
rows of `weight` and `SCB`; a row split takes columns of `weight` and keeps `SCB` (the row scales are whole).

The same object is the loader's slicing hook (`models/weights.load_checkpoint(shard=...)`): `apply` on the meta
model fixes the shapes, then `take(name, safe_open(...).get_slice(name))` reads only this rank's slice.
The ViT and the projector are replicated (InternViT-6B's 25 heads do not split; its tiles do: see
worker/tensor_parallel_runner.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import LLMConfig

# name -> (row ranges of dim 0 to concatenate | None, column range of dim 1 | None, zeros instead)
Split = tuple[list[tuple[int, int]] | None, tuple[int, int] | None, bool]


@dataclass(frozen=True)
class ShardedLLMConfig(LLMConfig):
    """One rank's view: num_attention_heads and num_key_value_heads are this rank's; head_dim is the model's."""

    tensor_parallel_size: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // (self.num_attention_heads * self.tensor_parallel_size)


class VocabParallelEmbedding(nn.Module):
    """Rows [start, end) of the embedding table; ids outside give zeros, and the all-reduce sums the ranks."""

    def __init__(self, weight: torch.Tensor, start: int, end: int, group: Any = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start, self.end, self.group = start, end, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        inside = (ids >= self.start) & (ids < self.end)
        if self.end > self.start:
            local = torch.where(inside, ids - self.start, torch.zeros_like(ids))
            out = F.embedding(local, self.weight).masked_fill(~inside[..., None], 0)
        else:  # more ranks than rows: this rank holds none
            out = self.weight.new_zeros(*ids.shape, self.weight.shape[1])
        dist.all_reduce(out, group=self.group)
        return out


def vocab_range(vocab: int, rank: int, world_size: int) -> tuple[int, int]:
    per = -(-vocab // world_size)
    return min(rank * per, vocab), min((rank + 1) * per, vocab)


class TensorParallelShard:
    """This rank's slice of the LLM: `apply` (module surgery) and the loader hooks `shape` / `take`."""

    def __init__(self, rank: int, world_size: int, group: Any = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a tensor-parallel group of {world_size}")
        self.rank, self.world_size, self.group = rank, world_size, group
        self.splits: dict[str, Split] = {}

    # ---- loader hooks ----
    def splits_tensor(self, name: str) -> bool:
        return name in self.splits

    def shape(self, name: str, full: tuple[int, ...]) -> tuple[int, ...]:
        """The shape this rank holds of a checkpoint tensor whose full shape is `full`."""
        if name not in self.splits:
            return full
        return tuple(self.take(name, torch.empty(full, device="meta")).shape)

    def take(self, name: str, source: Any) -> torch.Tensor:
        """This rank's part of tensor `name` from `source`: a tensor, or a safetensors slice (reads only it)."""
        rows, columns, zeros = self.splits[name]
        if rows is not None:
            parts = [source[a:b] for a, b in rows]
            part = parts[0] if len(parts) == 1 else torch.cat(parts)
        elif columns is not None:
            part = source[:, columns[0]: columns[1]]
        else:
            part = source[:]
        if zeros:
            return torch.zeros_like(part)
        if isinstance(source, torch.Tensor):  # a view would keep the whole tensor's storage alive
            return part.clone(memory_format=torch.contiguous_format)
        return part

    # ---- surgery ----
    def apply(self, model: nn.Module) -> nn.Module:
        """Shard `model`'s LLM in place (meta or loaded weights); returns the model."""
        cfg, world = model.config.llm, self.world_size
        for what, count in (("attention heads", cfg.num_attention_heads), ("KV heads", cfg.num_key_value_heads),
                            ("intermediate size", cfg.intermediate_size)):
            if count % world:
                raise ValueError(f"tensor_parallel_size {world} does not divide the LLM's {what} ({count}); "
                                 f"use a divisor of {count}")
        lm, prefix = model.language_model, "language_model."
        phi3 = cfg.architecture == "Phi3ForCausalLM"
        heads, kv_heads, d, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
        r = self.rank
        kv_local, heads_local, inter_local = kv_heads // world, heads // world, inter // world
        for index, layer in enumerate(lm.decoder_layers):
            if phi3:
                base, attention = f"{prefix}model.layers.{index}.", layer.self_attn
                q_rows, kv_rows = heads_local * d, kv_local * d
                self._column(model, base + "self_attn.qkv_proj", [
                    (r * q_rows, (r + 1) * q_rows),
                    (heads * d + r * kv_rows, heads * d + (r + 1) * kv_rows),
                    ((heads + kv_heads) * d + r * kv_rows, (heads + kv_heads) * d + (r + 1) * kv_rows)])
                self._row(model, base + "self_attn.o_proj", (r * q_rows, (r + 1) * q_rows))
                self._column(model, base + "mlp.gate_up_proj", [(r * inter_local, (r + 1) * inter_local),
                                                                 (inter + r * inter_local, inter + (r + 1) * inter_local)])
                self._row(model, base + "mlp.down_proj", (r * inter_local, (r + 1) * inter_local))
            else:
                base, attention = f"{prefix}model.layers.{index}.", layer.attention
                group_rows = (heads // kv_heads + 2) * d  # one KV group: its q heads, one k, one v
                self._column(model, base + "attention.wqkv",
                             [(r * kv_local * group_rows, (r + 1) * kv_local * group_rows)])
                self._row(model, base + "attention.wo", (r * heads_local * d, (r + 1) * heads_local * d))
                for name in ("w1", "w3"):
                    self._column(model, base + f"feed_forward.{name}", [(r * inter_local, (r + 1) * inter_local)])
                self._row(model, base + "feed_forward.w2", (r * inter_local, (r + 1) * inter_local))
            attention.num_heads = heads_local
            attention.num_kv_heads = kv_local
        start, end = vocab_range(cfg.vocab_size, r, world)
        embed_name = prefix + ("model.embed_tokens" if phi3 else "model.tok_embeddings")
        self.splits[embed_name + ".weight"] = ([(start, end)], None, False)
        embedding = model.get_submodule(embed_name)
        parent, leaf = self._parent(model, embed_name)
        setattr(parent, leaf, VocabParallelEmbedding(self.take(embed_name + ".weight", embedding.weight.data),
                                                     start, end, self.group))
        head_name = prefix + ("lm_head" if phi3 else "output")
        self._column(model, head_name, [(start, end)])
        model.get_submodule(head_name).register_forward_hook(self._gather_vocab_hook(cfg.vocab_size))
        values = {field.name: getattr(cfg, field.name) for field in dataclasses.fields(LLMConfig)}
        values.update(num_attention_heads=heads_local, num_key_value_heads=kv_local)
        model.config = dataclasses.replace(model.config, llm=ShardedLLMConfig(**values, tensor_parallel_size=world))
        model.tensor_parallel_rank, model.tensor_parallel_size = r, world
        return model

    @staticmethod
    def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
        parent_name, _, leaf = name.rpartition(".")
        return model.get_submodule(parent_name), leaf

    def _replace(self, module: nn.Module, module_name: str, leaf: str, split: Split) -> None:
        value = getattr(module, leaf, None)
        if value is None:
            return
        self.splits[f"{module_name}.{leaf}"] = split
        setattr(module, leaf, nn.Parameter(self.take(f"{module_name}.{leaf}", value.data), requires_grad=False))

    def _column(self, model: nn.Module, name: str, rows: list[tuple[int, int]]) -> None:
        module = model.get_submodule(name)
        for leaf in ("weight", "bias", "SCB"):
            self._replace(module, name, leaf, (rows, None, False))
        module.out_features = sum(b - a for a, b in rows)

    def _row(self, model: nn.Module, name: str, columns: tuple[int, int]) -> None:
        module = model.get_submodule(name)
        self._replace(module, name, "weight", (None, columns, False))
        self._replace(module, name, "bias", (None, None, self.rank != 0))  # added once, by rank 0's partial sum
        module.in_features = columns[1] - columns[0]
        group = self.group

        def all_reduce(_module: nn.Module, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(out, group=group)
            return out

        module.register_forward_hook(all_reduce)

    def _gather_vocab_hook(self, vocab: int):
        world, rank, group = self.world_size, self.rank, self.group
        per = -(-vocab // world)

        def gather(_module: nn.Module, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
            """[..., local vocab] -> [..., vocab] on rank 0 (other ranks keep their part: only rank 0 samples)."""
            padded = F.pad(out, (0, per - out.shape[-1])).contiguous()
            parts = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
            dist.gather(padded, parts, dst=0, group=group)
            if rank != 0:
                return out
            return torch.cat(parts, dim=-1)[..., :vocab]

        return gather
