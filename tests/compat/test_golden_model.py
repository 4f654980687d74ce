"""The PyTorch path against the official implementation's goldens: features, hidden states, logits, tokens."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from internvl_engine import AutoModel, AutoTokenizer, load_image
from internvl_engine.text.templates import get_template

from golden_utils import MODELS, checkpoint, golden_json, golden_tensors, image_path, rel_l2

FP32_TOL = 1e-4
BF16_TOL = 3e-2
SLOW_CASES = {"image_41_tiles"}


@lru_cache(maxsize=None)
def load_fp32(name: str):
    model = AutoModel.from_pretrained(checkpoint(name), torch_dtype=torch.float32).eval()
    # The official code has no context limit of its own; the 4B tiny's max_position_embeddings (9760) is below its
    # 41-tile prompt (10,536 tokens), which the official model simply ran.
    model.max_context_length = max(model.max_context_length, 16384)
    return model, AutoTokenizer.from_pretrained(checkpoint(name))


@pytest.fixture(params=MODELS)
def fp32(request):
    model, tokenizer = load_fp32(request.param)
    return request.param, model, tokenizer


def pixel_values_for(images: list | None) -> torch.Tensor | None:
    if not images:
        return None
    return torch.cat([load_image(image_path(name), max_num=max_num) for name, max_num in images])


def chat_cases(marks_slow: bool = True):
    cases = []
    for name in MODELS:
        for case in golden_json(name)["chat"]:
            marks = [pytest.mark.slow] if case in SLOW_CASES and marks_slow else []
            cases.append(pytest.param(name, case, marks=marks, id=f"{name}-{case}"))
    return cases


def test_vision_one_tile_hidden_states_and_features(fp32):
    name, model, _ = fp32
    spec = golden_json(name)["vision"]["one_tile"]
    tensors = golden_tensors(name)
    pixel_values = load_image(image_path(spec["image"]), max_num=spec["max_num"])
    states = model.vision_model(pixel_values, return_all_hidden_states=True)
    for i, state in enumerate(states):
        assert rel_l2(state, tensors[f"vision.one_tile.hidden_state.{i}"]) < FP32_TOL, i
    from internvl_engine.models.projector import drop_cls_and_shuffle
    shuffled = drop_cls_and_shuffle(states[-1], model.config.downsample_ratio, model.config.ps_version)
    assert rel_l2(shuffled, tensors["vision.one_tile.pixel_shuffled"]) < FP32_TOL
    assert rel_l2(model.extract_feature(pixel_values), tensors["vision.one_tile.features"]) < FP32_TOL


def test_vision_multi_tile_features(fp32):
    name, model, _ = fp32
    spec = golden_json(name)["vision"]["multi"]
    tensors = golden_tensors(name)
    pixel_values = load_image(image_path(spec["image"]), max_num=spec["max_num"])
    assert pixel_values.shape[0] == spec["num_tiles"]
    features = model.extract_feature(pixel_values)
    assert rel_l2(features, tensors["vision.multi.features"]) < FP32_TOL
    cls = model.vision_model(pixel_values)[:, 0]
    assert rel_l2(cls, tensors["vision.multi.last_hidden_state_cls"]) < FP32_TOL


def test_llm_hidden_states(fp32):
    name, model, _ = fp32
    tensors = golden_tensors(name)
    input_ids = torch.tensor(golden_json(name)["chat"]["text_single"]["input_ids"])
    out = model(None, input_ids, output_hidden_states=True)
    assert len(out.hidden_states) == golden_json(name)["llm_text_single_hidden_states"]["num_layers"] + 1
    for i, state in enumerate(out.hidden_states):
        assert rel_l2(state, tensors[f"llm.text_single.hidden_state.{i}"]) < FP32_TOL, i


def run_case(model, tokenizer, name: str, case: str, kind: str = "fp32"):
    """Tokenise the golden's expanded prompt (left padded) and run the official `generate` call that `chat` and
    `batch_chat` make, through the engine, keeping each step's logits; returns (spec, pixel_values, inputs, out)."""
    spec = golden_json(name, kind)["chat"][case]
    pixel_values = pixel_values_for(spec["call"]["images"])
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    inputs = tokenizer(spec["prompt_expanded"], return_tensors="pt", padding=True)
    tokenizer.padding_side = padding_side
    assert inputs["input_ids"].tolist() == spec["input_ids"]
    sep = tokenizer.convert_tokens_to_ids(get_template(model.template).stop_token)
    assert sep == spec["eos_token_id"]
    out = model.generate(pixel_values, inputs["input_ids"], inputs["attention_mask"], eos_token_id=sep,
                         output_logits=True, return_dict_in_generate=True, **spec["call"]["generation_config"])
    return spec, pixel_values, inputs, out


def assert_steps_match(out, expected_ids: list[list[int]], golden_steps: torch.Tensor, pad_id: int, tol: float):
    """Tokens as the official batch returns them (a stopped row padded with pad_id), and each row's step logits
    for the steps it ran (the engine computes nothing for a row after it stopped)."""
    sequences = out.sequences.tolist()
    longest = len(sequences[0])
    assert sequences == [row[:longest] for row in expected_ids]
    assert all(t == pad_id for row in expected_ids for t in row[longest:])
    steps = torch.stack(out.logits)  # [steps, batch, vocab]
    for row, ids in enumerate(sequences):
        computed = ~steps[:, row].isnan().any(-1)  # [steps]: the steps this row ran, first
        count = int(computed.sum())
        assert count >= 1 and computed[:count].all()
        assert all(t == pad_id for t in ids[count:])
        assert rel_l2(steps[:count, row], golden_steps[:count, row]) < tol, row


@pytest.mark.parametrize("name,case", chat_cases())
def test_chat_case_tokens_and_logits(name, case):
    model, tokenizer = load_fp32(name)
    spec, pixel_values, inputs, out = run_case(model, tokenizer, name, case)
    tensors = golden_tensors(name)
    assert_steps_match(out, spec["generated_ids"], tensors[f"chat.{case}.step_logits"], tokenizer.pad_token_id,
                       FP32_TOL)
    if f"chat.{case}.prefill_inputs_embeds" in tensors:
        vit = model.extract_feature(pixel_values) if pixel_values is not None else None
        embeds = model.embed_inputs(inputs["input_ids"], vit)
        assert rel_l2(embeds, tensors[f"chat.{case}.prefill_inputs_embeds"]) < FP32_TOL
    if f"chat.{case}.prefill_logits" in tensors:
        logits = model(pixel_values, inputs["input_ids"]).logits
        assert rel_l2(logits, tensors[f"chat.{case}.prefill_logits"]) < FP32_TOL


@pytest.mark.parametrize("name,case", chat_cases())
def test_chat_api_response(name, case):
    """The public chat / batch_chat API gives the official response text (and history)."""
    model, tokenizer = load_fp32(name)
    model.system_message = None
    spec = golden_json(name)["chat"][case]
    call = spec["call"]
    pixel_values = pixel_values_for(call["images"])
    if case == "image_legacy_system_message":
        model.system_message = "You are an AI assistant whose name is InternLM (书生·浦语)."
    if call["api"] == "batch_chat":
        responses = model.batch_chat(tokenizer, pixel_values, call["questions"], dict(call["generation_config"]),
                                     num_patches_list=call["num_patches_list"])
        assert responses == spec["responses"]
        return
    history = [tuple(turn) for turn in call["history_in"]] if call["history_in"] else None
    response, history_out = model.chat(tokenizer, pixel_values, call["question"], dict(call["generation_config"]),
                                       history=history, return_history=True,
                                       num_patches_list=call["num_patches_list"])
    assert response == spec["response"]
    assert [list(turn) for turn in history_out] == spec["history_out"]
