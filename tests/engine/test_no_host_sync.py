"""A decode step reads nothing back from the device between its first kernel and the sampled tokens: the only
host read is the sampler's final `.tolist()`.

On the CPU every host read a CUDA step would block on is counted instead: `.item()`, `.tolist()`, `.cpu()`,
`.numpy()`, `int()`/`float()`/`bool()`/`index()` of a tensor, `.nonzero()`, and `torch.tensor(..., device=...)`
(a blocking copy from pageable memory on CUDA). The PyTorch references of the attention kernels are exempt: on
the GPU they are Triton launches. On CUDA the same step runs under `torch.cuda.set_sync_debug_mode("error")`.
"""
from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch

from internvl_engine import LLM, SamplingParams
from internvl_engine.engine import llm as llm_module
from internvl_engine.kernels import paged_decode, paged_prefill
from internvl_engine.worker.model_runner import ModelRunner

from golden_utils import MODELS, checkpoint

HOST_READS = ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__", "nonzero")
PARAMS = [SamplingParams(max_tokens=6, temperature=0.0),
          SamplingParams(max_tokens=6, temperature=0.8, top_k=20, top_p=0.9, seed=7),
          SamplingParams(max_tokens=6, temperature=1.0, repetition_penalty=1.3, logit_bias={5: 2.0}),
          SamplingParams(max_tokens=6, temperature=0.0, repetition_penalty=0.7)]


class HostReads:
    """Counts host reads of tensors while `active`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.active = False
        self.counts: Counter[str] = Counter()
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))
        real_tensor = torch.tensor

        def tensor(*args, **kwargs):
            if self.active and kwargs.get("device") is not None:
                self.counts["torch.tensor(device=...)"] += 1
            return real_tensor(*args, **kwargs)

        monkeypatch.setattr(torch, "tensor", tensor)
        for module, name in ((paged_decode, "paged_decode_ref"), (paged_prefill, "paged_prefill_ref")):
            monkeypatch.setattr(module, name, self._exempt(getattr(module, name)))

    def _counting(self, name, method):
        def counted(tensor, *args, **kwargs):
            if self.active:
                self.counts[name] += 1
            return method(tensor, *args, **kwargs)
        return counted

    def _exempt(self, function):
        def run(*args, **kwargs):
            active, self.active = self.active, False
            try:
                return function(*args, **kwargs)
            finally:
                self.active = active
        return run

    @contextlib.contextmanager
    def during_steps(self, monkeypatch: pytest.MonkeyPatch):
        """Active from the start of ModelRunner.execute until the engine's sample_batch returns."""
        execute, sample = ModelRunner.execute, llm_module.sample_batch

        def counted_execute(runner, meta):
            self.active = True
            return execute(runner, meta)

        def counted_sample(*args, **kwargs):
            try:
                return sample(*args, **kwargs)
            finally:
                self.active = False

        monkeypatch.setattr(ModelRunner, "execute", counted_execute)
        monkeypatch.setattr(llm_module, "sample_batch", counted_sample)
        yield self


def decode_ready(static_decode: bool, device: str = "cpu", backend: str = "torch", name: str = MODELS[0]) -> LLM:
    """An engine whose next step decodes every request (prefills done, one token each)."""
    llm = LLM(checkpoint(name), dtype=torch.float32, device=device, backend=backend, static_decode=static_decode)
    for index, params in enumerate(PARAMS):
        llm.add_request(["Hello, who are you?", "Tell me a story.", "Count to five.", "Why is the sky blue?"][index],
                        params)
    while any(not request.output_token_ids for request in llm.scheduler.running) or llm.scheduler.waiting:
        llm.step()
    return llm


@pytest.mark.parametrize("name", [MODELS[0], MODELS[2]], ids=["internlm2", "phi3"])
@pytest.mark.parametrize("static_decode", [False, True], ids=["dynamic", "static"])
def test_a_decode_step_reads_the_device_once(monkeypatch, static_decode, name):
    llm = decode_ready(static_decode, name=name)
    reads = HostReads(monkeypatch)
    with reads.during_steps(monkeypatch):
        llm.step()
    assert not reads.active
    assert reads.counts == Counter(tolist=1), reads.counts  # the sampler's tokens, nothing else


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.set_sync_debug_mode")
@pytest.mark.parametrize("static_decode", [False, True], ids=["dynamic", "graph"])
def test_a_cuda_decode_step_never_synchronizes_before_the_tokens(monkeypatch, static_decode):
    llm = decode_ready(static_decode, device="cuda", backend="triton")
    execute, tolist = ModelRunner.execute, torch.Tensor.tolist

    def strict_execute(runner, meta):
        torch.cuda.set_sync_debug_mode("error")
        return execute(runner, meta)

    def tokens(tensor):  # the sampler's single read: allowed
        torch.cuda.set_sync_debug_mode(0)
        return tolist(tensor)

    monkeypatch.setattr(ModelRunner, "execute", strict_execute)
    monkeypatch.setattr(torch.Tensor, "tolist", tokens)
    try:
        llm.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
