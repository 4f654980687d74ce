"""The Ray Serve deployment: the routing key (fast), engine options parsed as serve flags (fast), and 2 local replicas
of the tiny model behind the ingress answering the `openai` client, each image always on the replica that Ray Serve's
consistent-hash router gives its key (slow)."""
from __future__ import annotations

import base64
import bisect
import hashlib
import io
import json
import time

import pytest
from PIL import Image

from internvl_engine.server.ray_serve import REPLICA_HEADER, app_builder, engine_arguments, image_key, routing_key

MODEL = "tiny-ray"


def png_data_url(color: tuple[int, int, int], size: int = 64) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_body(url: str | None, text: str = "Describe the image.", **fields) -> dict:
    content = [{"type": "text", "text": text}]
    if url is not None:
        content.append({"type": "image_url", "image_url": {"url": url}})
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields}


def chat_key(body: dict) -> str | None:
    return routing_key("/v1/chat/completions", json.dumps(body).encode())


# ---- fast: the routing key ----
def test_image_key_hashes_the_image_bytes_not_the_request():
    url = png_data_url((200, 10, 10))
    payload = base64.b64decode(url.split(",", 1)[1])
    expected = "image:" + hashlib.sha256(payload).hexdigest()
    assert chat_key(chat_body(url)) == expected
    assert chat_key(chat_body(url, "another question", temperature=0.5)) == expected  # same image, other text
    wrapped = url[:40] + "\n" + url[40:]  # base64 wrapped differently: the same bytes
    assert chat_key(chat_body(wrapped)) == expected
    assert chat_key(chat_body(png_data_url((10, 200, 10)))) != expected


def test_first_image_decides_and_remote_urls_hash_the_url():
    first, second = png_data_url((1, 2, 3)), png_data_url((4, 5, 6))
    body = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "image_url", "image_url": {"url": first}},
                                                      {"type": "image_url", "image_url": {"url": second}}]}]}
    assert chat_key(body) == "image:" + image_key(first)
    remote = "https://example.com/cat.png"
    assert chat_key(chat_body(remote)) == "image:" + hashlib.sha256(remote.encode()).hexdigest()


def test_text_requests_route_by_their_prefix():
    long_text = "x" * 5000
    assert chat_key(chat_body(None, long_text)) == chat_key(chat_body(None, long_text + " a different ending"))
    assert chat_key(chat_body(None, "hello")) != chat_key(chat_body(None, "goodbye"))
    assert chat_key(chat_body(None, "hello")).startswith("prefix:")
    completion = routing_key("/v1/completions", json.dumps({"prompt": ["hello", "other"]}).encode())
    assert completion == routing_key("/v1/completions", json.dumps({"prompt": "hello"}).encode())
    assert routing_key("/v1/completions", json.dumps({"prompt": [1, 2, 3]}).encode()).startswith("prefix:")


def test_no_key_for_other_routes_and_bad_bodies():
    assert routing_key("/v1/models", b"") is None
    assert routing_key("/health", b"{}") is None
    assert routing_key("/v1/chat/completions", b"not json") is None
    assert routing_key("/v1/chat/completions", b"[1, 2]") is None


# ---- fast: engine options are the serve flags ----
def test_engine_options_parse_as_serve_flags():
    args = engine_arguments({"tiny": True, "max_num_seqs": "8", "no_prefix_caching": "true", "quantization": None})
    assert (args.tiny, args.max_num_seqs, args.no_prefix_caching, args.tensor_parallel_size) == \
        ("internvl-chat-v1-5", 8, True, 1)
    with pytest.raises(ValueError, match="unrecognized arguments: --bogus"):
        engine_arguments({"tiny": True, "bogus": 1})
    with pytest.raises(ValueError, match="max-num-seqs"):
        engine_arguments({"tiny": True, "max_num_seqs": 0})
    assert engine_arguments({"tiny": True, "tensor_parallel_size": 2}).tensor_parallel_size == 2


def test_app_builder_splits_ray_and_engine_arguments():
    pytest.importorskip("ray.serve")
    app = app_builder({"tiny": "true", "num_replicas": "3", "num_cpus": "0.5", "max_num_seqs": "4",
                       "deployment_options": '{"health_check_period_s": 2}'})
    engine = app._bound_deployment.init_args[0]._bound_deployment  # the ingress's first argument
    assert engine.num_replicas == 3
    assert engine.ray_actor_options["num_cpus"] == 0.5
    assert engine._deployment_config.health_check_period_s == 2
    assert engine.init_args[0] == {"tiny": "true", "max_num_seqs": "4"}


# ---- slow: a local Ray cluster with 2 replicas ----
def ring_owner(replica_ids: set[str], key: str) -> str:
    """The replica that Ray's ConsistentHashRouter gives `key` (its ring: 100 virtual nodes per replica)."""
    from ray.serve.experimental.consistent_hash_router import DEFAULT_NUM_VIRTUAL_NODES, _hash_bytes

    ring = sorted((_hash_bytes(f"{replica}:{index}".encode()), replica)
                  for replica in replica_ids for index in range(DEFAULT_NUM_VIRTUAL_NODES))
    position = bisect.bisect_right([point for point, _ in ring], _hash_bytes(key.encode()))
    return ring[position % len(ring)][1]


def unfinished_requests(base_url: str, replica: str, timeout_s: float = 20.0) -> int:
    """The replica's unfinished requests from /health (keyless, so spread: asked until that replica answers), once
    they reach 0 or the time is up."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        response = httpx.get(base_url + "/health", timeout=30)
        count = response.json()["unfinished_requests"]
        if response.headers[REPLICA_HEADER] == replica and (count == 0 or time.monotonic() > deadline):
            return count


def vit_tiles_encoded(base_url: str, replicas: set[str]) -> dict[str, float]:
    """Each replica's count of tiles its vision encoder encoded, from /metrics (asked until every replica answered)."""
    import httpx

    counts: dict[str, float] = {}
    while set(counts) != replicas:
        response = httpx.get(base_url + "/metrics", timeout=30)
        samples = [line.split() for line in response.text.splitlines() if line.startswith("internvl_vit_tiles_encoded")]
        counts[response.headers[REPLICA_HEADER]] = sum(float(sample[-1]) for sample in samples)
    return counts


@pytest.fixture(scope="module")
def ray_app():
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from internvl_engine.server.ray_serve import build_ray_app
    from internvl_engine.server.spawn import free_port

    ray.init(num_cpus=2, include_dashboard=False)  # the replicas' logs come to pytest's captured output
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = {"tiny": True, "served_model_name": MODEL, "backend": "torch", "max_num_seqs": 4,
                   "max_tiles_per_image": 2, "preprocess_workers": 1}
        serve.run(build_ray_app(options, num_replicas=2, num_cpus=0.5,
                                deployment_options={"health_check_period_s": 1.0}),
                  name="internvl", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow
def test_two_replicas_answer_openai_and_keep_images_on_their_replica(ray_app):
    import httpx
    import openai
    from ray import serve

    client = openai.OpenAI(base_url=ray_app + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert [model.id for model in client.models.list().data] == [MODEL]
    status = serve.status().applications["internvl"]
    assert status.status == "RUNNING"
    assert status.deployments["EngineReplica"].replica_states == {"RUNNING": 2}
    health = httpx.get(ray_app + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"

    # keyless requests are spread: both replicas answer, and name themselves
    replicas = {httpx.get(ray_app + "/v1/models", timeout=30).headers[REPLICA_HEADER] for _ in range(24)}
    assert len(replicas) == 2

    images = [png_data_url((40 * index, 255 - 30 * index, 90)) for index in range(6)]
    tiles_encoded = []
    for repeat in range(2):
        for index, url in enumerate(images):
            body = chat_body(url, f"question {repeat}")
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=body["messages"], max_tokens=2, temperature=0)
            assert raw.parse().choices[0].message.content is not None
            assert raw.headers[REPLICA_HEADER] == ring_owner(replicas, chat_key(body)), (repeat, index)
        tiles_encoded.append(sum(vit_tiles_encoded(ray_app, replicas).values()))
    # the second time, every image is met by the replica that cached it: the vision encoder has nothing to do
    assert tiles_encoded[0] >= len(images) and tiles_encoded[1] == tiles_encoded[0]

    # streaming: the chunks come through the ingress, from the image's replica
    body = chat_body(images[0])
    with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=body["messages"], max_tokens=3, stream=True,
            stream_options={"include_usage": True}) as response:
        assert response.headers[REPLICA_HEADER] == ring_owner(replicas, chat_key(body))
        chunks = list(response.parse())
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1

    # completions: a repeated prompt stays on one replica too
    answered_by = set()
    for _ in range(3):
        raw = client.completions.with_raw_response.create(model=MODEL, prompt="The same prompt", max_tokens=2)
        assert raw.parse().choices[0].text is not None
        answered_by.add(raw.headers[REPLICA_HEADER])
    assert len(answered_by) == 1

    # a client that leaves mid-stream aborts its request on the replica
    body = chat_body(None, "count forever", max_tokens=20000, ignore_eos=True, stream=True)
    with httpx.stream("POST", ray_app + "/v1/chat/completions", json=body, timeout=60) as response:
        replica = response.headers[REPLICA_HEADER]
        lines = response.iter_lines()
        for _ in range(8):
            next(lines)
    assert unfinished_requests(ray_app, replica) == 0

    # the replica's errors reach the client in OpenAI's format
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    assert refused.value.status_code == 400
