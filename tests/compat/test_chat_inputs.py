"""Bad inputs to chat / batch_chat get a clear error, and the model keeps serving afterwards."""
from __future__ import annotations

import pytest
import torch

from internvl_engine import AutoModel, AutoTokenizer, PromptTooLongError, load_image

from golden_utils import MODELS, checkpoint, golden_json, image_path

V15 = MODELS[0]
GREEDY = dict(max_new_tokens=4, do_sample=False)


@pytest.fixture(scope="module")
def loaded():
    model = AutoModel.from_pretrained(checkpoint(V15), torch_dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(checkpoint(V15))


@pytest.fixture(scope="module")
def one_tile():
    return load_image(image_path("sq448"), max_num=12)


def test_more_image_tags_than_images(loaded, one_tile):
    model, tok = loaded
    with pytest.raises(ValueError, match="<image>"):
        model.chat(tok, one_tile, "<image>\n<image>\nCompare.", GREEDY)


def test_more_images_than_tags(loaded, one_tile):
    model, tok = loaded
    with pytest.raises(ValueError, match="<image>"):
        model.chat(tok, torch.cat([one_tile, one_tile]), "<image>\nDescribe.", GREEDY, num_patches_list=[1, 1])


def test_tile_count_mismatch(loaded, one_tile):
    model, tok = loaded
    with pytest.raises(ValueError, match="num_patches_list"):
        model.chat(tok, one_tile, "<image>\nDescribe.", GREEDY, num_patches_list=[2])


def test_prompt_longer_than_context(loaded, one_tile):
    model, tok = loaded
    model.max_context_length = 200
    try:
        with pytest.raises(PromptTooLongError, match="context is 200 tokens"):
            model.chat(tok, one_tile, "Describe.", GREEDY)
    finally:
        model.max_context_override = None


def test_generation_is_capped_at_the_context(loaded):
    model, tok = loaded
    spec = golden_json(V15)["chat"]["text_single"]
    prompt_len = len(spec["input_ids"][0])
    model.max_context_length = prompt_len + 3
    try:
        response = model.chat(tok, None, spec["call"]["question"], dict(max_new_tokens=16, do_sample=False))
    finally:
        model.max_context_override = None
    assert response == tok.decode(spec["generated_ids"][0][:3], skip_special_tokens=True).strip()


def test_invalid_generation_config(loaded):
    model, tok = loaded
    with pytest.raises(ValueError, match="top_p"):
        model.chat(tok, None, "Hi", dict(max_new_tokens=4, do_sample=True, top_p=2.0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.chat(tok, None, "Hi", dict(max_new_tokens=-1))


def test_batch_chat_rejects_history_and_mismatched_lists(loaded, one_tile):
    model, tok = loaded
    with pytest.raises(ValueError, match="not supported in batch_chat"):
        model.batch_chat(tok, one_tile, ["<image>\nHi"], GREEDY, num_patches_list=[1], history=[])
    with pytest.raises(ValueError, match="num_patches_list"):
        model.batch_chat(tok, one_tile, ["a", "b"], GREEDY, num_patches_list=[1])
    with pytest.raises(ValueError, match="num_patches_list"):
        model.batch_chat(tok, one_tile, ["a"], GREEDY)


def test_deprecated_image_counts_still_work(loaded, one_tile):
    model, tok = loaded
    with pytest.warns(DeprecationWarning, match="image_counts"):
        old = model.batch_chat(tok, one_tile, ["Describe."], GREEDY, image_counts=[1])
    assert old == model.batch_chat(tok, one_tile, ["Describe."], GREEDY, num_patches_list=[1])


def test_model_keeps_serving_after_errors(loaded):
    model, tok = loaded
    spec = golden_json(V15)["chat"]["text_single"]
    for bad in ("<image>\nno image given", ):
        with pytest.raises(ValueError):
            model.chat(tok, None, bad, GREEDY)
    response = model.chat(tok, None, spec["call"]["question"], dict(spec["call"]["generation_config"]))
    assert response == spec["response"]


def test_text_only_batch_chat(loaded):
    model, tok = loaded
    spec = golden_json(V15)["chat"]["text_single"]
    responses = model.batch_chat(tok, None, [spec["call"]["question"]] * 2, dict(spec["call"]["generation_config"]))
    assert responses == [spec["response"]] * 2


def test_forward_drops_tiles_whose_image_flag_is_zero(loaded, one_tile):
    model, tok = loaded
    spec = golden_json(V15)["chat"]["image_one_tile"]
    input_ids = torch.tensor(spec["input_ids"])
    expected = model(one_tile, input_ids).logits
    padded = torch.cat([one_tile, torch.zeros_like(one_tile)])
    logits = model(padded, input_ids, image_flags=torch.tensor([[1], [0]])).logits
    assert logits.shape == (1, input_ids.shape[1], model.config.llm.vocab_size)
    assert torch.allclose(logits, expected, atol=1e-5)
