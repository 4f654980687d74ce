"""Connection guards (internvl_engine.server.connections) against a real uvicorn server on 127.0.0.1.

Each server test runs uvicorn in a background thread with a tiny FastAPI app and talks raw HTTP/1.1 over
sockets, so idle, partial and dribbled requests can be produced exactly. Deadlines are sub-second; the
upper bounds on "closed within" are generous so a loaded machine does not make the tests flaky.
"""
from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import pytest
import uvicorn
from fastapi import FastAPI, Request
from uvicorn.protocols.http.h11_impl import H11Protocol

from internvl_engine.server.connections import (ConnectionLimits, GuardedH11Protocol, OneLineRateLimitedLogs,
                                                check_connection_cap, install_log_filters, raise_open_file_limit,
                                                uvicorn_settings)

resource = pytest.importorskip("resource")

SLACK_S = 2.5  # how much later than its deadline a close may be observed on a busy machine


# ---- a server in a thread, and a raw HTTP client -------------------------------------------------------------

def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    return app


@contextmanager
def serving(limits: ConnectionLimits) -> Iterator[tuple[int, uvicorn.Server]]:
    """(port, server) of a uvicorn server with `limits`, stopped and joined on exit."""
    config = uvicorn.Config(make_app(), host="127.0.0.1", port=0, lifespan="off", log_config=None,
                            log_level="warning", **uvicorn_settings(limits))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield server.servers[0].sockets[0].getsockname()[1], server
    finally:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive(), "uvicorn did not stop"


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def request_bytes(method: str = "GET", path: str = "/health", body: bytes = b"", close: bool = False) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: test\r\n"
    if body or method == "POST":
        head += f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return (head + "\r\n").encode() + body


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response (Content-Length framed): (status, lower-cased headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"connection closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in header_lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"connection closed after {len(body)} of {length} body bytes")
        body += chunk
    return int(status_line.split()[1]), headers, body[:length]


def wait_closed(sock: socket.socket, within_s: float) -> tuple[bytes, float]:
    """Read until the server closes the connection: (everything received, seconds waited)."""
    start = time.monotonic()
    sock.settimeout(within_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except socket.timeout:
        pytest.fail(f"the server did not close the connection within {within_s} s (got {data!r})")
    return data, time.monotonic() - start


def get_health(port: int) -> int:
    with connect(port) as sock:
        sock.sendall(request_bytes(close=True))
        status, _, body = read_response(sock)
        assert status != 200 or json.loads(body) == {"status": "ok"}
        return status


def wait_for(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def server_side(server: uvicorn.Server, sock: socket.socket) -> GuardedH11Protocol:
    """The server's protocol instance for our end `sock` of a connection."""
    ours = sock.getsockname()
    wait_for(lambda: any(p.client == ours for p in list(server.server_state.connections)))
    (protocol,) = [p for p in list(server.server_state.connections) if p.client == ours]
    assert isinstance(protocol, GuardedH11Protocol)
    return protocol


# ---- header and body timeouts (one shared server) ---------------------------------------------------------------

SHARED = ConnectionLimits(header_timeout_s=0.5, keep_alive_timeout_s=2, body_idle_timeout_s=0.5)


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[int, uvicorn.Server]]:
    """(port, server) with SHARED limits; tests close their sockets, the server outlives them."""
    with serving(SHARED) as port_and_server:
        yield port_and_server


def test_silent_connection_is_closed_after_the_header_timeout(shared):
    port, _ = shared
    with connect(port) as sock:
        data, waited = wait_closed(sock, 0.5 + SLACK_S)
    assert data == b"" and waited >= 0.45  # closed silently, not before its deadline
    assert get_health(port) == 200


def test_partial_head_is_closed_with_408(shared):
    port, _ = shared
    with connect(port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        data, waited = wait_closed(sock, 0.5 + SLACK_S)
    assert waited >= 0.45
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b"Connection: close\r\n" in data
    error = json.loads(data.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "request_timeout" and error["param"] is None


def test_dribbled_head_does_not_extend_the_deadline(shared):
    """Slowloris: a header line every 0.1 s never completes the head; the deadline still runs from open."""
    port, _ = shared
    with connect(port) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        sock.settimeout(0.1)
        closed = False
        while not closed and time.monotonic() - start < 0.5 + SLACK_S:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
                sock.recv(65536)  # returns only once the server closes: b"" or the 408
                closed = True
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        waited = time.monotonic() - start
    assert closed and 0.45 <= waited < 0.5 + SLACK_S


def test_slow_but_complete_head_is_answered():
    with serving(ConnectionLimits(header_timeout_s=1.0)) as (port, _):
        with connect(port) as sock:
            for piece in (b"GET /health HTTP/1.1\r\n", b"Host: x\r\n", b"Connection: close\r\n", b"\r\n"):
                sock.sendall(piece)
                time.sleep(0.1)
            status, _, body = read_response(sock)
    assert status == 200 and json.loads(body) == {"status": "ok"}


def test_keep_alive_idles_on_the_keep_alive_timeout_not_the_header_timeout(shared):
    port, server = shared
    with connect(port) as sock:
        sock.sendall(request_bytes())
        assert read_response(sock)[0] == 200
        protocol = server_side(server, sock)
        # Between requests only uvicorn's keep-alive timer runs (it closes the idle connection after 2 s).
        wait_for(lambda: protocol.timeout_keep_alive_task is not None)
        assert protocol._head_timer is None and protocol._body_timer is None
        time.sleep(0.8)  # idle longer than the header timeout, shorter than keep-alive
        sock.sendall(request_bytes())
        status, headers, _ = read_response(sock)
        assert status == 200 and headers.get("connection") != "close"


def test_partial_second_head_on_keep_alive_times_out(shared):
    port, _ = shared
    with connect(port) as sock:
        sock.sendall(request_bytes())
        assert read_response(sock)[0] == 200
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        data, waited = wait_closed(sock, 0.5 + SLACK_S)
    assert data.startswith(b"HTTP/1.1 408 ") and 0.45 <= waited < 1.5  # not the 2 s keep-alive timeout


def test_pipelined_partial_head_times_out(shared):
    """A partial second head buffered while the first request runs arms the timer at response completion."""
    port, _ = shared
    with connect(port) as sock:
        sock.sendall(request_bytes() + b"GET /health HTTP/1.1\r\nHost")
        assert read_response(sock)[0] == 200
        data, waited = wait_closed(sock, 0.5 + SLACK_S)
    assert data.startswith(b"HTTP/1.1 408 ") and waited < 1.5


def test_stalled_body_is_closed(shared):
    port, _ = shared
    with connect(port) as sock:
        sock.sendall(request_bytes("POST", "/echo", b"x" * 100)[:-90])  # head + 10 of 100 body bytes
        data, waited = wait_closed(sock, 0.5 + SLACK_S)
    assert data == b"" and waited >= 0.45


def test_body_stalled_after_100_continue_is_closed(shared):
    port, _ = shared
    with connect(port) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 ")  # sent once the app asks for the body
        data, waited = wait_closed(sock, 0.5 + SLACK_S)
    assert data == b"" and waited >= 0.45


def test_slow_but_steady_body_is_answered(shared):
    """The body deadline is an inactivity timeout: 5 chunks 0.2 s apart outlast it and still succeed."""
    port, _ = shared
    with connect(port) as sock:
        sock.sendall(request_bytes("POST", "/echo", b"x" * 100)[:-100])
        for _ in range(5):
            time.sleep(0.2)
            sock.sendall(b"x" * 20)
        status, _, body = read_response(sock)
    assert status == 200 and json.loads(body) == {"bytes": 100}


def test_timers_are_cancelled_when_the_client_goes_away(shared):
    port, server = shared
    for sent, timer in ((b"GET /health HTTP/1.1\r\n", "_head_timer"),
                        (request_bytes("POST", "/echo", b"x" * 10)[:-5], "_body_timer")):
        sock = connect(port)
        sock.sendall(sent)  # closed while its head, then its body, is incomplete
        protocol = server_side(server, sock)
        wait_for(lambda: getattr(protocol, timer) is not None)
        sock.close()
        wait_for(lambda: protocol not in server.server_state.connections)
        assert protocol._head_timer is None and protocol._body_timer is None

    # A reset after a response: uvicorn alone would leave its keep-alive timer armed (connection_lost(exc)).
    sock = connect(port)
    sock.sendall(request_bytes())
    assert read_response(sock)[0] == 200
    protocol = server_side(server, sock)
    wait_for(lambda: protocol.timeout_keep_alive_task is not None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST
    wait_for(lambda: protocol not in server.server_state.connections)
    assert protocol.timeout_keep_alive_task is None and protocol._head_timer is None


# ---- connection cap ------------------------------------------------------------------------------------------

def test_connection_cap_evicts_idle_connections_then_refuses_with_503():
    limits = ConnectionLimits(header_timeout_s=5.0, max_connections=5, body_idle_timeout_s=5.0)
    with serving(limits) as (port, server):
        idle = [connect(port) for _ in range(5)]  # at the cap, every one silent
        busy = []
        try:
            time.sleep(0.1)
            assert get_health(port) == 200  # a new client evicts the oldest idle connection, not itself
            assert wait_closed(idle[0], SLACK_S)[0] == b""
            for _ in range(5):  # requests in flight: a head and part of a body each
                sock = connect(port)
                sock.sendall(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\nabc")
                busy.append(sock)
            for sock in idle[1:]:  # ...each evicting an idle one
                assert wait_closed(sock, SLACK_S)[0] == b""
            start = time.monotonic()
            with connect(port) as extra:  # every connection has a request in flight: refused
                status, headers, body = read_response(extra)
                refused_after = time.monotonic() - start
                assert wait_closed(extra, SLACK_S)[0] == b""
            assert status == 503 and refused_after < 0.5  # immediately, not at a deadline
            assert headers["connection"] == "close" and headers["retry-after"] == "1"
            assert headers["content-type"] == "application/json"
            assert json.loads(body) == {"error": {"message": "too many open connections (limit 5), retry later",
                                                  "type": "service_unavailable", "param": None,
                                                  "code": "too_many_connections"}}
            assert len(server.server_state.connections) <= 5
            busy[0].sendall(b"defghij")  # a request in flight is never evicted: it completes
            assert read_response(busy[0])[0] == 200
        finally:
            for sock in idle + busy:
                sock.close()
        time.sleep(0.2)
        assert get_health(port) == 200  # the server takes connections again


# ---- settings and limits -------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("header_timeout_s", 0), ("header_timeout_s", -1.0), ("header_timeout_s", float("inf")),
    ("max_connections", 0), ("max_connections", 2.5), ("keep_alive_timeout_s", 0),
    ("keep_alive_timeout_s", True), ("body_idle_timeout_s", -0.1),
])
def test_limits_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        ConnectionLimits(**{field: value})


def test_uvicorn_settings_bind_the_limits():
    small, large = ConnectionLimits(max_connections=3), ConnectionLimits(max_connections=300)
    settings = uvicorn_settings(small)
    assert set(settings) == {"http", "loop", "timeout_keep_alive"} and settings["timeout_keep_alive"] == 30
    assert settings["loop"] == "asyncio"  # not uvloop (installed with ray[serve]), whose transports close differently
    assert issubclass(settings["http"], H11Protocol) and settings["http"].limits is small
    assert uvicorn_settings(large)["http"].limits is large and settings["http"].limits is small
    assert GuardedH11Protocol.limits == ConnectionLimits()


def test_raise_open_file_limit_stays_under_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        pytest.skip("unlimited open files")
    try:
        assert raise_open_file_limit(1) == soft  # never lowers
        lowered = min(soft, 256)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
        want = 1024 if hard == resource.RLIM_INFINITY else min(1024, hard)
        assert raise_open_file_limit(want) == max(lowered, want)
        over = raise_open_file_limit(10**9)
        assert hard == resource.RLIM_INFINITY or over == hard  # toward the hard limit, never above it
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[1] == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with pytest.raises(ValueError):
        raise_open_file_limit(0)


def test_check_connection_cap(caplog):
    limits = ConnectionLimits(max_connections=1024)
    with caplog.at_level(logging.WARNING, logger="internvl_engine.server.connections"):
        lowered = check_connection_cap(limits, open_file_limit=256, reserve=64)
    assert lowered.max_connections == 192 and lowered.header_timeout_s == limits.header_timeout_s
    assert "lowered from 1024 to 192" in caplog.text and "open file limit is 256" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="internvl_engine.server.connections"):
        assert check_connection_cap(limits, open_file_limit=20000) is limits
        assert check_connection_cap(limits, open_file_limit=resource.RLIM_INFINITY) is limits
    assert caplog.text == ""
    with pytest.raises(ValueError, match="open file limit"):
        check_connection_cap(limits, open_file_limit=64, reserve=64)


# ---- log filter ------------------------------------------------------------------------------------------------

class ListHandler(logging.Handler):
    """Keeps each record and its formatted text (default formatter: message, then any traceback)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))


@contextmanager
def filtered_logger(name: str, log_filter: logging.Filter) -> Iterator[tuple[logging.Logger, ListHandler]]:
    log = logging.getLogger(name)
    handler = ListHandler()
    log.addFilter(log_filter)
    log.addHandler(handler)
    try:
        yield log, handler
    finally:
        log.removeHandler(handler)
        log.removeFilter(log_filter)


def raise_and_log(log: logging.Logger, exc: BaseException, msg: str, *args: object) -> None:
    try:
        raise exc
    except BaseException:
        log.error(msg, *args, exc_info=True)


def test_repeated_error_with_traceback_becomes_one_line():
    with filtered_logger("test_connections.repeat", OneLineRateLimitedLogs(10.0)) as (log, handler):
        for i in range(1000):
            raise_and_log(log, ValueError(f"boom {i}\nsecond line"), "request %d failed", i)
    assert 1 <= len(handler.lines) <= 2
    for line in handler.lines:
        assert "\n" not in line and "Traceback" not in line
    assert handler.lines[0] == "request 0 failed | ValueError: boom 0 | second line"


def test_different_messages_are_not_merged():
    with filtered_logger("test_connections.distinct", OneLineRateLimitedLogs(10.0)) as (log, handler):
        for _ in range(3):
            log.error("disk full")
            log.error("network down\nretrying")
            raise_and_log(log, ValueError("x"), "disk full")
            raise_and_log(log, KeyError("x"), "disk full")
    assert handler.lines == ["disk full", "network down | retrying", "disk full | ValueError: x",
                             "disk full | KeyError: 'x'"]


def test_suppressed_count_is_reported_once_the_interval_passes():
    now = [100.0]
    with filtered_logger("test_connections.count", OneLineRateLimitedLogs(10.0, clock=lambda: now[0])) \
            as (log, handler):
        for _ in range(5):
            log.warning("slow client %s", "1.2.3.4")
        now[0] += 9.9
        log.warning("slow client %s", "5.6.7.8")  # still inside the interval: suppressed
        now[0] += 0.2
        log.warning("slow client %s", "9.9.9.9")
        log.warning("slow client %s", "9.9.9.9")
    assert handler.lines == ["slow client 1.2.3.4", "slow client 9.9.9.9 [5 similar suppressed in the last 10 s]"]


def test_filter_is_thread_safe():
    now = [0.0]
    with filtered_logger("test_connections.threads", OneLineRateLimitedLogs(10.0, clock=lambda: now[0])) \
            as (log, handler):
        threads = [threading.Thread(target=lambda: [log.error("same") for _ in range(250)]) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        now[0] = 60.0
        log.error("same")
    assert handler.lines == ["same", "same [1999 similar suppressed in the last 60 s]"]


def test_records_below_min_level_pass_untouched():
    with filtered_logger("test_connections.info", OneLineRateLimitedLogs(10.0)) as (log, handler):
        log.setLevel(logging.INFO)
        try:
            for _ in range(3):
                log.info("started\non port %d", 80, extra={"color_message": "started %d"})
        finally:
            log.setLevel(logging.NOTSET)
    assert handler.lines == ["started\non port 80"] * 3
    assert handler.records[0].color_message == "started %d"


def test_object_addresses_do_not_split_keys():
    with filtered_logger("test_connections.address", OneLineRateLimitedLogs(10.0)) as (log, handler):
        for i in range(100):
            log.error(f"Exception in callback <Handle at {hex(0x7f0000 + 16 * i)}>\nhandle: <Handle {i}>")
    assert handler.lines == ["Exception in callback <Handle at 0x7f0000> | handle: <Handle 0>"]


def test_key_table_is_bounded():
    log_filter = OneLineRateLimitedLogs(10.0, max_keys=2)
    with filtered_logger("test_connections.keys", log_filter) as (log, handler):
        for msg in ("a", "b", "c", "a", "c"):
            log.error(msg)
    assert handler.lines == ["a", "b", "c", "a"]  # "a" was forgotten when "c" came; "c" was still known
    assert len(log_filter._seen) == 2


def test_failed_accept_through_asyncio_is_one_line():
    """asyncio's accept() EMFILE path (call_exception_handler -> logger "asyncio") with installed filters."""
    remove = install_log_filters(interval_s=60.0)
    handler = ListHandler()
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addHandler(handler)
    loop = asyncio.new_event_loop()
    listener = socket.socket()
    try:
        assert any(isinstance(f, OneLineRateLimitedLogs) for f in logging.getLogger("uvicorn.error").filters)
        for _ in range(1000):
            try:
                raise OSError(errno.EMFILE, "Too many open files")
            except OSError as err:
                loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                             "exception": err, "socket": listener})
    finally:
        listener.close()
        loop.close()
        asyncio_logger.removeHandler(handler)
        remove()
    assert not any(isinstance(f, OneLineRateLimitedLogs) for f in asyncio_logger.filters)
    assert not any(isinstance(f, OneLineRateLimitedLogs) for f in logging.getLogger("uvicorn.error").filters)
    assert len(handler.lines) == 1
    line = handler.lines[0]
    assert line.startswith("socket.accept() out of system resource | socket: <socket.socket")
    assert line.endswith("| OSError: [Errno 24] Too many open files") and "Traceback" not in line


EMFILE_SERVER = """
import resource, sys, threading, time
import uvicorn
from fastapi import FastAPI
from internvl_engine.server.connections import ConnectionLimits, install_log_filters, uvicorn_settings

app = FastAPI()

@app.get("/health")
async def health():
    return {"status": "ok"}

install_log_filters()
server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning",
                                      **uvicorn_settings(ConnectionLimits(header_timeout_s=0.5))))

def report_port():
    while not server.started:
        time.sleep(0.01)
    print(server.servers[0].sockets[0].getsockname()[1], flush=True)

resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
threading.Thread(target=report_port, daemon=True).start()
server.run()
"""


def test_out_of_file_descriptors_end_to_end():
    """A server limited to 40 descriptors, 48 idle connections: accept() fails with EMFILE, which is logged as
    one line (no traceback); the idle connections time out and /health is answered again."""
    child = subprocess.Popen([sys.executable, "-c", EMFILE_SERVER, "40"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    idle: list[socket.socket] = []
    try:
        port = int(child.stdout.readline())
        idle = [connect(port) for _ in range(48)]
        with connect(port) as sock:
            sock.settimeout(10)
            sock.sendall(request_bytes(close=True))
            assert read_response(sock)[0] == 200
    finally:
        for sock in idle:
            sock.close()
        child.terminate()
        _, stderr = child.communicate(timeout=10)
    assert "Traceback" not in stderr, stderr
    failed_accepts = [line for line in stderr.splitlines() if "socket.accept() out of system resource" in line]
    assert len(failed_accepts) == 1, stderr
    assert "OSError: [Errno 24] Too many open files" in failed_accepts[0]
