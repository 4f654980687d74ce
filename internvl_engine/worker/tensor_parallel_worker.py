"""The process of a tensor-parallel rank > 0: load this rank's shard, then run every step the driver sends.

The driver (rank 0: the LLM's own process, `tensor_parallel_runner.TPModelRunner`) owns the scheduler, the block
manager and the sampler. Over a pipe it sends each step's command: `("forward", BatchMetadata without its image
features, [(first row, rows)])` or `("vit", tiles, tile shape)`, or `("stop",)`; the tensors go through the
process group (image features broadcast, ViT tiles scattered and features gathered), and every rank runs the
same forward on its shard of the LLM (its all-reduces pair with the driver's). A closed pipe (the driver is
gone) ends the process; any error prints its traceback and exits non-zero, which the driver reports.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..models.tensor_parallel import TensorParallelShard


@dataclass(frozen=True)
class ModelSource:
    """How every rank builds its own shard: from a checkpoint folder (each rank reads only its slices), or a
    preset with random weights (built whole with the same seed, then sliced: needs the whole model's memory)."""

    path: str | None
    preset: str | None
    dtype: torch.dtype
    device: str  # the driver's device; rank r uses cuda index + r
    seed: int
    load_in_8bit: bool
    world_size: int

    def device_for(self, rank: int) -> torch.device:
        device = torch.device(self.device)
        if device.type != "cuda":
            return device
        return torch.device("cuda", (device.index or 0) + rank)

    def build(self, rank: int, progress: bool | None = False) -> Any:
        device = self.device_for(rank)
        shard = TensorParallelShard(rank, self.world_size)
        if self.path is not None:
            from ..models.loader import load_model

            return load_model(Path(self.path), dtype=self.dtype, device=device, load_in_8bit=self.load_in_8bit,
                              progress=progress, shard=shard)
        from ..models.presets import build_random_model

        model = build_random_model(self.preset, self.dtype, device, self.seed, int8=self.load_in_8bit,
                                   progress=bool(progress))
        return shard.apply(model)


@dataclass(frozen=True)
class RunnerSettings:
    block_size: int
    kv_cache_bytes: int | None
    kv_cache_fraction: float
    max_model_len: int
    max_num_seqs: int
    backend: str
    timeout_s: float


def candidate_kv_cache_bytes(device: torch.device, kv_cache_bytes: int | None, fraction: float) -> int:
    """What this rank could give the KV cache (ModelRunner's rule); the ranks take the smallest, so that every
    rank's cache has the same number of blocks."""
    if kv_cache_bytes is not None:
        return kv_cache_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * fraction)
    return 256 << 20


def init_group(rank: int, world_size: int, port: int, device: torch.device, timeout_s: float) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))


def worker_main(rank: int, port: int, source: ModelSource, settings: RunnerSettings, conn: Any) -> None:
    """The entry point of rank `rank`'s process (torch.multiprocessing spawn)."""
    try:
        device = source.device_for(rank)
        if device.type == "cpu":  # the ranks share the host's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // source.world_size))
        model = source.build(rank).set_backend(settings.backend)
        conn.send(("ready", candidate_kv_cache_bytes(device, settings.kv_cache_bytes, settings.kv_cache_fraction)))
        _, kv_cache_bytes = conn.recv()
        init_group(rank, source.world_size, port, device, settings.timeout_s)
        from .model_runner import ModelRunner

        runner = ModelRunner(model, settings.block_size, kv_cache_bytes, settings.kv_cache_fraction,
                             settings.max_model_len, settings.max_num_seqs, static_decode=False)
        serve(runner, conn, source.world_size)
    except (EOFError, ConnectionError):  # the driver is gone
        os._exit(0)
    except BaseException:  # noqa: BLE001 - the driver reports this rank's exit code; the traceback says why
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


@torch.inference_mode()
def serve(runner: Any, conn: Any, world_size: int) -> None:
    model = runner.model
    while True:
        command = conn.recv()
        if command[0] == "stop":
            dist.destroy_process_group()
            return
        if command[0] == "forward":
            _, meta, inserts = command
            if inserts:
                rows = sum(count for _, count in inserts)
                features = torch.empty(rows, model.config.llm.hidden_size, dtype=model.dtype, device=model.device)
                dist.broadcast(features, src=0)
                parts = features.split([count for _, count in inserts])
                meta = dataclasses.replace(meta, image_inserts=[(row, part) for (row, _), part in zip(inserts, parts)])
            runner.execute(meta)
        elif command[0] == "vit":
            _, tiles, tile_shape = command
            encode_tile_part(model, tiles, tile_shape, None, world_size)


def encode_tile_part(model: Any, tiles: int, tile_shape: tuple[int, ...], pixels: torch.Tensor | None,
                     world_size: int) -> torch.Tensor | None:
    """ViT data parallelism, every rank: tiles [tiles, *tile_shape] in world_size contiguous parts (rank 0 scatters
    them, zero-padded to equal parts), each rank encodes its own with the whole ViT + projector, rank 0 gathers
    -> features [tiles, tokens per tile, llm hidden] on rank 0, None elsewhere."""
    rank = dist.get_rank()
    per = -(-tiles // world_size)
    counts = [max(0, min(per, tiles - r * per)) for r in range(world_size)]
    mine = torch.empty(per, *tile_shape, dtype=model.dtype, device=model.device)
    parts = None
    if rank == 0:
        padded = pixels.new_zeros(per * world_size, *tile_shape)
        padded[:tiles] = pixels
        parts = list(padded.split(per))
    dist.scatter(mine, parts, src=0)
    out = torch.zeros(per, model.num_image_token, model.config.llm.hidden_size, dtype=model.dtype,
                      device=model.device)
    if counts[rank]:
        out[: counts[rank]] = model.extract_feature(mine[: counts[rank]])
    gathered = [torch.empty_like(out) for _ in range(world_size)] if rank == 0 else None
    dist.gather(out, gathered, dst=0)
    if rank != 0:
        return None
    return torch.cat([part[:count] for part, count in zip(gathered, counts)])
