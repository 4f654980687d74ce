"""`serve` serves Mini-InternVL-Chat-4B-V1.5 (Phi-3): greedy answers are the official `chat` goldens of the 4B
tiny checkpoint (its `phi3-chat` prompt, `<|end|>` stop and Llama-style tokenizer), streamed and not."""
from __future__ import annotations

import openai
import pytest

from golden_utils import MODELS, checkpoint
from server_utils import running_server
from test_server import golden_request

PHI3 = MODELS[2]
MODEL = "mini-4b-tiny"


@pytest.fixture(scope="module")
def client():
    with running_server("--model", str(checkpoint(PHI3)), "--served-model-name", MODEL) as running:
        yield openai.OpenAI(base_url=running.api_url, api_key="none", max_retries=0, timeout=300)


@pytest.mark.parametrize("case", ["text_single", "image_one_tile", "two_images_separate", "image_multiturn_2"])
@pytest.mark.parametrize("stream", [False, True])
def test_greedy_answer_is_the_official_chat_answer(client, case, stream):
    messages, extra, spec = golden_request(case, PHI3)
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                              extra_body=extra, stream=stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in response if chunk.choices) if stream \
        else response.choices[0].message.content
    assert text == spec["response"]
