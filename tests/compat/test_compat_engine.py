"""The model-card API is a thin layer over the engine: one generation loop, and imports that point one way."""
from __future__ import annotations

import ast
import importlib.util
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from internvl_engine import AutoModel, AutoTokenizer, load_image
from internvl_engine.engine.scheduler import Scheduler

from golden_utils import MODELS, checkpoint, golden_json, image_path

PACKAGE = Path(__file__).resolve().parents[2] / "internvl_engine"


@lru_cache(maxsize=None)
def loaded(name: str = MODELS[0]):
    return AutoModel.from_pretrained(checkpoint(name), torch_dtype=torch.float32), AutoTokenizer.from_pretrained(
        checkpoint(name))


def test_chat_goes_through_the_scheduler(monkeypatch):
    model, tokenizer = loaded()
    spec = golden_json(MODELS[0])["chat"]["image_one_tile"]
    scheduled: list[list[int]] = []
    schedule = Scheduler.schedule

    def spy(self):
        output = schedule(self)
        scheduled.extend(chunk.request.prompt_token_ids for chunk in output.chunks)
        return output

    monkeypatch.setattr(Scheduler, "schedule", spy)
    (image, max_num), = spec["call"]["images"]
    response = model.chat(tokenizer, load_image(image_path(image), max_num=max_num), spec["call"]["question"],
                          dict(spec["call"]["generation_config"]))
    assert response == spec["response"]
    assert spec["input_ids"][0] in scheduled  # the chat's prompt was a scheduled request
    assert len(scheduled) >= len(spec["generated_ids"][0])  # one chunk per step: prefill, then each decode


def test_batch_chat_rows_are_engine_requests_with_their_left_padding(monkeypatch):
    model, tokenizer = loaded()
    spec = golden_json(MODELS[0])["chat"]["batch"]
    call = spec["call"]
    submitted = []
    llm = model.engine(tokenizer)
    prepare = type(llm).prepare

    def spy(self, request, *args, **kwargs):
        prepared = prepare(self, request, *args, **kwargs)
        submitted.append(prepared.request)
        return prepared

    monkeypatch.setattr(type(llm), "prepare", spy)
    pixel_values = torch.cat([load_image(image_path(n), max_num=m) for n, m in call["images"]])
    responses = model.batch_chat(tokenizer, pixel_values, call["questions"], dict(call["generation_config"]),
                                 num_patches_list=call["num_patches_list"])
    assert responses == spec["responses"]
    padded = len(spec["input_ids"][0])
    assert [r.num_prompt_tokens + r.rope_length_offset for r in submitted] == [padded] * len(call["questions"])
    assert len({r.num_prompt_tokens for r in submitted}) > 1  # unequal lengths: real left padding


def test_second_turn_reuses_the_first_turns_kv():
    model, tokenizer = loaded()
    greedy = dict(max_new_tokens=8, do_sample=False)
    pixel_values = load_image(image_path("land800x600"), max_num=6)
    response, history = model.chat(tokenizer, pixel_values, "<image>\nDescribe the image.", greedy,
                                   return_history=True)
    manager = model.engine(tokenizer).block_manager
    hits = manager.prefix_hits_tokens
    model.chat(tokenizer, pixel_values, "And the colours?", greedy, history=history)
    assert manager.prefix_hits_tokens - hits >= 7 * 256  # the image's KV came from the cache


def test_generate_takes_visual_features_instead_of_pixels():
    model, tokenizer = loaded()
    spec = golden_json(MODELS[0])["chat"]["two_images_separate"]
    pixel_values = torch.cat([load_image(image_path(n), max_num=m) for n, m in spec["call"]["images"]])
    ids = torch.tensor(spec["input_ids"])
    sep = spec["eos_token_id"]
    from_pixels = model.generate(pixel_values, ids, max_new_tokens=16, eos_token_id=sep)
    features = model.extract_feature(pixel_values)
    from_features = model.generate(None, ids, visual_features=features, max_new_tokens=16, eos_token_id=sep)
    assert from_pixels.tolist() == from_features.tolist() == spec["generated_ids"]


def test_seeded_sampling_in_batch_chat_is_reproducible():
    model, tokenizer = loaded()
    sampled = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=0, seed=11)
    questions = ["Tell me a story.", "Hello, who are you?"]
    first = model.batch_chat(tokenizer, None, questions, sampled)
    assert model.batch_chat(tokenizer, None, questions, sampled) == first
    assert model.batch_chat(tokenizer, None, questions, dict(sampled, seed=12)) != first
    assert first != model.batch_chat(tokenizer, None, questions, dict(max_new_tokens=8, do_sample=False))


def test_generate_refuses_right_padding():
    model, tokenizer = loaded()
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 2]])
    with pytest.raises(ValueError, match="left"):
        model.generate(None, ids, torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]), max_new_tokens=2)


def test_the_dense_loop_is_gone():
    for module in ("generation", "kv_cache", "paged_kv_cache", "hf_compat"):
        assert importlib.util.find_spec(f"internvl_engine.{module}") is None, module


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the internvl_engine modules a file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            names.add(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("internvl_engine")}


@pytest.mark.parametrize("layer,forbidden", [
    ("engine", ("compat", "server", "testing", "cli")),
    ("worker", ("engine", "compat", "server", "testing", "cli")),
    ("models", ("worker", "engine", "compat", "server", "testing", "cli")),
    ("preprocessing", ("models", "worker", "engine", "compat", "server", "testing", "cli")),
    ("text", ("preprocessing", "models", "worker", "engine", "compat", "server", "testing", "cli")),
    ("compat", ("server", "testing", "cli")),
])
def test_dependencies_point_one_way(layer, forbidden):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files
    for path in files:
        for name in imported_modules(path):
            parts = name.split(".")
            assert len(parts) < 2 or parts[1] not in forbidden, f"{path.relative_to(PACKAGE)} imports {name}"


@pytest.mark.parametrize("kv_heads", [1, 2, 6])  # MQA, GQA 3:1, MHA (6 query heads)
def test_engine_tokens_agree_with_the_full_forward_for_any_kv_grouping(tmp_path, kv_heads):
    """Greedy tokens of a left-padded batch through the engine (paged cache, chunked prefill, paged decode) are the
    argmax of the teacher-forced full forward over the same tokens, wherever that argmax is not a near tie."""
    from internvl_engine.testing.checkpoint_builder import build_tiny_checkpoint

    folder = build_tiny_checkpoint(tmp_path / "ckpt", config_overrides={
        "llm_config": {"num_key_value_heads": kv_heads}, "ps_version": "v1"})
    model = AutoModel.from_pretrained(folder, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model.engine_options = {"max_num_batched_tokens": 160}  # prompts of ~300 tokens prefill in chunks
    pixel_values = load_image(image_path("sq448"), max_num=1)
    questions = ["<image>\nWhat is shown?", "Tell me a story about a dragon and a knight."]
    tokenizer.padding_side = "left"
    try:
        inputs = tokenizer(["<|im_start|>user\n" + q.replace("<image>", "<img>" + "<IMG_CONTEXT>" * 256 + "</img>")
                            + "<|im_end|><|im_start|>assistant\n" for q in questions], return_tensors="pt",
                           padding=True)
    finally:
        tokenizer.padding_side = "right"
    out = model.generate(pixel_values, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=12,
                         eos_token_id=-1)
    for row, pad in enumerate((inputs["attention_mask"] == 0).sum(1).tolist()):
        ids = inputs["input_ids"][row, pad:]
        full = torch.cat([ids, out[row]])[None]
        logits = model(pixel_values if row == 0 else None, full).logits[0, len(ids) - 1: -1]  # [12, vocab]
        top2 = logits.topk(2, dim=-1)
        close = (top2.values[:, 0] - top2.values[:, 1]) < 1e-4
        assert (logits.argmax(-1) == out[row]).logical_or(close).all(), row
