"""The driver side of tensor parallelism: `TPModelRunner`, ModelRunner's interface over N ranks.

Rank 0 is the LLM's own process: it keeps the scheduler, the block manager and the sampler, holds its own shard
(loaded by `load_driver_shard`) and a ModelRunner over it. Ranks 1..N-1 are spawned processes
(`tensor_parallel_worker.worker_main`), one per rank, each loading only its slices. A step sends its
BatchMetadata to every worker over a pipe (image features through a broadcast), then every rank runs the same
forward; the LM head's logits are gathered on rank 0 only. The ViT is replicated: `extract_feature` splits a
step's tiles across the ranks (data parallelism) and gathers the features.

Failure: a rank that dies (or any error once a step's command is out, which leaves the ranks out of step) ends
the engine: the step raises `TensorParallelError` ("tensor-parallel rank 1 died (exit code -9); the engine cannot
continue"), which fails the step's requests; `failure` keeps the message, so later requests fail at once
(LLM.prepare checks it). Liveness is checked before each command, and a collective whose peer died fails fast
(gloo sees the closed connection; the group's timeout is the backstop).
"""
from __future__ import annotations

import dataclasses
import socket
from multiprocessing.connection import wait
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .batch_metadata import BatchMetadata
from .model_runner import ModelRunner
from .staging import device_guard
from .tensor_parallel_worker import (ModelSource, RunnerSettings, candidate_kv_cache_bytes, encode_tile_part,
                                     init_group, worker_main)

COLLECTIVE_TIMEOUT_S = 300.0  # a collective waiting longer than this for a live peer fails (gloo / NCCL timeout)
STARTUP_TIMEOUT_S = 3600.0  # loading a shard of a 26B checkpoint from a slow disk


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank died, or a step failed after its command went out: the engine cannot continue."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_driver_shard(path: Any, preset: str | None, dtype: torch.dtype, device: torch.device, seed: int,
                      load_in_8bit: bool, progress: bool | None, world_size: int) -> Any:
    """Rank 0's shard; it remembers its `ModelSource` for the workers to build theirs the same way."""
    source = ModelSource(None if path is None else str(path), preset, dtype, str(device), seed, load_in_8bit,
                         world_size)
    model = source.build(0, progress)
    model.tensor_parallel_source = source
    return model


class TPModelRunner:
    """ModelRunner's interface (`execute`, `num_blocks`, `device`, `cache`) over tensor-parallel ranks."""

    def __init__(self, model: Any, block_size: int, kv_cache_bytes: int | None, kv_cache_fraction: float,
                 max_model_len: int, max_num_seqs: int, static_decode: bool | None = None,
                 capture_graphs_at_startup: bool = True, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
        """static_decode and capture_graphs_at_startup are ignored: TP steps run eagerly (no CUDA graphs)."""
        source: ModelSource | None = getattr(model, "tensor_parallel_source", None)
        if source is None:
            raise ValueError("tensor_parallel_size > 1 needs an engine that loads its own weights "
                             "(LLM(path, tensor_parallel_size=N) or a preset): LLM.from_model cannot shard a model "
                             "that is already loaded")
        self.model, self.device, self.world_size = model, model.device, source.world_size
        self.failure: str | None = None
        self.decode_graphs = None
        self._group_ready = False
        settings = RunnerSettings(block_size, kv_cache_bytes, kv_cache_fraction, max_model_len, max_num_seqs,
                                  model.backend, timeout_s)
        context = mp.get_context("spawn")
        port = free_port()
        self._workers: list[Any] = []
        self._pipes: list[Any] = []
        for rank in range(1, self.world_size):
            parent, child = context.Pipe()
            process = context.Process(target=worker_main, args=(rank, port, source, settings, child),
                                      name=f"internvl-tp-rank-{rank}", daemon=True)
            process.start()
            child.close()
            self._workers.append(process)
            self._pipes.append(parent)
        try:
            kv_bytes = [candidate_kv_cache_bytes(self.device, kv_cache_bytes, kv_cache_fraction)]
            for rank, pipe in enumerate(self._pipes, start=1):
                kv_bytes.append(self._startup_message(rank, pipe))
            for pipe in self._pipes:
                pipe.send(("start", min(kv_bytes)))
            init_group(0, self.world_size, port, self.device, timeout_s)
            self._group_ready = True
            self._runner = ModelRunner(model, block_size, min(kv_bytes), kv_cache_fraction, max_model_len,
                                       max_num_seqs, static_decode=False)
        except BaseException:
            self.close()
            raise
        self.num_blocks, self.block_size, self.cache = self._runner.num_blocks, block_size, self._runner.cache

    def _startup_message(self, rank: int, pipe: Any) -> int:
        process = self._workers[rank - 1]
        ready = wait([pipe, process.sentinel], timeout=STARTUP_TIMEOUT_S)
        if pipe in ready:
            try:
                return pipe.recv()[1]
            except EOFError:
                pass
        process.join(5)
        raise TensorParallelError(f"tensor-parallel rank {rank} failed while loading its shard (exit code "
                                  f"{process.exitcode}; its traceback is on stderr)")

    @property
    def worker_pids(self) -> list[int]:
        """The process ids of ranks 1..N-1."""
        return [process.pid for process in self._workers]

    @staticmethod
    def bytes_per_block(model: Any, block_size: int) -> int:
        return ModelRunner.bytes_per_block(model, block_size)

    # ---- steps ----
    def execute(self, meta: BatchMetadata) -> torch.Tensor:
        """One step on every rank -> logits [len(meta.logit_indices), vocab] float32 on rank 0."""
        inserts = [(row, features.shape[0]) for row, features in meta.image_inserts]
        with self._step():
            self._send(("forward", dataclasses.replace(meta, image_inserts=[]), inserts))
            if inserts:
                with torch.inference_mode(), device_guard(self.device):
                    features = torch.cat([f.to(self.device, self.model.dtype) for _, f in meta.image_inserts])
                    dist.broadcast(features, src=0)
            return self._runner.execute(meta)

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ViT data parallelism: pixel_values [tiles, 3, H, W] -> [tiles, 256, llm hidden], tiles split over ranks."""
        tiles, shape = pixel_values.shape[0], tuple(pixel_values.shape[1:])
        with self._step():
            self._send(("vit", tiles, shape))
            with torch.inference_mode(), device_guard(self.device):
                pixels = pixel_values.to(self.device, self.model.dtype)
                return encode_tile_part(self.model, tiles, shape, pixels, self.world_size)

    def _send(self, command: tuple) -> None:
        for rank, process in enumerate(self._workers, start=1):
            if process.exitcode is not None:
                raise TensorParallelError(self._death_message(rank, process.exitcode))
        for pipe in self._pipes:
            pipe.send(command)

    def _step(self) -> Any:
        runner = self

        class Step:
            def __enter__(self) -> None:
                if runner.failure is not None:
                    raise TensorParallelError(runner.failure)

            def __exit__(self, kind: Any, error: BaseException | None, _tb: Any) -> bool:
                if error is not None:
                    runner._fail(error)
                    raise TensorParallelError(runner.failure) from error
                return False

        return Step()

    @staticmethod
    def _death_message(rank: int, exitcode: int | None) -> str:
        return f"tensor-parallel rank {rank} died (exit code {exitcode}); the engine cannot continue"

    def _fail(self, error: BaseException) -> None:
        """The ranks are out of step: name a rank that died (waiting briefly for its exit), stop the rest."""
        if self.failure is not None:
            return
        # A dead rank's sentinel is ready a moment before the process can be reaped: join those to read exit codes.
        ready = set(wait([p.sentinel for p in self._workers], timeout=2.0)) if self._workers else set()
        for process in self._workers:
            if process.sentinel in ready:
                process.join(2.0)
        dead = [(rank, p) for rank, p in enumerate(self._workers, start=1) if p.exitcode is not None]
        if dead:
            self.failure = self._death_message(dead[0][0], dead[0][1].exitcode)
        else:
            self.failure = (f"a tensor-parallel step failed on rank 0 ({type(error).__name__}: {error}); the engine "
                            "cannot continue")
        self.close()

    def close(self) -> None:
        """Stop the workers (a stop command, then terminate what is left) and leave the process group."""
        for pipe, process in zip(self._pipes, self._workers):
            if process.exitcode is None and self.failure is None:
                try:
                    pipe.send(("stop",))
                except (OSError, ValueError):
                    pass
        for process in self._workers:
            process.join(5 if self.failure is None else 0.5)
            if process.exitcode is None:
                process.terminate()
                process.join(5)
        for pipe in self._pipes:
            pipe.close()
        self._pipes, self._workers = [], []
        if self._group_ready:
            self._group_ready = False
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group (a dead peer) may refuse; nothing else holds it
                pass
