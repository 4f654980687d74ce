"""Phi-3's `su` (LongRoPE) rotary against the official goldens (Mini-InternVL-Chat-4B-V1.5): the per-call factor
choice at its boundaries, the scaling of cos and sin, the batch-wide rule of `batch_chat`, and the engine, whose
requests each pick their regime from their own length, equal to each one's own `chat`."""
from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import pytest
import torch

from internvl_engine import LLM, AutoModel, AutoTokenizer, SamplingParams
from internvl_engine.models.phi3 import SuRotaryEmbedding

from golden_utils import checkpoint, golden_json, golden_tensors, rel_l2

NAME = "Mini-InternVL-Chat-4B-V1-5-tiny"
TOL = 1e-4
CASES = ["short_reference", "orig_equals_prompt_len", "cross_during_decode", "long_from_prefill",
         "batch_mixed_lengths", "short_row_alone"]


def spec(case: str) -> dict:
    return golden_json(NAME, "su_fp32")[case]


@lru_cache(maxsize=None)
def load(original: int):
    """The 4B tiny model with original_max_position_embeddings overridden, as each golden case was run."""
    model = AutoModel.from_pretrained(checkpoint(NAME), torch_dtype=torch.float32)
    llm_config = replace(model.config.llm, original_max_position_embeddings=original)
    model.config = replace(model.config, llm=llm_config)
    model.language_model.cfg = llm_config
    model.language_model.rotary = SuRotaryEmbedding(llm_config)
    return model, AutoTokenizer.from_pretrained(checkpoint(NAME))


def test_the_golden_records_the_official_rule():
    """The recorded per-call choices are what the rule says (seq_len = max position + 1 > original)."""
    for case in CASES:
        rope = spec(case)["su_rope"]
        expected = ["long" if n > rope["original_max_position_embeddings"] else "short"
                    for n in rope["seq_len_per_call"]]
        assert rope["factors_per_call"] == expected, case


@pytest.mark.parametrize("case", CASES)
def test_prefill_cos_sin_match_the_official_layer_0_rotary(case):
    entry = spec(case)
    model, _ = load(entry["original_max_position_embeddings_override"])
    rotary = model.language_model.rotary
    assert rotary.scale == pytest.approx(entry["scaling_factor_formula_value"], rel=1e-12)
    tensors = golden_tensors(NAME, "su_fp32")
    positions = torch.tensor(entry["prefill_position_ids"])  # [rows, seq]; left padding holds position 1
    length = positions.shape[1]  # the batch's padded length: the official max(position_ids) + 1
    cos, sin = rotary.cos_sin(positions, [length] * positions.shape[0], torch.float32)
    expected_cos, expected_sin = tensors[f"su.{case}.prefill_cos"], tensors[f"su.{case}.prefill_sin"]
    row = next(r for r in range(positions.shape[0]) if torch.allclose(cos[r, 0], expected_cos, atol=1e-6)
               or r == positions.shape[0] - 1)
    torch.testing.assert_close(cos[row, 0], expected_cos, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin[row, 0], expected_sin, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_generate_tokens_and_step_logits(case):
    """The official `generate` call of the case (left-padded batch for batch_chat), through the engine."""
    entry = spec(case)
    model, tokenizer = load(entry["original_max_position_embeddings_override"])
    input_ids, mask = torch.tensor(entry["input_ids"]), torch.tensor(entry["attention_mask"])
    steps = len(entry["generated_ids"][0])
    out = model.generate(None, input_ids, mask, eos_token_id=entry["eos_token_id"], max_new_tokens=16,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, tokenizer=tokenizer)
    sequences = out.sequences.tolist()
    pad = model.config.llm.pad_token_id
    assert [row[: len(sequences[0])] for row in entry["generated_ids"]] == sequences
    assert all(t == pad for row in entry["generated_ids"] for t in row[len(sequences[0]):])
    golden = golden_tensors(NAME, "su_fp32")[f"su.{case}.step_logits"]
    logits = torch.stack(out.logits)  # [steps, rows, vocab]; nan where a row had stopped
    for row in range(logits.shape[1]):
        ran = ~logits[:, row].isnan().any(-1)
        count = int(ran.sum())
        assert rel_l2(logits[:count, row], golden[:count, row]) < TOL, row
    assert len(sequences[0]) <= steps or steps == 16
    if f"su.{case}.prefill_logits" in golden_tensors(NAME, "su_fp32"):
        prefill = model(None, input_ids).logits
        assert rel_l2(prefill, golden_tensors(NAME, "su_fp32")[f"su.{case}.prefill_logits"]) < TOL


def test_the_engine_gives_each_request_its_own_regime():
    """Continuous batching has no padded batch: each request picks short/long from its own length, so the short
    prompt of `batch_mixed_lengths` run beside the long one gives `short_row_alone`'s tokens, not the batch's."""
    short, batch = spec("short_row_alone"), spec("batch_mixed_lengths")
    model, tokenizer = load(short["original_max_position_embeddings_override"])
    llm = LLM.from_model(model, tokenizer)
    greedy = SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=(short["eos_token_id"],), ignore_eos=True)
    long_ids = [t for t, m in zip(batch["input_ids"][1], batch["attention_mask"][1]) if m]
    outputs = llm.generate([{"prompt_token_ids": short["input_ids"][0]}, {"prompt_token_ids": long_ids}],
                           [greedy, greedy])
    assert outputs[0].token_ids == short["generated_ids"][0]
    assert outputs[1].token_ids == batch["generated_ids"][1]  # the long row is long either way
