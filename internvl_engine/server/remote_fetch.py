"""Fetching a client-supplied http(s) image URL without turning the server into a proxy into its own network.

A server that fetches URLs on a client's behalf can be aimed at hosts only it can reach (cloud metadata at
169.254.169.254, admin ports on 127.0.0.1, the internal network), and its error messages can be used as a port
scanner. `fetch_url` therefore:

* accepts only http/https URLs with a host, no credentials, a valid port and a bounded length;
* resolves the host once and refuses it if ANY address is not global unicast (loopback, private, link-local,
  multicast, reserved, unspecified, carrier-grade NAT, 0.0.0.0/8, and IPv6 forms embedding such an IPv4 address),
  unless the policy deliberately allows private addresses;
* connects to the vetted address itself (no second lookup, so no DNS-rebinding window), sending the original
  Host header and, for https, checking the certificate against the original name;
* sends one GET, follows no redirect, enforces one deadline over connect + headers + body, and stops reading as
  soon as the body passes `max_bytes`;
* reports every network-level failure (refused, timeout, DNS, TLS, reset, non-200 status) with one message.
"""
from __future__ import annotations

import http.client
import io
import ipaddress
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass

_CHUNK = 64 * 1024
_BLOCKED_V4 = (ipaddress.ip_network("0.0.0.0/8"), ipaddress.ip_network("100.64.0.0/10"))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
FORBIDDEN_ADDRESS_MESSAGE = ("the URL's host resolves to a private/loopback/link-local/multicast/reserved address, "
                             "which this server does not fetch")


class RemoteFetchError(Exception):
    """A refused or failed fetch. `status` is the HTTP status to answer with (400, or 413 for too large)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class RemoteFetchPolicy:
    """Limits for `fetch_url`. `timeout_s` is the total deadline (connect + headers + body), not per read."""

    max_bytes: int
    timeout_s: float = 10.0
    allow_private_addresses: bool = False  # only for deployments that fetch from their own network, and tests
    max_url_length: int = 2048
    user_agent: str = "internvl-engine"


def _unreachable(host: str) -> RemoteFetchError:
    """The one message for every network-level failure: it must not tell a closed port from a filtered one."""
    return RemoteFetchError(f"could not fetch the image URL (host {host!r})")


def address_is_forbidden(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True unless `ip` is global unicast, looking through IPv6 forms that carry an IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
        if int(ip) >> 32 == 0 or ip in _NAT64:  # IPv4-compatible (::a.b.c.d) and NAT64 (64:ff9b::a.b.c.d)
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if any(v4 is not None and address_is_forbidden(v4) for v4 in embedded):
            return True
    elif any(ip in net for net in _BLOCKED_V4):
        return True
    return (not ip.is_global or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
            or ip.is_reserved or ip.is_unspecified or (ip.version == 6 and ip.is_site_local))


def _parse(url: str, policy: RemoteFetchPolicy) -> tuple[str, str, int, str]:
    """(scheme, host, port, request target) of an acceptable URL; RemoteFetchError otherwise."""
    if len(url) > policy.max_url_length:
        raise RemoteFetchError(f"URL too long (over {policy.max_url_length} characters)")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        raise RemoteFetchError("the URL is malformed") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise RemoteFetchError(f"scheme {scheme!r} is not allowed (http and https only)")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise RemoteFetchError("the URL contains whitespace or control characters")
    if "@" in parts.netloc:
        raise RemoteFetchError("credentials in URLs are not allowed")
    if not parts.hostname:
        raise RemoteFetchError("the URL has no host")
    try:
        port = parts.port if parts.port is not None else (443 if scheme == "https" else 80)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise RemoteFetchError("the URL's port is not valid")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, parts.hostname, port, target


def _resolve(host: str, port: int, policy: RemoteFetchPolicy) -> list[str]:
    """The host's addresses, resolved once, every one vetted (numeric forms like 127.1 or 0x7f000001 included)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, ValueError):  # gaierror, and UnicodeError from IDNA encoding
        raise _unreachable(host) from None
    addresses: list[str] = []
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0].split("%")[0])
        if not policy.allow_private_addresses and address_is_forbidden(ip):
            raise RemoteFetchError(FORBIDDEN_ADDRESS_MESSAGE)
        if sockaddr[0] not in addresses:
            addresses.append(sockaddr[0])
    if not addresses:
        raise _unreachable(host)
    return addresses


class _DeadlineSocket:
    """The socket http.client sees: every operation gets only the time left before the deadline.

    Like a real socket, it closes only once the connection and every file made from it have let go of it
    (http.client closes the connection as soon as the headers say `Connection: close`, before the body is read).
    """

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock, self._deadline, self._users = sock, deadline, 1

    def arm(self) -> socket.socket:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        self._sock.settimeout(left)
        return self._sock

    def sendall(self, data: bytes) -> None:
        self.arm().sendall(data)

    def makefile(self, mode: str = "rb") -> io.BufferedReader:
        self._users += 1
        return io.BufferedReader(_DeadlineReader(self))

    def close(self) -> None:
        self._users -= 1
        if self._users == 0:
            self._sock.close()


class _DeadlineReader(io.RawIOBase):
    """The raw file under http.client's response: one receive per call, bounded by the deadline."""

    def __init__(self, owner: _DeadlineSocket) -> None:
        super().__init__()
        self._owner = owner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        return self._owner.arm().recv_into(buffer)

    def close(self) -> None:
        if not self.closed:
            self._owner.close()
        super().close()


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to already-vetted addresses: the Host header and TLS checks use the original name."""

    def __init__(self, scheme: str, host: str, port: int, addresses: list[str], deadline: float) -> None:
        super().__init__(host, port)
        self.default_port = 443 if scheme == "https" else 80  # Host header omits the scheme's default port
        self._tls, self._addresses, self._deadline = scheme == "https", addresses, deadline

    def connect(self) -> None:
        sock: socket.socket | None = None
        error: OSError = TimeoutError("deadline passed")
        for address in self._addresses:  # in resolver order, like socket.create_connection itself
            left = self._deadline - time.monotonic()
            if left <= 0:
                break
            try:
                sock = socket.create_connection((address, self.port), timeout=left)
                break
            except OSError as err:
                error = err
        if sock is None:
            raise error
        if self._tls:
            try:
                sock.settimeout(max(self._deadline - time.monotonic(), 1e-3))
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise
        self.sock = _DeadlineSocket(sock, self._deadline)


def fetch_url(url: str, policy: RemoteFetchPolicy) -> bytes:
    """The body of one GET of `url` (status 200 only), under `policy`. Raises RemoteFetchError otherwise."""
    scheme, host, port, target = _parse(url, policy)
    deadline = time.monotonic() + policy.timeout_s
    addresses = _resolve(host, port, policy)
    too_large = RemoteFetchError(f"the image is over {policy.max_bytes} bytes (the server's limit)", status=413)
    conn = _PinnedConnection(scheme, host, port, addresses, deadline)
    response: http.client.HTTPResponse | None = None
    try:
        conn.request("GET", target, headers={"User-Agent": policy.user_agent, "Accept": "image/*",
                                             "Connection": "close"})
        response = conn.getresponse()
        if 300 <= response.status < 400:
            raise RemoteFetchError("redirects are not followed")
        if response.status != 200:
            raise _unreachable(host)
        declared = response.length  # Content-Length, None when absent or chunked
        if declared is not None and declared > policy.max_bytes:
            raise too_large
        body = bytearray()
        while chunk := response.read1(_CHUNK):
            body += chunk
            if len(body) > policy.max_bytes:
                raise too_large
        if declared is not None and len(body) != declared:  # connection closed early
            raise _unreachable(host)
        return bytes(body)
    except (OSError, http.client.HTTPException, ValueError):
        raise _unreachable(host) from None
    finally:
        if response is not None:
            response.close()
        conn.close()
