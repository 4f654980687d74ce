"""Ray Serve: N engine replicas (each an `AsyncLLM`) behind one ingress that serves the same OpenAI API.

    client ─► Ray Serve proxy ─► OpenAIIngress ── session_id=key, stream=True ──► EngineReplica ×N
                                 (reads the body,   Ray Serve's ConsistentHashRouter   (build_app's routes
                                  computes the key)  picks the replica of the key       around an AsyncLLM)

Routing: the key of a request is the sha256 of its first image (the bytes of a data URL's payload, or the URL
itself for remote and file URLs), else of the first `prefix_chars` characters of its text. The ingress sends it as
the request's session id, and the engine deployment routes with Ray Serve's consistent-hash request router: the
same key lands on the same replica while the replica set is stable, so a repeated image hits that replica's feature
and prefix caches, and scaling in or out moves only the keys of the replicas that came or went. A replica at
`max_ongoing_requests` passes its keys to the next ones on the ring (`num_fallback_replicas`, 0 to wait instead).
Requests without a key (models, health, metrics) are spread over the replicas. Ray Serve also owns the rest:
replica count or autoscaling, health checks (`EngineReplica.check_health` asks the app's /health), restarts and
graceful shutdown (ongoing requests finish, then the engine's pools stop).

A replica runs the app of `build_app` in-process: the ingress forwards each request as (method, path, query,
headers, body) and streams back the response head, then its body chunks, so every route, error and limit of the
single-machine server is the same here, and each response names its replica in `x-internvl-replica`.

`build_ray_app(engine_options, num_replicas=...)` returns the application (serve.run), and `app_builder` is the
import path of `serve run` and of a KubeRay RayService: `serve run internvl_engine.server.ray_serve:app_builder
model=/models/InternVL-Chat-V1-5 num_replicas=2 num_gpus=1`. Engine options are the flags of `internvl-engine serve`
with underscores (max_num_seqs=32, no_prefix_caching=true). Needs `pip install 'internvl-engine[ray]'`.
"""
from __future__ import annotations

import argparse
import asyncio
import binascii
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

ROUTER_CLASS = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"  # Ray >= 2.56
REPLICA_HEADER = "x-internvl-replica"
ROUTED_PATHS = ("/v1/chat/completions", "/v1/completions")
DEFAULT_PREFIX_CHARS = 1024
# Keys of `app_builder`'s arguments that set up Ray Serve; every other key is an engine option (a serve flag).
RAY_ARGUMENTS = ("num_replicas", "autoscaling_config", "num_cpus", "num_gpus", "max_ongoing_requests",
                 "num_fallback_replicas", "prefix_chars", "ingress_replicas", "deployment_options", "engine_options")


# ---- the routing key (no Ray needed) ----
def _sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def image_key(url: str) -> str:
    """The key of an image URL: sha256 of a base64 data URL's decoded payload (the image's bytes, however the base64
    is wrapped), else of the URL string (remote and file URLs: the engine fetches those on the replica)."""
    head, comma, payload = url.partition(",")
    if url.startswith("data:") and comma and head.endswith(";base64"):
        try:
            return _sha256(binascii.a2b_base64(payload))
        except (binascii.Error, ValueError):
            pass  # the replica refuses it with its 400; any stable key will do
    return _sha256(url)


def _first_image_url(messages: Any) -> str | None:
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            image = part.get("image_url") if isinstance(part, dict) and part.get("type") == "image_url" else None
            url = image.get("url") if isinstance(image, dict) else None
            if isinstance(url, str):
                return url
    return None


def _messages_text(messages: Any, limit: int) -> str:
    """The conversation's text as the prompt starts (role, then text), up to `limit` characters."""
    pieces, size = [], 0
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict) or size >= limit:
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(part["text"] for part in content
                              if isinstance(part, dict) and isinstance(part.get("text"), str))
        piece = f"{message.get('role')}\n{content if isinstance(content, str) else ''}\n"
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces)[:limit]


def routing_key(path: str, body: bytes, prefix_chars: int = DEFAULT_PREFIX_CHARS) -> str | None:
    """`image:<sha256>` of a chat request's first image, else `prefix:<sha256>` of the first `prefix_chars`
    characters of its text (messages, or a completions prompt); None for other routes and for bodies that are not
    JSON objects (the replica answers those with their error)."""
    if path not in ROUTED_PATHS:
        return None
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(request, dict):
        return None
    if path == "/v1/chat/completions":
        url = _first_image_url(request.get("messages"))
        if url is not None:
            return "image:" + image_key(url)
        text = _messages_text(request.get("messages"), prefix_chars)
    else:
        prompt = request.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]  # a batch of text prompts: the first one's prefix
        text = prompt if isinstance(prompt, str) else json.dumps(prompt, separators=(",", ":"))
    return "prefix:" + _sha256(text[:prefix_chars])


# ---- engine options: the flags of `internvl-engine serve` ----
class _OptionsParser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise ValueError(f"bad engine option: {message}")


def engine_arguments(options: Mapping[str, Any]) -> argparse.Namespace:
    """The parsed serve flags of an engine-options dict ({"max_num_seqs": 32, "no_prefix_caching": True}; values may
    be strings, as `serve run key=value` gives them). Raises ValueError naming a bad or unknown option."""
    from .launch import add_serve_arguments

    parser = _OptionsParser(prog="engine options", add_help=False)
    add_serve_arguments(parser)
    argv: list[str] = []
    for key, value in options.items():
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if value is None or value is False:
            continue
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return parser.parse_args(argv)


# ---- the two deployments ----
@dataclass(frozen=True)
class RawRequest:
    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(frozen=True)
class ResponseHead:
    status: int
    headers: list[tuple[bytes, bytes]]
    streaming: bool  # a text/event-stream: the ingress passes the chunks on as they come


class EngineReplica:
    """One `AsyncLLM` and the app of `build_app` around it, answering the requests the ingress forwards."""

    def __init__(self, engine_options: Mapping[str, Any]) -> None:
        from ray import serve

        from .app import build_app
        from .launch import build_engine, return_freed_buffers_to_the_os, server_config

        args = engine_arguments(engine_options)
        return_freed_buffers_to_the_os()
        self.engine, name = build_engine(args)
        self.app = build_app(self.engine, server_config(args, self.engine, name))
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    async def handle(self, request: RawRequest) -> AsyncIterator[ResponseHead | bytes]:
        """Run `request` through the app: yields the ResponseHead, then the body's chunks. A consumer that leaves
        early is a client disconnect for the app (its requests are aborted)."""
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": request.method, "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
                 "root_path": "", "query_string": request.query, "headers": request.headers,
                 "client": None, "server": None}
        messages: asyncio.Queue = asyncio.Queue()
        client_gone = asyncio.Event()
        body_given = False

        async def receive() -> dict:
            nonlocal body_given
            if not body_given:
                body_given = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await client_gone.wait()
            return {"type": "http.disconnect"}

        app_task = asyncio.ensure_future(self.app(scope, receive, messages.put))
        app_task.add_done_callback(lambda _: messages.put_nowait(None))
        try:
            while True:
                message = await messages.get()
                if message is None:  # the app returned before the end of its response
                    app_task.result()  # its exception, if it raised one
                    raise RuntimeError(f"{request.method} {request.path}: the app ended without a complete response")
                if message["type"] == "http.response.start":
                    headers = [*message.get("headers", []), (REPLICA_HEADER.encode(), self.replica_id.encode())]
                    kind = dict(headers).get(b"content-type", b"")
                    yield ResponseHead(message["status"], headers, kind.startswith(b"text/event-stream"))
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body", False):
                        break
            await app_task  # what runs after the body (a stream's abort), then the task is done
        finally:
            client_gone.set()
            if not app_task.done():  # the consumer left: the app sees the disconnect, aborts and returns
                try:
                    await asyncio.wait_for(asyncio.shield(app_task), 10.0)
                except BaseException:  # noqa: BLE001 - cleanup: a stuck app is cancelled
                    app_task.cancel()

    async def check_health(self) -> None:
        """Ray Serve's health check: the app's /health through the same path as a request (the replica is
        restarted when this raises or times out, e.g. with its event loop blocked)."""
        head = None
        async for item in self.handle(RawRequest("GET", "/health", b"", [], b"")):
            head = item if isinstance(item, ResponseHead) else head
        if head is None or head.status != 200:
            raise RuntimeError(f"the engine's /health answered {head.status if head else 'nothing'}")

    def __del__(self) -> None:  # Ray Serve calls it at graceful shutdown, after the ongoing requests finished
        engine, self.engine = getattr(self, "engine", None), None  # once: the garbage collector calls it again
        if engine is not None:
            engine.shutdown()


class OpenAIIngress:
    """The HTTP entry: reads the body, computes its routing key, forwards to an EngineReplica and streams back."""

    def __init__(self, engine: Any, prefix_chars: int, max_request_bytes: int) -> None:
        self.engine, self.prefix_chars, self.max_request_bytes = engine, prefix_chars, max_request_bytes

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, Response, StreamingResponse

        from .errors import error_body

        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > self.max_request_bytes:
                return JSONResponse(error_body(413, f"the request body is over the limit of {self.max_request_bytes} "
                                               "bytes (--max-request-bytes)", code="request_too_large"), 413)
            parts.append(part)
        body = b"".join(parts)
        path = request.url.path
        key = routing_key(path, body, self.prefix_chars) if request.method == "POST" else None
        handle = self.engine.options(stream=True, **({"session_id": key} if key else {}))
        responses = handle.handle.remote(RawRequest(request.method, path, request.url.query.encode(),
                                                    list(request.headers.raw), body))
        try:
            head = await responses.__anext__()
        except Exception as err:  # noqa: BLE001 - the replica died or refused: the client gets a 503 to retry
            return JSONResponse(error_body(503, f"no engine replica could answer: {type(err).__name__}: {str(err)[:300]}"),
                                503, headers={"Retry-After": "1"})
        headers = [(name, value) for name, value in head.headers if name.lower() != b"content-length"]
        if head.streaming:
            response = StreamingResponse(_rest(responses), head.status)
        else:
            response = Response(b"".join([chunk async for chunk in responses]), head.status)
            headers.append((b"content-length", str(len(response.body)).encode()))
        response.raw_headers = headers
        return response


async def _rest(responses: Any) -> AsyncIterator[bytes]:
    try:
        async for chunk in responses:
            yield chunk
    finally:
        responses.cancel()  # a client that left: the replica sees the disconnect (a no-op once finished)


# ---- the application ----
def build_ray_app(engine_options: Mapping[str, Any], num_replicas: int | str = 1, *,
                  autoscaling_config: Mapping[str, Any] | None = None, num_cpus: float = 1.0, num_gpus: float = 0.0,
                  max_ongoing_requests: int = 128, num_fallback_replicas: int = 2,
                  prefix_chars: int = DEFAULT_PREFIX_CHARS, ingress_replicas: int = 1,
                  deployment_options: Mapping[str, Any] | None = None) -> Any:
    """The Serve application: `ingress_replicas` OpenAIIngress in front of the EngineReplica deployment.

    engine_options: serve flags for every replica ({"model": PATH} or {"tiny": True}, "max_num_seqs", ...;
    "tensor_parallel_size", default 1: the GPUs of one replica's tensor-parallel group, reserved together on one
    node). num_replicas, or autoscaling_config (Ray Serve's dict: min_replicas, max_replicas,
    target_ongoing_requests, ...): the engine replicas. num_cpus, num_gpus: Ray resources of one replica (per GPU
    of its group). max_ongoing_requests: requests one replica takes before its keys spill to the next
    `num_fallback_replicas` replicas of the ring. deployment_options: more Ray Serve settings of the engine
    deployment (health_check_period_s, health_check_timeout_s, graceful_shutdown_timeout_s, ...).
    """
    import importlib.util

    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    if importlib.util.find_spec(ROUTER_CLASS.rpartition(".")[0]) is None:
        raise ValueError(f"Ray {ray.__version__} has no ConsistentHashRouter: pip install 'ray[serve]>=2.56'")
    args = engine_arguments(engine_options)  # a bad option fails here, not in every replica
    tensor_parallel_size = args.tensor_parallel_size
    options: dict[str, Any] = {
        "max_ongoing_requests": max_ongoing_requests,
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "request_router_config": RequestRouterConfig(
            request_router_class=ROUTER_CLASS, request_router_kwargs={"num_fallback_replicas": num_fallback_replicas}),
    }
    if autoscaling_config is not None:
        options["autoscaling_config"] = dict(autoscaling_config)
    else:
        options["num_replicas"] = num_replicas
    if tensor_parallel_size > 1 and num_gpus > 0:  # the replica's TP group: its GPUs on one node
        options["placement_group_bundles"] = ([{"CPU": num_cpus, "GPU": num_gpus}]
                                              + [{"GPU": num_gpus}] * (tensor_parallel_size - 1))
        options["placement_group_strategy"] = "STRICT_PACK"
    options.update(deployment_options or {})
    engine = serve.deployment(EngineReplica, name="EngineReplica").options(**options).bind(dict(engine_options))
    ingress = serve.deployment(OpenAIIngress, name="OpenAIIngress").options(
        num_replicas=ingress_replicas, max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
    return ingress.bind(engine, prefix_chars, args.max_request_bytes)


def app_builder(arguments: Mapping[str, Any]) -> Any:
    """`serve run internvl_engine.server.ray_serve:app_builder KEY=VALUE ...` and a RayService's serveConfigV2
    (`import_path` + `args`): RAY_ARGUMENTS set up Ray Serve (as build_ray_app's), every other key is an engine
    option; `engine_options` may also hold them as a mapping. Values may be strings (from the command line)."""
    ray_arguments = {key: value for key, value in arguments.items() if key in RAY_ARGUMENTS}
    engine_options = {**dict(ray_arguments.pop("engine_options", None) or {}),
                      **{key: value for key, value in arguments.items() if key not in RAY_ARGUMENTS}}
    for key, kind in (("num_cpus", float), ("num_gpus", float), ("max_ongoing_requests", int),
                      ("num_fallback_replicas", int), ("prefix_chars", int), ("ingress_replicas", int)):
        if key in ray_arguments:
            ray_arguments[key] = kind(ray_arguments[key])
    replicas = ray_arguments.pop("num_replicas", 1)
    replicas = replicas if replicas == "auto" else int(replicas)
    for key in ("autoscaling_config", "deployment_options"):
        if isinstance(ray_arguments.get(key), str):  # from the command line: JSON
            ray_arguments[key] = json.loads(ray_arguments[key])
    return build_ray_app(engine_options, replicas, **ray_arguments)


# ---- `internvl-engine serve-ray` ----
# serve flags of uvicorn's connection handling: under Ray Serve its HTTP proxy holds the connections
_PROXY_FLAGS = ("host", "port", "max_connections", "header_timeout_s", "body_idle_timeout_s", "keep_alive_timeout_s",
                "log_level")


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    from .launch import add_serve_arguments, int_in_range, positive_number

    add_serve_arguments(parser)
    ray = parser.add_argument_group("Ray Serve", "Ray Serve's HTTP proxy holds the connections: --max-connections, "
                                    "the connection timeouts and --log-level do not apply.")
    ray.add_argument("--num-replicas", metavar="N", type=int_in_range(1), default=1,
                     help="engine replicas, each with its own engine, KV cache and caches (default %(default)s)")
    ray.add_argument("--num-cpus-per-replica", metavar="N", type=positive_number(), default=1.0,
                     help="Ray CPUs reserved by each replica (default %(default)s)")
    ray.add_argument("--num-gpus-per-replica", metavar="N", type=positive_number(low_inclusive=True), default=None,
                     help="Ray GPUs reserved by each replica (per GPU of its tensor-parallel group) (default: 1 if "
                     "torch sees a GPU here, else 0)")
    ray.add_argument("--max-ongoing-requests", metavar="N", type=int_in_range(1), default=128,
                     help="requests one replica takes at once; past it, its keys go to the next replicas of the "
                     "ring (default %(default)s)")
    ray.add_argument("--num-fallback-replicas", metavar="N", type=int_in_range(0), default=2,
                     help="replicas after a key's own that may take it when that one is full; 0: wait for it "
                     "(default %(default)s)")
    ray.add_argument("--prefix-chars", metavar="N", type=int_in_range(1), default=DEFAULT_PREFIX_CHARS,
                     help="characters of a request without images that route it (default %(default)s)")
    ray.add_argument("--ray-address", metavar="ADDRESS", default=None,
                     help="a running Ray cluster to deploy to (auto: the one this machine belongs to) (default: "
                     "start a local Ray cluster with this machine's CPUs and GPUs)")


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The serve flags that differ from their defaults (the API key always: a remote cluster lacks this
    environment), as engine options."""
    from .launch import add_serve_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_serve_arguments(parser)
    options: dict[str, Any] = {}
    for key, default in vars(parser.parse_args([])).items():
        value = getattr(args, key)
        if key not in _PROXY_FLAGS and value is not None and (value != default or key == "api_key"):
            options[key] = str(value) if isinstance(value, Path) else value
    if args.tensor_parallel_size != 1:  # serve-ray's flag, or serve's own once the engine has one
        options["tensor_parallel_size"] = args.tensor_parallel_size
    return options


def serve_ray(args: argparse.Namespace) -> int:
    try:
        import ray
        from ray import serve
    except ImportError as err:
        raise ValueError(f"serve-ray needs Ray Serve: pip install 'internvl-engine[ray]' ({err})") from None
    from .launch import bind_socket
    from .spawn import free_port

    gpus = args.num_gpus_per_replica
    if gpus is None:
        import torch

        gpus = 1.0 if torch.cuda.is_available() else 0.0
    app = build_ray_app(_engine_options(args), args.num_replicas, num_cpus=args.num_cpus_per_replica, num_gpus=gpus,
                        max_ongoing_requests=args.max_ongoing_requests,
                        num_fallback_replicas=args.num_fallback_replicas, prefix_chars=args.prefix_chars)
    port = args.port or free_port(args.host)
    bind_socket(args.host, port).close()  # a port in use fails now, in one line, not in Ray's proxy later
    address = args.ray_address or os.environ.get("RAY_ADDRESS")  # as ray.init reads it
    ray.init(address=address)
    try:
        serve.start(http_options={"host": args.host, "port": port})
        try:
            serve.run(app, name="internvl", route_prefix="/")
        except RuntimeError as err:  # "Deploying application internvl failed: ..."
            raise ValueError(f"{err} (the replicas' own errors are in the log above)") from None
        print(f"internvl-engine: serving on http://{args.host}:{port}/v1 with {args.num_replicas} engine replicas "
              "(Ray Serve application 'internvl'; Ctrl+C stops it)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if address is None:
            serve.shutdown()  # our own cluster: everything goes
        else:
            serve.delete("internvl")  # a shared cluster: only this application
        ray.shutdown()
    return 0
