"""The OpenAI API as clients expect it: forms OpenAI refuses are refused with a 4xx naming the parameter, every
error (404/405/415 included) is in OpenAI's format, and `models.retrieve` works."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from golden_utils import MODELS, checkpoint
from server_utils import post_json, running_server

MODEL = "tiny"


@pytest.fixture(scope="module")
def server():
    with running_server("--model", str(checkpoint(MODELS[0])), "--served-model-name", MODEL) as running:
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
