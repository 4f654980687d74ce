"""The OpenAI API as clients expect it: forms OpenAI refuses are refused with a 4xx naming the parameter, every
error (404/405/415 included) is in OpenAI's format, `models.retrieve` works, `logit_bias` steers the sampler,
system-only conversations are answered, and /v1/completions serves text and token-id prompts (streaming too)."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from golden_utils import MODELS, checkpoint
from server_utils import post_json, running_server

MODEL = "tiny"
DEFAULT_MAX_TOKENS = 7


@pytest.fixture(scope="module")
def server():
    with running_server("--model", str(checkpoint(MODELS[0])), "--served-model-name", MODEL,
                        "--default-max-tokens", str(DEFAULT_MAX_TOKENS)) as running:
        yield running


def request(url: str, method: str = "GET", data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers or {}, method=method),
                                    timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def assert_openai_error(status: int, body: dict, expected_status: int, param: str | None = None) -> None:
    assert status == expected_status, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param


def chat(content, **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields}


def test_image_url_must_be_an_object(server):
    status, body = post_json(server.api_url + "/chat/completions",
                             chat([{"type": "image_url", "image_url": "data:image/png;base64,AAAA"}]))
    assert_openai_error(status, body, 400, "messages[0].content[0].image_url")


def test_stream_options_only_with_streaming(server):
    status, body = post_json(server.api_url + "/chat/completions",
                             chat("hi", stream_options={"include_usage": True}))
    assert_openai_error(status, body, 400, "stream_options")
    status, _ = post_json(server.api_url + "/chat/completions", chat("hi", stream=False))
    assert status == 200


def test_the_body_must_be_json(server):
    status, body = request(server.api_url + "/chat/completions", "POST", b"model=tiny&messages=hi",
                           {"Content-Type": "application/x-www-form-urlencoded"})
    assert_openai_error(status, body, 415)


def test_models_retrieve_and_not_found_errors(server):
    client = openai.OpenAI(base_url=server.api_url, api_key="none", max_retries=0)
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.model_extra["max_model_len"] > 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    status, body = request(server.api_url + "/models/gpt-4")
    assert_openai_error(status, body, 404, "model")
    status, body = request(server.base_url + "/v1/nothing-here")
    assert_openai_error(status, body, 404)
    status, body = request(server.api_url + "/chat/completions")  # GET on a POST route
    assert_openai_error(status, body, 405)


# ---- logit_bias ----
def tokenizer():
    from internvl_engine.text.llama_tokenizer import load_tokenizer

    return load_tokenizer(checkpoint(MODELS[0]))


@pytest.mark.parametrize("bias", [{"abc": 1}, {"-1": 1}, {"1e3": 1}, {"99999999": 1}, {"5": 101}, {"5": -100.5},
                                  {"5": "high"}, {"5": True}, {"5": None}, [5, 1], "5:1"])
def test_invalid_logit_bias_is_a_400_naming_it(server, bias):
    status, body = post_json(server.api_url + "/chat/completions", chat("hi", logit_bias=bias))
    assert_openai_error(status, body, 400, "logit_bias")


def test_logit_bias_steers_greedy_and_sampled_rows(server):
    forced = tokenizer().encode("hello", add_special_tokens=False)[-1]
    expected = tokenizer().decode([forced] * 4)
    for fields in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
        status, body = post_json(server.api_url + "/chat/completions",
                                 chat("hi", max_tokens=4, ignore_eos=True, logit_bias={str(forced): 100}, **fields))
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == expected.strip()
    status, plain = post_json(server.api_url + "/chat/completions", chat("hi", max_tokens=1, temperature=0))
    first = tokenizer().encode(plain["choices"][0]["message"]["content"], add_special_tokens=False)[0]
    status, banned = post_json(server.api_url + "/chat/completions",
                               chat("hi", max_tokens=1, temperature=0, logit_bias={str(first): -100}))
    assert status == 200 and banned["choices"][0]["message"]["content"] != plain["choices"][0]["message"]["content"]


# ---- conversations ----
def test_a_system_only_conversation_is_answered(server):
    client = openai.OpenAI(base_url=server.api_url, api_key="none", max_retries=0)
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Say hello."}],
                                            max_tokens=3, temperature=0)
    assert answer.choices[0].finish_reason in ("length", "stop") and answer.usage.prompt_tokens > 0
    ended = client.chat.completions.create(
        model=MODEL, max_tokens=3, temperature=0,
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    assert ended.usage.prompt_tokens > answer.usage.prompt_tokens - 10


def test_a_request_without_max_tokens_stops_at_the_default_cap(server):
    status, body = post_json(server.api_url + "/chat/completions",
                             {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True})
    assert status == 200 and body["usage"]["completion_tokens"] == DEFAULT_MAX_TOKENS


# ---- /v1/completions ----
def test_completions_from_text_and_token_ids_agree(server):
    client = openai.OpenAI(base_url=server.api_url, api_key="none", max_retries=0)
    prompt = "The capital of France is"
    ids = tokenizer().encode(prompt)  # with BOS, as the server tokenizes a string
    by_text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                         extra_body={"ignore_eos": True})
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert by_text.object == "text_completion" and by_text.id.startswith("cmpl-")
    assert by_text.choices[0].text == by_ids.choices[0].text and by_text.choices[0].finish_reason == "length"
    assert by_text.usage.prompt_tokens == len(ids) and by_text.usage.completion_tokens == 5
    batch = client.completions.create(model=MODEL, prompt=[prompt, "Once upon a time"], max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert [choice.index for choice in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_text.choices[0].text
    assert batch.usage.completion_tokens == 10
    default = client.completions.create(model=MODEL, prompt=prompt, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


def test_completions_stream_matches_the_full_answer(server):
    client = openai.OpenAI(base_url=server.api_url, api_key="none", max_retries=0)
    prompts = ["The capital of France is", "Once upon a time"]
    full = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0,
                                         extra_body={"ignore_eos": True})
    texts, finish, usage = ["", ""], [None, None], None
    for event in client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
        for choice in event.choices:
            texts[choice.index] += choice.text
            finish[choice.index] = choice.finish_reason or finish[choice.index]
        usage = event.usage or usage
    assert texts == [choice.text for choice in full.choices] and finish == ["length", "length"]
    assert usage.completion_tokens == 12


@pytest.mark.parametrize("fields, param", [
    ({}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": [[]]}, "prompt"), ({"prompt": {"a": 1}}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"), ({"prompt": [10**9]}, "prompt"), ({"prompt": "a", "echo": True}, "echo"),
    ({"prompt": "a", "suffix": "b"}, "suffix"), ({"prompt": "a", "logprobs": 2}, "logprobs"),
    ({"prompt": "a", "best_of": 2}, "best_of"), ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "temperature": -1}, "temperature"), ({"prompt": "a", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "a", "seed": 2**63}, "seed"), ({"prompt": ["a"] * 65}, "prompt")])
def test_invalid_completions_are_400s_naming_the_parameter(server, fields, param):
    status, body = post_json(server.api_url + "/completions", {"model": MODEL, **fields})
    assert_openai_error(status, body, 413 if fields.get("prompt") == ["a"] * 65 else 400, param)


def test_a_completion_prompt_past_the_context_names_what_to_raise(server):
    status, body = post_json(server.api_url + "/completions",
                             {"model": MODEL, "prompt": "hi", "max_tokens": 10**7})
    assert_openai_error(status, body, 400, "prompt")
    assert "max_model_len" in body["error"]["message"] and "max_tokens" in body["error"]["message"]
