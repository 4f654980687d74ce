"""remote_fetch: address policy (no connection to internal hosts), no redirects, size cap, total deadline,
and one uniform message for every network-level failure. All traffic stays on 127.0.0.1."""
from __future__ import annotations

import http.server
import ipaddress
import socket
import struct
import threading
import time
import zlib

import pytest

from internvl_engine.server.remote_fetch import (FORBIDDEN_ADDRESS_MESSAGE, RemoteFetchError, RemoteFetchPolicy,
                                                 address_is_forbidden, fetch_url)

UNIFORM = "could not fetch the image URL (host '127.0.0.1')"


def _tiny_png() -> bytes:
    """A valid 1x1 RGB PNG, built from its chunks."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
            + chunk(b"IEND", b""))


PNG = _tiny_png()


class _Handler(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]] = []  # (path, Host header) of every request that reached the server

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _write_slowly(self, pieces: list[bytes], pause: float) -> None:
        try:
            for piece in pieces:
                self.wfile.write(piece)
                self.wfile.flush()
                time.sleep(pause)
        except OSError:  # the client gave up
            pass

    def do_GET(self) -> None:
        _Handler.seen.append((self.path, self.headers.get("Host")))
        if self.path == "/img.png":
            self._send(200, PNG, {"Content-Type": "image/png"})
        elif self.path == "/redirect":
            self._send(302, headers={"Location": "/img.png"})
        elif self.path == "/redirect-ftp":
            self._send(302, headers={"Location": "ftp://127.0.0.1/img.png"})
        elif self.path == "/missing":
            self._send(404, b"not here")
        elif self.path == "/error":
            self._send(500, b"boom")
        elif self.path == "/huge":  # declares its size up front
            self.send_response(200)
            self.send_header("Content-Length", str(50_000_000))
            self.end_headers()
            self._write_slowly([b"x" * 65536] * 800, 0)
        elif self.path == "/stream":  # no Content-Length: body runs until the connection closes (HTTP/1.0)
            self.send_response(200)
            self.end_headers()
            self._write_slowly([b"x" * 65536] * 800, 0)
        elif self.path == "/truncated":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"only ten b")
        elif self.path == "/drip":  # every byte well inside any per-read timeout, the whole far past the deadline
            self.send_response(200)
            self.send_header("Content-Length", "60")
            self.end_headers()
            self._write_slowly([b"x"] * 60, 0.05)
        elif self.path == "/drip-headers":  # the same, while still in the status line and headers
            self._write_slowly([bytes([b]) for b in b"HTTP/1.0 200 OK\r\nX-Padding: " + b"p" * 60], 0.05)
        else:
            self._send(404)


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def base(server):
    _Handler.seen.clear()
    return server


OPEN = RemoteFetchPolicy(max_bytes=100_000, timeout_s=2.0, allow_private_addresses=True)
DEFAULT = RemoteFetchPolicy(max_bytes=100_000, timeout_s=2.0)


def _refused(url: str, policy: RemoteFetchPolicy = OPEN) -> RemoteFetchError:
    with pytest.raises(RemoteFetchError) as info:
        fetch_url(url, policy)
    return info.value


@pytest.fixture
def no_connect(monkeypatch):
    def forbidden(*args, **kwargs):
        pytest.fail(f"a connection was attempted: {args}")
    monkeypatch.setattr(socket, "create_connection", forbidden)


# --- allowed fetches (allow_private_addresses=True, since the test server is on loopback) ---

def test_fetch_returns_exact_bytes(base):
    assert fetch_url(f"{base}/img.png", OPEN) == PNG
    assert _Handler.seen == [("/img.png", base.removeprefix("http://"))]


def test_body_of_exactly_max_bytes_is_accepted_one_more_is_413(base):
    assert fetch_url(f"{base}/img.png", RemoteFetchPolicy(len(PNG), allow_private_addresses=True)) == PNG
    err = _refused(f"{base}/img.png", RemoteFetchPolicy(len(PNG) - 1, allow_private_addresses=True))
    assert err.status == 413 and err.message == f"the image is over {len(PNG) - 1} bytes (the server's limit)"


def test_connects_to_the_resolved_address_with_the_original_host_header(base, monkeypatch):
    port = int(base.rsplit(":", 1)[1])
    real = socket.getaddrinfo
    names: list[str] = []

    def fake(host, *args, **kwargs):
        names.append(host)
        return real("127.0.0.1" if host == "images.example" else host, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    assert fetch_url(f"http://images.example:{port}/img.png", OPEN) == PNG
    assert names.count("images.example") == 1  # resolved once; the connection used the vetted address
    assert _Handler.seen == [("/img.png", f"images.example:{port}")]


@pytest.mark.parametrize("path", ["/redirect", "/redirect-ftp"])
def test_redirects_are_not_followed(base, path):
    err = _refused(f"{base}{path}")
    assert err.status == 400 and err.message == "redirects are not followed"
    assert [p for p, _ in _Handler.seen] == [path]


def test_declared_oversize_body_is_413_without_reading_it(base):
    start = time.monotonic()
    err = _refused(f"{base}/huge")
    assert err.status == 413 and "100000 bytes" in err.message
    assert time.monotonic() - start < 1.0


def test_streamed_oversize_body_is_413(base):
    err = _refused(f"{base}/stream")
    assert err.status == 413 and "100000 bytes" in err.message


@pytest.mark.parametrize("path", ["/drip", "/drip-headers"])
def test_total_deadline_not_per_read(base, path):
    policy = RemoteFetchPolicy(max_bytes=100_000, timeout_s=0.5, allow_private_addresses=True)
    start = time.monotonic()
    err = _refused(f"{base}{path}", policy)
    elapsed = time.monotonic() - start
    assert err.status == 400 and err.message == UNIFORM
    assert 0.4 <= elapsed < 0.5 + 0.5


# --- the address policy: refused before any connection ---

@pytest.mark.parametrize("url", [
    "http://127.0.0.1:{port}/img.png", "http://localhost:{port}/img.png", "http://127.1:{port}/img.png",
    "http://2130706433:{port}/img.png", "http://0x7f000001:{port}/img.png", "http://0177.0.0.1:{port}/img.png",
    "http://[::1]:{port}/img.png", "http://[::ffff:127.0.0.1]:{port}/img.png", "http://0.0.0.0:{port}/img.png",
    "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", "http://192.168.1.1/", "http://172.16.0.1/",
    "http://224.0.0.1/", "http://100.64.0.1/", "http://[fe80::1]/", "http://[2002:7f00:1::]/",
    "https://127.0.0.1:{port}/img.png",
])
def test_internal_addresses_refused_without_connecting(base, no_connect, url):
    port = base.rsplit(":", 1)[1]
    err = _refused(url.format(port=port), DEFAULT)
    assert err.status == 400 and err.message == FORBIDDEN_ADDRESS_MESSAGE
    assert _Handler.seen == []


def test_name_with_any_internal_address_is_refused(no_connect, monkeypatch):
    """A name resolving to a public AND a private address is refused (the private one could be the one used)."""
    def fake(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ("93.184.216.34", "10.1.2.3")]
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    assert _refused("http://images.example/a.png", DEFAULT).message == FORBIDDEN_ADDRESS_MESSAGE


@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.1.1.1", "172.31.255.255", "192.168.0.1", "169.254.169.254", "0.1.2.3", "100.100.100.100",
    "224.0.0.251", "240.0.0.1", "255.255.255.255", "::", "::1", "fe80::1", "fc00::1", "fec0::1", "ff02::1",
    "::ffff:10.0.0.1", "::7f00:1", "2002:a00:1::", "64:ff9b::a9fe:a9fe", "2001:0:4136:e378:8000:63bf:3fff:fdd2",
])
def test_address_is_forbidden(address):
    assert address_is_forbidden(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "2002:808:808::"])
def test_global_addresses_are_allowed(address):
    assert not address_is_forbidden(ipaddress.ip_address(address))


# --- URL syntax policy ---

@pytest.mark.parametrize(("url", "scheme"), [
    ("ftp://127.0.0.1/img.png", "ftp"), ("file:///etc/passwd", "file"), ("gopher://127.0.0.1:70/_x", "gopher"),
    ("data:image/png;base64,iVBORw0KGgo=", "data"), ("FTP://example.com/a", "ftp"), ("//example.com/a", ""),
])
def test_other_schemes_refused(no_connect, url, scheme):
    assert _refused(url, DEFAULT).message == f"scheme {scheme!r} is not allowed (http and https only)"


@pytest.mark.parametrize("url", ["http://user:pass@127.0.0.1/", "http://user@example.com/",
                                 "http://example.com\\@127.0.0.1/"])
def test_credentials_refused(no_connect, url):
    assert _refused(url, OPEN).message == "credentials in URLs are not allowed"


def test_long_url_refused(no_connect):
    err = _refused("http://example.com/" + "a" * 2048, DEFAULT)
    assert err.status == 400 and err.message == "URL too long (over 2048 characters)"


@pytest.mark.parametrize(("url", "message"), [
    ("http:///img.png", "the URL has no host"),
    ("http://127.0.0.1:99999/", "the URL's port is not valid"),
    ("http://127.0.0.1:0/", "the URL's port is not valid"),
    ("http://127.0.0.1:http/", "the URL's port is not valid"),
    ("http://127.0.0.1\n.example.com/", "the URL contains whitespace or control characters"),
    ("http://[::1/", "the URL is malformed"),
])
def test_malformed_urls_refused(no_connect, url, message):
    assert _refused(url, OPEN).message == message


# --- uniformity: nothing in the message tells one network failure from another ---

def _closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def _one_shot_server(reply: bytes) -> int:
    """A port whose server reads what arrives, answers `reply` (maybe nothing) and hangs up, once."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            conn.settimeout(2)
            try:
                conn.recv(4096)
                conn.sendall(reply)
            except OSError:
                pass
    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


def test_network_failures_share_one_message(base, monkeypatch):
    quick = RemoteFetchPolicy(max_bytes=100_000, timeout_s=0.5, allow_private_addresses=True)
    not_http, bad_request = _one_shot_server(b"SSH-2.0-x\r\n"), _one_shot_server(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    messages = {
        "closed port": _refused(f"http://127.0.0.1:{_closed_port()}/img.png", quick).message,
        "404": _refused(f"{base}/missing", quick).message,
        "500": _refused(f"{base}/error", quick).message,
        "truncated body": _refused(f"{base}/truncated", quick).message,
        "timeout": _refused(f"{base}/drip", quick).message,
        "reset / empty reply": _refused(f"http://127.0.0.1:{_one_shot_server(b'')}/img.png", quick).message,
        "not HTTP": _refused(f"http://127.0.0.1:{not_http}/", quick).message,
        "TLS to plain HTTP": _refused(f"https://127.0.0.1:{bad_request}/img.png", quick).message,
    }
    real = socket.getaddrinfo

    def no_dns(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    messages["DNS failure"] = _refused(f"{base}/img.png", quick).message
    monkeypatch.setattr(socket, "getaddrinfo", real)
    assert messages == {name: UNIFORM for name in messages}
