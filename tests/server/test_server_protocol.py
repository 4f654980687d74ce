"""Request parsing and image-URL policy of the server, without a server (pure functions)."""
from __future__ import annotations

import base64

import pytest

from internvl_engine.server.errors import APIError
from internvl_engine.server.media import MediaPolicy, resolve_image, resolve_messages
from internvl_engine.server.protocol import parse_chat_request

MODELS = ("m",)


def parse(**fields):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_chat_request(body, MODELS, max_tiles_limit=40)


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
                                                          {"role": "user", "content": "hi"}]}, MODELS, 40)
    assert chat.messages[0] == {"role": "system", "content": "be brief"}


@pytest.mark.parametrize("fields, param", [
    ({"max_tokens": True}, "max_tokens"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 2.5}, "temperature"), ({"seed": 1.5}, "seed"), ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"max_dynamic_patch": 41}, "max_dynamic_patch"), ({"stop": ["a"] * 17}, "stop"), ({"logprobs": True}, "logprobs"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"stream_options": {"include_usage": "yes"}}, "stream_options"),
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
        parse_chat_request(body, MODELS, 40)


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


def test_resolve_messages_replaces_image_parts_with_bytes():
    url = "data:image/png;base64," + base64.b64encode(b"img").decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                             {"type": "image_url", "image_url": {"url": url}}]}]
    resolved = resolve_messages(messages, MediaPolicy())
    assert resolved[0]["content"] == [{"type": "text", "text": "a"}, {"type": "image", "image": b"img"}]
    assert messages[0]["content"][1]["type"] == "image_url"  # the request is not modified
