"""Request parsing and image-URL policy of the server, without a server (pure functions)."""
from __future__ import annotations

import base64

import pytest

from internvl_engine.server.errors import APIError
from internvl_engine.server.media import MediaPolicy, resolve_image, resolve_messages
from internvl_engine.server.protocol import RequestLimits, parse_chat_request

MODELS = ("m",)
LIMITS = RequestLimits(vocab_size=1000, max_tiles=40)


def parse(limits: RequestLimits = LIMITS, **fields):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_chat_request(body, MODELS, limits)


def test_fields_map_to_sampling_params():
    chat = parse(max_completion_tokens=7, max_tokens=99, temperature=0, top_p=0.5, top_k=0, seed=3, stop="END",
                 stream=True, stream_options={"include_usage": True}, max_dynamic_patch=12, ignore_eos=True,
                 repetition_penalty=1.1)
    params = chat.params
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.seed) == (7, 0.0, 0.5, -1, 3)
    assert params.stop == ("END",) and params.ignore_eos and params.repetition_penalty == 1.1
    assert chat.stream and chat.include_usage and chat.max_tiles == 12
    defaults = parse()
    assert defaults.params.max_tokens is None and defaults.params.temperature == 1.0 and not defaults.stream


def test_developer_role_is_the_system_message():
    chat = parse_chat_request({"model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                                          {"role": "user", "content": "hi"}]}, MODELS, LIMITS)
    assert chat.messages[0] == {"role": "system", "content": "be brief"}


@pytest.mark.parametrize("fields, param", [
    ({"max_tokens": True}, "max_tokens"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 2.5}, "temperature"), ({"seed": 1.5}, "seed"), ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"max_dynamic_patch": 41}, "max_dynamic_patch"), ({"stop": ["a", ""]}, "stop"), ({"logprobs": True}, "logprobs"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"stream_options": {"include_usage": "yes"}}, "stream_options"),
    # values that passed validation once and then failed the whole batched sampling step
    ({"top_k": 2**63}, "top_k"), ({"top_k": 1001}, "top_k"), ({"temperature": 1e-40}, "temperature"),
    ({"repetition_penalty": 1e-40}, "repetition_penalty"), ({"seed": 2**63}, "seed"), ({"seed": -2**63 - 1}, "seed"),
    ({"temperature": 10**400}, "temperature"), ({"top_p": 0}, "top_p"),
])
def test_invalid_fields_name_the_parameter(fields, param):
    with pytest.raises(APIError) as err:
        parse(**fields)
    assert err.value.status == 400 and err.value.param == param and param in err.value.message


def test_images_only_in_user_messages():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [image]},
                                       {"role": "user", "content": "and?"}]}
    with pytest.raises(APIError, match="only accepted in user messages"):
        parse_chat_request(body, MODELS, LIMITS)


def test_data_urls_and_limits():
    payload = b"\x89PNG not really"
    url = "data:image/png;base64," + base64.b64encode(payload).decode()
    assert resolve_image(url, MediaPolicy()) == payload
    with pytest.raises(APIError) as err:
        resolve_image(url, MediaPolicy(max_image_bytes=4))
    assert err.value.status == 413
    with pytest.raises(APIError, match="data:image/png;base64"):
        resolve_image("data:image/png,not-base64", MediaPolicy())
    with pytest.raises(APIError, match="unsupported image URL scheme"):
        resolve_image("ftp://host/cat.png", MediaPolicy())


def test_local_paths_stay_inside_the_allowed_folder(tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "cat.png").write_bytes(b"cat")
    (tmp_path / "secret.png").write_bytes(b"secret")
    (allowed / "escape.png").symlink_to(tmp_path / "secret.png")
    policy = MediaPolicy(allowed_local_media_path=allowed)
    assert resolve_image((allowed / "cat.png").as_uri(), policy) == b"cat"
    assert resolve_image(str(allowed / "cat.png"), policy) == b"cat"
    for outside in ((allowed / "escape.png").as_uri(), str(allowed / ".." / "secret.png")):
        with pytest.raises(APIError, match="outside the allowed media folder"):
            resolve_image(outside, policy)
    with pytest.raises(APIError, match="not allowed on this server"):
        resolve_image((allowed / "cat.png").as_uri(), MediaPolicy())
    for bad in (str(allowed / "cat\0.png"), str(allowed) + "/" + "a" * 5000, str(allowed / ("b" * 300)) + ".png"):
        with pytest.raises(APIError) as err:  # a NUL byte, a 5000-character path, a name too long for the OS
            resolve_image(bad, policy)
        assert err.value.status == 400 and len(err.value.message) < 500


def test_remote_images_refuse_internal_addresses_without_connecting(monkeypatch):
    import socket

    def no_connection(*args, **kwargs):
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(socket, "create_connection", no_connection)
    policy = MediaPolicy(allow_remote=True)
    for url in ("http://127.1/cat.png", "http://2130706433/", "http://0x7f000001/", "http://[::1]/",
                "http://169.254.169.254/latest/meta-data/"):
        with pytest.raises(APIError) as err:
            resolve_image(url, policy)
        assert err.value.status == 400 and "private/loopback" in err.value.message
    with pytest.raises(APIError, match="unsupported image URL scheme"):
        resolve_image("ftp://host/cat.png", policy)


def test_resolve_messages_replaces_image_parts_with_bytes():
    url = "data:image/png;base64," + base64.b64encode(b"img").decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                             {"type": "image_url", "image_url": {"url": url}}]}]
    resolved = resolve_messages(messages, MediaPolicy())
    assert resolved[0]["content"] == [{"type": "text", "text": "a"}, {"type": "image", "image": b"img"}]
    assert messages[0]["content"][1]["type"] == "image_url"  # the request is not modified


@pytest.mark.parametrize("fields, limit", [
    ({"stop": ["a"] * 17}, "max_stop_strings"), ({"stop": "x" * 257}, "max_stop_string_chars"),
    ({"messages": [{"role": "user", "content": "x" * 101}]}, "max_prompt_chars"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 60}, {"type": "text", "text": "y" * 60}]}]},
     "max_prompt_chars"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}] * 3}]}, "max_images_per_request"),
])
def test_work_limits_are_413s_naming_the_flag(fields, limit):
    limits = RequestLimits(vocab_size=1000, max_prompt_chars=100, max_images_per_request=2)
    with pytest.raises(APIError) as err:
        parse(limits, **fields)
    assert err.value.status == 413 and err.value.limit == limit
    assert "--" + limit.replace("_", "-") in err.value.message
    parse(limits, stop=["a"] * 16)
    parse(limits, stop="x" * 256)


def test_the_sampling_range_at_its_edges_is_accepted():
    chat = parse(temperature=1e-5, top_k=1000, repetition_penalty=0.01, seed=2**63 - 1)
    assert (chat.params.temperature, chat.params.top_k, chat.params.seed) == (1e-5, 1000, 2**63 - 1)
