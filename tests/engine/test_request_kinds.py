"""The request kinds the OpenAI endpoints send: a system-only conversation (answered after the open assistant
role, as OpenAI and vLLM's generation prompt do), one ending with the assistant's message, and a raw text prompt
(/v1/completions: no template, BOS as the tokenizer adds it)."""
from __future__ import annotations

import pytest
import torch

from golden_utils import MODELS, checkpoint
from internvl_engine.engine.llm import LLM
from internvl_engine.engine.sampling_params import SamplingParams
from internvl_engine.text.templates import build_prompt, get_template


@pytest.fixture(scope="module", params=MODELS)
def llm(request) -> LLM:
    return LLM(checkpoint(request.param), dtype=torch.float32, device="cpu", backend="torch")


def test_a_system_only_conversation_opens_the_assistant_role(llm):
    template = get_template(llm.template.name)
    prepared = llm.prepare({"messages": [{"role": "system", "content": "Be brief."}]}, SamplingParams())
    expected = template.system_template.format(system_message="Be brief.") + template.sep + template.roles[1]
    assert build_prompt(template, None, None, "Be brief.") == expected
    assert prepared.request.prompt_token_ids == llm.tokenizer.encode(expected)


def test_a_conversation_ending_with_the_assistant_gets_a_new_assistant_turn(llm):
    template = get_template(llm.template.name)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    prepared = llm.prepare({"messages": messages}, SamplingParams())
    expected = build_prompt(template, None, [("hi", "hello")], llm.system_message)
    assert expected.endswith("hello" + template.sep + template.roles[1])
    assert prepared.request.prompt_token_ids == llm.tokenizer.encode(expected)


def test_an_assistant_message_without_a_user_turn_is_still_refused(llm):
    output = llm.add_request({"messages": [{"role": "assistant", "content": "hello"}]})
    assert "must follow a user message" in output.error


def test_a_text_prompt_is_tokenized_as_it_is(llm):
    text = "The capital of France is"
    prepared = llm.prepare({"text": text}, SamplingParams())
    assert prepared.request.prompt_token_ids == llm.tokenizer.encode(text)
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    by_text, by_ids = llm.generate([{"text": text}, {"prompt_token_ids": llm.tokenizer.encode(text)}], greedy)
    assert by_text.token_ids == by_ids.token_ids and len(by_text.token_ids) == 4


def test_a_text_prompt_cannot_smuggle_image_tokens(llm):
    output = llm.add_request({"text": "look: <IMG_CONTEXT>"})
    assert "<IMG_CONTEXT>" in output.error


def test_logit_bias_outside_the_vocabulary_is_refused(llm):
    vocab = llm.model.config.llm.vocab_size
    output = llm.add_request("hi", SamplingParams(logit_bias={vocab: 1.0}))
    assert f"token id {vocab} is outside the vocabulary" in output.error
