"""Tensor parallelism (LLM sharded over ranks, ViT data parallel) on the CPU over gloo: TP=2 gives TP=1's greedy
tokens and logits, with images, preemption and int8 weights; a rank that dies fails the requests with a clear
error instead of hanging."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from internvl_engine import LLM, SamplingParams, load_image
from internvl_engine.models.loader import load_model
from internvl_engine.models.tensor_parallel import TensorParallelShard

from golden_utils import MODELS, checkpoint, image_path

REQUESTS = [
    "Hello, who are you?",
    {"prompt": "<image>\nDescribe the image.", "images": [str(image_path("land800x600"))], "max_tiles": 6},
    "Tell me a story.",
    {"prompt": "<image>\nWhat is shown?", "images": [str(image_path("sq448"))], "max_tiles": 1},
]
RTOL = 1e-4


def generate(name: str, tensor_parallel_size: int, requests=REQUESTS, max_tokens: int = 8, **options):
    llm = LLM(checkpoint(name), dtype=torch.float32, device="cpu", backend="torch",
              tensor_parallel_size=tensor_parallel_size, **options)
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, return_logits=True)
        outputs = llm.generate(requests, params)
        assert llm.block_manager.num_free_blocks == llm.runner.num_blocks
        return outputs
    finally:
        llm.close()


def assert_same(expected, actual) -> None:
    for one, two in zip(expected, actual, strict=True):
        assert one.error is None and two.error is None, (one.error, two.error)
        assert two.token_ids == one.token_ids
        diff = float((two.logits - one.logits).norm() / one.logits.norm())
        assert diff < RTOL, diff


@pytest.mark.parametrize("name", MODELS)
def test_tp2_gives_tp1_tokens_and_logits(name):
    assert_same(generate(name, 1), generate(name, 2))


def test_tp2_under_preemption_matches_tp1():
    name = MODELS[0]
    block_bytes = 2 * 3 * 16 * 2 * 16 * 4  # K and V x 3 layers x 16 tokens x 2 KV heads x 16 dims x fp32 (TP=1)
    requests = [f"Tell me story number {i}." for i in range(5)] + [REQUESTS[3]]
    options = dict(max_tokens=24, enable_prefix_caching=False)
    expected = generate(name, 1, requests, kv_cache_bytes=26 * block_bytes, **options)
    # Each rank holds half the KV heads: half the bytes per rank is the same number of blocks.
    actual = generate(name, 2, requests, kv_cache_bytes=13 * block_bytes, **options)
    assert sum(output.num_preemptions for output in actual) > 0
    assert_same(expected, actual)


@pytest.mark.slow
def test_tp2_int8_matches_tp1_int8():
    name = MODELS[0]
    assert_same(generate(name, 1, load_in_8bit=True), generate(name, 2, load_in_8bit=True))


def test_vit_data_parallel_features_equal_one_rank():
    name = MODELS[1]
    pixels = torch.cat([load_image(image_path("land800x600"), max_num=4), load_image(image_path("sq448"))])
    assert pixels.shape[0] == 6
    full = load_model(checkpoint(name), dtype=torch.float32).set_backend("torch")
    llm = LLM(checkpoint(name), dtype=torch.float32, device="cpu", backend="torch", tensor_parallel_size=2)
    try:
        for count in (5, 1):  # uneven parts; one tile (rank 1 encodes none)
            expected = full.extract_feature(pixels[:count])
            actual = llm.runner.extract_feature(pixels[:count])
            assert actual.shape == expected.shape
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    finally:
        llm.close()


def test_shard_loading_reads_slices_and_checks_divisibility():
    name = MODELS[0]  # 6 heads, 2 KV heads, vocab 1009 (not even)
    full = load_model(checkpoint(name))
    parts = [load_model(checkpoint(name), shard=TensorParallelShard(rank, 2)) for rank in range(2)]
    assert [part.config.llm.num_key_value_heads for part in parts] == [1, 1]
    assert parts[0].config.llm.head_dim == full.config.llm.head_dim
    wqkv = [part.language_model.model.layers[0].attention.wqkv.weight for part in parts]
    torch.testing.assert_close(torch.cat(wqkv), full.language_model.model.layers[0].attention.wqkv.weight)
    heads = [part.language_model.output.weight.shape[0] for part in parts]
    assert heads == [505, 504]
    with pytest.raises(ValueError, match="does not divide the LLM's KV heads"):
        load_model(checkpoint(name), shard=TensorParallelShard(0, 3))


def test_from_model_refuses_tensor_parallelism():
    from internvl_engine import AutoModel, AutoTokenizer

    name = MODELS[0]
    model = AutoModel.from_pretrained(checkpoint(name), torch_dtype=torch.float32, backend="torch")
    with pytest.raises(ValueError, match="from_model cannot shard"):
        LLM.from_model(model, AutoTokenizer.from_pretrained(checkpoint(name)), tensor_parallel_size=2)


KILL_SCRIPT = """
import json, os, signal, sys, time
import torch
from internvl_engine import LLM, SamplingParams

def main():
    llm = LLM(sys.argv[1], dtype=torch.float32, device="cpu", backend="torch", tensor_parallel_size=2)
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    ids = [llm.add_request("Tell me a long story.", params) for _ in range(3)]
    while not llm._requests[ids[0]].output_token_ids:
        llm.step()
    os.kill(llm.runner.worker_pids[0], signal.SIGKILL)
    start = time.monotonic()
    errors = []
    while llm.scheduler.has_unfinished():
        errors += [output.error for output in llm.step()]
    late = llm.add_request("Hello", params)
    print(json.dumps({"errors": errors, "seconds": time.monotonic() - start, "late": late.error}))
    llm.close()

if __name__ == "__main__":
    main()
"""


def test_a_killed_rank_fails_the_requests_quickly(tmp_path: Path):
    script = tmp_path / "kill_rank.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT), encoding="utf-8")
    done = subprocess.run([sys.executable, str(script), str(checkpoint(MODELS[0]))], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    message = "tensor-parallel rank 1 died (exit code -9); the engine cannot continue"
    assert len(report["errors"]) == 3 and all(message in error for error in report["errors"]), report
    assert report["seconds"] < 10
    assert message in report["late"]
