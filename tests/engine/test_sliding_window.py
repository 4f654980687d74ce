"""Phi-3's sliding window (a query at p sees keys p - w + 1 ... p), where configured: the engine (paged prefill in
chunks, paged decode, both backends) agrees with the full-sequence `forward` under the same window, and the window
really changes the answer."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from internvl_engine import LLM, AutoModel, AutoTokenizer, SamplingParams

from golden_utils import checkpoint

NAME = "Mini-InternVL-Chat-4B-V1-5-tiny"
WINDOW = 24


def model_with_window(window: int | None, backend: str):
    model = AutoModel.from_pretrained(checkpoint(NAME), torch_dtype=torch.float32, backend=backend)
    model.config = replace(model.config, llm=replace(model.config.llm, sliding_window=window))
    return model, AutoTokenizer.from_pretrained(checkpoint(NAME))


def greedy(model, tokenizer, prompt: str, **options) -> tuple[list[int], list[int]]:
    llm = LLM.from_model(model, tokenizer, **options)
    output = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    assert output.error is None
    request_ids = tokenizer(llm.template.render([(llm.template.roles[0], prompt), (llm.template.roles[1], None)],
                                                llm.system_message))["input_ids"]
    return request_ids, output.token_ids


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_engine_with_a_window_equals_the_windowed_forward(backend):
    model, tokenizer = model_with_window(WINDOW, backend)
    prompt_ids, tokens = greedy(model, tokenizer, "Describe the stripe pattern in detail.", max_num_batched_tokens=16)
    ids = torch.tensor([prompt_ids + tokens])
    logits = model(None, ids).logits[0]  # teacher forcing over the prompt and the answer, same window
    predicted = logits[len(prompt_ids) - 1: -1].argmax(-1).tolist()
    assert predicted == tokens
    plain, _ = model_with_window(None, "torch")
    _, unwindowed = greedy(plain, tokenizer, "Describe the stripe pattern in detail.")
    assert unwindowed != tokens  # the window is not a no-op at this length
