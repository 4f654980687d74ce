"""The continuous-batching engine gives each request's tokens when run alone (`model.generate`, the call `chat`
makes, which the goldens check), under any batching: concurrency, chunking, preemption, caches, static decode."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from internvl_engine import LLM, AutoModel, AutoTokenizer, SamplingParams, load_image
from internvl_engine.text.templates import get_template, prepare_chat_query

from golden_utils import MODELS, checkpoint, image_path

MIXED = [  # (question, [(image, max_tiles)], max_tokens)
    ("Hello, who are you?", [], 12),
    ("<image>\nWhat is shown in this image?", [("sq448", 12)], 10),  # 1 tile
    ("<image>\nDescribe the image.", [("land800x600", 6)], 8),  # 6 tiles + thumbnail
    ("<image>\nDescribe every tile.", [("fhd1920x1080", 12)], 6),  # 12 tiles + thumbnail
    ("Image-1: <image>\nImage-2: <image>\nCompare them.", [("sq448", 6), ("tall300x1200", 6)], 9),
    ("Tell me a story.", [], 16),
    ("What is in the picture?", [("tiesmall175x100", 6)], 7),  # no tag: chat adds <image>
    ("<image>\nCount the stripes.", [("gray640x480", 6)], 5),
]


@lru_cache(maxsize=None)
def reference(name: str):
    model = AutoModel.from_pretrained(checkpoint(name), torch_dtype=torch.float32, backend="torch")
    return model, AutoTokenizer.from_pretrained(checkpoint(name))


def sequential_tokens(name: str, question: str, images: list, max_tokens: int) -> list[int]:
    """What `model.chat`'s `generate` call gives for this request alone, stopping where the engine does
    (the template separator and EOS)."""
    model, tokenizer = reference(name)
    pixel_values = [load_image(image_path(n), max_num=m) for n, m in images]
    tiles = [p.shape[0] for p in pixel_values]
    template = get_template(model.template)
    query, _ = prepare_chat_query(model.template, question, None, tiles, system_message=template.system_message,
                                  has_images=bool(images))
    ids = tokenizer(query, return_tensors="pt")
    stops = [tokenizer.convert_tokens_to_ids(template.stop_token), tokenizer.eos_token_id]
    out = model.generate(torch.cat(pixel_values) if pixel_values else None, ids["input_ids"], ids["attention_mask"],
                         max_new_tokens=max_tokens, eos_token_id=stops, tokenizer=tokenizer)
    return out[0].tolist()


def engine_request(question: str, images: list) -> dict:
    max_tiles = images[0][1] if images else 12
    return {"prompt": question, "images": [str(image_path(n)) for n, _ in images], "max_tiles": max_tiles}


def make_llm(name: str, **options) -> LLM:
    return LLM(checkpoint(name), dtype=torch.float32, device="cpu", backend="torch", **options)


def run_mixed(llm: LLM, name: str, copies: int = 2):
    cases = [case for case in MIXED if len({m for _, m in case[1]}) <= 1] * copies
    requests = [engine_request(q, imgs) for q, imgs, _ in cases]
    params = [SamplingParams(max_tokens=n, temperature=0.0) for _, _, n in cases]
    outputs = llm.generate(requests, params)
    for (question, images, max_tokens), output in zip(cases, outputs):
        assert output.error is None, output.error
        assert output.token_ids == sequential_tokens(name, question, images, max_tokens), question
    return outputs


@pytest.mark.parametrize("name", MODELS)
def test_concurrent_mixed_requests_match_sequential_chat(name):
    llm = make_llm(name, max_num_batched_tokens=2048, max_vit_tiles_per_step=16)
    outputs = run_mixed(llm, name)
    assert len(outputs) == 16
    assert llm.block_manager.num_free_blocks == llm.runner.num_blocks


def test_preemption_keeps_every_request_and_its_tokens():
    name = MODELS[0]
    block_bytes = 2 * 3 * 16 * 2 * 16 * 4  # K and V x 3 layers x 16 tokens x 2 KV heads x 16 dims x fp32
    llm = make_llm(name, kv_cache_bytes=260 * block_bytes, max_num_batched_tokens=1024,
                   max_vit_tiles_per_step=8)  # 260 blocks: the 13-tile request fits, but not with the others
    outputs = run_mixed(llm, name, copies=1)
    assert sum(output.num_preemptions for output in outputs) > 0
    assert llm.block_manager.num_free_blocks == llm.runner.num_blocks


@pytest.mark.parametrize("budget", [1, 3])
def test_a_large_image_is_encoded_in_tile_slices_while_decodes_get_a_token_every_step(budget):
    name = MODELS[0]
    llm = make_llm(name, max_vit_tiles_per_step=budget, max_num_batched_tokens=4096)
    calls = []
    extract = llm.model.extract_feature
    llm.model.extract_feature = lambda pixels: calls.append(pixels.shape[0]) or extract(pixels)
    question, images = "<image>\nDescribe every tile.", [("fhd1920x1080", 12)]  # 8 tiles + thumbnail
    decoding = llm.add_request("Tell me a story.", SamplingParams(max_tokens=40, temperature=0.0))
    while not llm._requests[decoding].output_token_ids:
        llm.step()
    image = llm.add_request(engine_request(question, images), SamplingParams(max_tokens=5, temperature=0.0))
    outputs, grown = {}, []
    while llm.scheduler.has_unfinished():
        before = len(llm._requests[decoding].output_token_ids) if decoding in llm._requests else None
        for output in llm.step():
            outputs[output.request_id] = output
        if before is not None and decoding not in outputs:
            grown.append(len(llm._requests[decoding].output_token_ids) - before)
    assert sum(calls) == 9 and max(calls) <= budget and len(calls) == -(-9 // budget)
    assert grown and all(step == 1 for step in grown)  # the text stream moved on every step
    assert outputs[image].token_ids == sequential_tokens(name, question, images, 5)
    assert outputs[decoding].token_ids == sequential_tokens(name, "Tell me a story.", [], 40)
    assert llm.block_manager.num_free_blocks == llm.runner.num_blocks


def test_same_image_twice_hits_the_caches():
    name = MODELS[0]
    llm = make_llm(name)
    request = engine_request("<image>\nDescribe the image.", [("land800x600", 6)])
    first = llm.generate([request], SamplingParams(max_tokens=6, temperature=0.0))[0]
    second = llm.generate([request], SamplingParams(max_tokens=6, temperature=0.0))[0]
    assert first.token_ids == second.token_ids
    assert second.num_cached_tokens > 7 * 256  # the prefix cache held the image's KV: no recompute
    # Other text before the same image: the prefix differs, so the image's KV is recomputed, but its ViT
    # features come from the feature cache.
    other = engine_request("Look: <image>\nDescribe the image.", [("land800x600", 6)])
    third = llm.generate([other], SamplingParams(max_tokens=6, temperature=0.0))[0]
    assert llm.feature_cache.hits == 1 and llm.feature_cache.misses == 1
    assert third.token_ids == sequential_tokens(name, other["prompt"], [("land800x600", 6)], 6)
    assert llm.block_manager.num_free_blocks == llm.runner.num_blocks


def test_bad_requests_fail_alone(tmp_path):
    name = MODELS[0]
    llm = make_llm(name, max_model_len=600)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    good = engine_request("Hello, who are you?", [])
    requests = [good, {"prompt": "<image>\nHi", "images": [str(broken)]},
                {"prompt": "<image>\nHi", "images": [str(image_path("sq448"))], "max_tiles": 400},
                {"prompt": "<image>\nHi", "images": [str(image_path("land800x600"))], "max_tiles": 6},
                good]
    params = [SamplingParams(max_tokens=8, temperature=0.0)] * len(requests)
    outputs = llm.generate(requests, params)
    assert outputs[0].error is None and outputs[4].error is None
    assert outputs[0].token_ids == outputs[4].token_ids == sequential_tokens(name, good["prompt"], [], 8)
    assert "broken.png" in outputs[1].error
    assert "max_tiles" in outputs[2].error
    assert "600" in outputs[3].error  # prompt + max_tokens over max_model_len
    for bad in outputs[1:4]:
        assert bad.finish_reason == "error"
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    assert llm.add_request(good, request_id="same") == "same"
    duplicate = llm.add_request(good, request_id="same")
    assert duplicate.finish_reason == "error" and "already in use" in duplicate.error
    llm.abort("same")
    assert llm.block_manager.num_free_blocks == llm.runner.num_blocks


@pytest.mark.slow
def test_triton_backend_engine_matches_torch_backend():
    """Engine on the kernels (ViT attention, fused unshuffle, paged decode; interpreter on CPU)."""
    name = MODELS[0]
    llm = LLM(checkpoint(name), dtype=torch.float32, device="cpu", backend="triton", static_decode=True,
              max_model_len=2048)  # static tables are max_model_len wide: keep the interpreter's split count low
    cases = [MIXED[0], MIXED[1]]
    outputs = llm.generate([engine_request(q, imgs) for q, imgs, _ in cases],
                           [SamplingParams(max_tokens=n, temperature=0.0) for _, _, n in cases])
    for (question, images, max_tokens), output in zip(cases, outputs):
        assert output.token_ids == sequential_tokens(name, question, images, max_tokens)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    name = MODELS[0]
    llm = make_llm(name)
    sampled = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, top_k=20, seed=7)
    alone = llm.generate(["Tell me a story."], sampled)[0]
    batched = llm.generate(["Tell me a story.", "Hello, who are you?"],
                           [sampled, SamplingParams(max_tokens=8, temperature=1.0, seed=3)])[0]
    assert alone.token_ids == batched.token_ids
    assert alone.metrics.time_to_first_token is not None and alone.metrics.queue_time is not None


@pytest.mark.parametrize("name", MODELS)
def test_static_decode_path_matches_sequential_chat(name):
    """Decode steps on padded, bucket-sized static buffers (the CUDA-graph path, eager on CPU) give the
    dynamic path's tokens; padding rows write only the scratch block."""
    llm = make_llm(name, static_decode=True, max_num_batched_tokens=2048, max_vit_tiles_per_step=16)
    assert llm.runner.decode_graphs is not None and not llm.runner.decode_graphs.use_graphs
    scratch = llm.runner.cache.keys[0][llm.runner.num_blocks].clone()
    run_mixed(llm, name, copies=1)
    assert llm.block_manager.num_free_blocks == llm.runner.num_blocks
    assert not torch.equal(llm.runner.cache.keys[0][llm.runner.num_blocks], scratch)  # padding wrote there


def test_stop_strings_end_requests_early_and_max_tokens_none_runs_to_the_context():
    llm = make_llm(MODELS[0])
    greedy = SamplingParams(max_tokens=16, temperature=0.0)
    full = llm.generate(["Hello, who are you?"], greedy)[0]
    stop = full.text[6:9]
    cut = llm.generate(["Hello, who are you?", "Tell me a story."],
                       [SamplingParams(max_tokens=16, temperature=0.0, stop=(stop, "never")), greedy])
    assert cut[0].text == full.text[: full.text.index(stop)].strip() and cut[0].finish_reason == "stop"
    assert len(cut[0].token_ids) < len(full.token_ids)  # stopped early, not trimmed afterwards
    assert cut[0].token_ids == full.token_ids[: len(cut[0].token_ids)]
    assert llm.block_manager.num_free_blocks == llm.runner.num_blocks
    unbounded = llm.prepare("Hello, who are you?", SamplingParams(max_tokens=None, temperature=0.0))
    max_model_len = llm.scheduler.config.max_model_len
    assert unbounded.request.max_tokens == max_model_len - unbounded.request.num_prompt_tokens
