"""The OpenAI-compatible server as a real process on loopback, driven by the official `openai` client.

Greedy answers are compared with the official implementation's `model.chat` goldens for the same
conversation (text, images, several images, several turns, a system message), streamed and not.
"""
from __future__ import annotations

import concurrent.futures

import openai
import pytest

from golden_utils import MODELS, checkpoint, golden_json, image_path
from server_utils import data_url, running_server

API_KEY = "test-key"
MODEL = "internvl-tiny"
SYSTEM_OPEN = "<|im_start|>system\n"


@pytest.fixture(scope="module")
def server():
    with running_server("--model", str(checkpoint(MODELS[0])), "--served-model-name", MODEL,
                        "--api-key", API_KEY) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.api_url, api_key=API_KEY, max_retries=0, timeout=300)


def _parts(text: str, images: list) -> list[dict] | str:
    """A chat question with <image> placeholders -> OpenAI content parts (each image part is "<image>\\n")."""
    if not images or "<image>" not in text:
        return text
    pieces = text.split("<image>\n")
    parts = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
    for piece in pieces[1:]:
        parts.append({"type": "image_url", "image_url": {"url": data_url(images.pop(0).read_bytes(), "PNG")}})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def golden_request(case: str, model: str = MODELS[0]) -> tuple[list[dict], dict, dict]:
    """(messages, extra body, the golden case) for one of the official chat goldens."""
    spec = golden_json(model)["chat"][case]
    call = spec["call"]
    images = [image_path(name) for name, _ in call["images"] or []]
    question = call["question"]
    if images and "<image>" not in question and not call["history_in"]:
        question = "<image>\n" + question  # the official chat's own prefix for a lone image
    messages = []
    collapsed = spec["prompt_collapsed"][0]
    if case == "image_legacy_system_message":
        messages.append({"role": "system", "content": collapsed[len(SYSTEM_OPEN): collapsed.index("<|im_end|>")]})
    for user, assistant in call["history_in"] or []:
        messages += [{"role": "user", "content": _parts(user, images)},
                     {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": _parts(question, images)})
    assert not images, "every image has a placeholder"
    max_nums = [max_num for _, max_num in call["images"] or []]
    extra = {"max_dynamic_patch": min(max_nums)} if max_nums else {}
    return messages, extra, spec


CASES = ["text_single", "text_multiturn", "image_one_tile", "image_single", "image_multiturn_2",
         "image_no_placeholder", "two_images_separate", "image_legacy_system_message"]


@pytest.mark.parametrize("case", CASES)
def test_greedy_answer_is_the_official_chat_answer(client, case):
    messages, extra, spec = golden_request(case)
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                              extra_body=extra)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == spec["response"]
    assert choice.finish_reason == ("length" if len(spec["generated_ids"][0]) == 16 else "stop")
    usage = response.usage
    assert usage.prompt_tokens == len(spec["input_ids"][0])
    assert usage.completion_tokens == len(spec["generated_ids"][0])
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.model_extra["image_tiles"] == (spec["call"]["pixel_values_tiles"] or 0)


@pytest.mark.parametrize("case", ["text_single", "two_images_separate", "image_multiturn_2"])
def test_stream_concatenates_to_the_same_answer(client, case):
    messages, extra, spec = golden_request(case)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}, extra_body=extra)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(content) == spec["response"]
    assert sum(1 for piece in content if piece) > 3  # really incremental
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == len(spec["input_ids"][0])


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_the_answer_before_it(client, stream):
    messages, _, spec = golden_request("text_single")
    full = spec["response"]
    stop = full[8:11]  # somewhere in the middle of the golden answer
    expected = full[: full.index(stop)].strip()
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                              stop=[stop, "never appears"], stream=stream)
    if stream:
        chunks = list(response)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][0]
    else:
        text, reason = response.choices[0].message.content, response.choices[0].finish_reason
    assert text == expected and reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    def sample(seed: int) -> str:
        response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell a story."}],
                                                  max_tokens=12, temperature=1.0, top_p=0.95, seed=seed,
                                                  extra_body={"top_k": 50})
        return response.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # batched together, each with its own generator
        first, again, other = pool.map(sample, [1234, 1234, 99])
    assert first == again
    assert first != other


def test_models_health_and_the_api_key(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    anonymous = openai.OpenAI(base_url=server.api_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        anonymous.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert err.value.status_code == 401 and "API key" in err.value.message
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    import urllib.request

    with urllib.request.urlopen(server.base_url + "/health", timeout=10) as response:
        assert response.status == 200


def test_metrics_count_requests_tokens_and_tiles(server, client):
    before = server.metrics()
    messages, extra, spec = golden_request("image_single")
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, extra_body=extra)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=-1)
    after = server.metrics()

    def grew(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    reason = "length" if len(spec["generated_ids"][0]) == 16 else "stop"
    assert grew(f'internvl_requests_total{{status="{reason}"}}') == 1
    assert grew('internvl_http_responses_total{route="/v1/chat/completions",status_code="200"}') == 1
    assert grew('internvl_http_responses_total{route="/v1/chat/completions",status_code="400"}') == 1
    assert grew("internvl_generation_tokens_total") == len(spec["generated_ids"][0])
    assert grew("internvl_prompt_tokens_total") == len(spec["input_ids"][0])
    assert grew("internvl_request_image_tiles_total") == spec["call"]["pixel_values_tiles"]
    assert grew("internvl_time_to_first_token_seconds_count") == 1
    assert grew("internvl_time_per_output_token_seconds_count") == 1
    assert after['internvl_kv_cache_blocks_in_use{model_name="internvl-tiny"}'] == 0
    assert after['internvl_num_requests_running{model_name="internvl-tiny"}'] == 0
    assert after["process_resident_memory_bytes"] > 0
