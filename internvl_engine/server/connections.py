"""Connection guards for uvicorn's h11 server: request timeouts, a connection cap, fd limits, one-line logs.

uvicorn (0.54) never closes a connection that sends nothing: `H11Protocol.connection_made` starts no timer, and
its keep-alive timer only starts after a response. Idle or slow-header (slowloris) connections therefore pile
up until the process runs out of file descriptors, after which asyncio logs a full traceback for every failed
`accept()`. This module adds:

* `ConnectionLimits` and `GuardedH11Protocol` (bound to limits by `protocol_class`, handed to uvicorn as
  `http=` by `uvicorn_settings`): a request head must be complete within `header_timeout_s`, a request body
  may not stall for more than `body_idle_timeout_s`, and at most `max_connections` connections are open at
  once (the next one gets a canned 503 and is closed without reaching the app);
* `raise_open_file_limit` and `check_connection_cap`: make RLIMIT_NOFILE room for that many connections;
* `OneLineRateLimitedLogs` and `install_log_filters`: warnings and errors of the server's error loggers reduced
  to one line each, identical ones at most once per interval.

Typical use:

    limits = check_connection_cap(ConnectionLimits(), raise_open_file_limit(4096))
    remove_filters = install_log_filters()
    uvicorn.run(app, host=host, port=port, **uvicorn_settings(limits))
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from .errors import error_body

try:
    import resource
except ImportError:  # not POSIX: raise_open_file_limit reports it
    resource = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

# Loggers whose records `install_log_filters` reduces by default: asyncio's (failed accept(), unretrieved task
# exceptions) and uvicorn's error logger. uvicorn.access is left alone: one line per request already.
ERROR_LOGGERS = ("asyncio", "uvicorn.error")

_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")  # object addresses in reprs (asyncio's "Exception in callback <...>")


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-connection deadlines and the cap on open connections of one server process."""

    # Seconds from connection open until a complete request head (request line + headers) must have arrived.
    # On a keep-alive connection, idling between requests is bounded by keep_alive_timeout_s instead, and this
    # deadline starts at the first byte of the next request head.
    header_timeout_s: float = 10.0
    # Open connections at once (accepted sockets, i.e. file descriptors); one more is answered 503 and closed.
    max_connections: int = 1024
    # Seconds a keep-alive connection may idle after a response before the server closes it (uvicorn's
    # timeout_keep_alive).
    keep_alive_timeout_s: int = 30
    # Seconds a request body may go without a new byte while the server is ready to read it (time spent with
    # reading paused by flow control, or waiting for the app to ask for the body after `Expect: 100-continue`,
    # does not count). On expiry the connection is closed; the app sees a client disconnect.
    body_idle_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_idle_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        for name in ("max_connections", "keep_alive_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _canned_response(status: int, reason: str, message: str, code: str, retry_after_s: int | None = None) -> bytes:
    """A complete `Connection: close` HTTP/1.1 response with an OpenAI-style JSON error body, as raw bytes."""
    body = json.dumps(error_body(status, message, code=code)).encode()
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json", f"Content-Length: {len(body)}",
            "Connection: close"]
    if retry_after_s is not None:
        head.append(f"Retry-After: {retry_after_s}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus header/body deadlines and a cap on open connections.

    Timers (at most one of the two runs at a time, both are cancelled in `connection_lost`):
    * head timer: armed in `connection_made`; on a keep-alive connection, re-armed when bytes of the next
      request head are buffered (after `data_received`, or at response completion for pipelined bytes).
      It is never re-armed by more bytes of the same head, so dribbling a head does not extend it. Cancelled
      as soon as h11 has parsed a complete head. On expiry: if any bytes of a head had arrived, a canned 408
      is written; then the transport is closed (a connection that sent nothing is closed silently, like
      uvicorn's own keep-alive expiry).
    * body timer: runs while the request body is incomplete, restarted by every received chunk. On expiry
      (outside paused reading / a pending 100-continue) the transport is closed without a response, since
      the app may be writing one concurrently.
    Between requests on a keep-alive connection neither runs: uvicorn's keep-alive timer covers the idle time.

    Connection cap: a connection that would make `len(server_state.connections)` exceed `max_connections`
    first evicts the oldest connection that has no request in flight (waiting for a head: silent, dribbling, or
    idle between keep-alive requests), so idle sockets can never lock out real clients; only when every open
    connection has a request in flight does the new one get a canned 503 (`Retry-After: 1`) written straight to
    the socket and is closed; it never reaches h11 or the app and is not counted as open. The request is not read, so closing may send a TCP reset to a client
    that already sent one; on Linux the 503 queued before it stays readable (checked on loopback).
    """

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()  # protocol_class() binds other limits

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._rejected = False
        self._opened_at = 0.0

    # asyncio.Protocol interface

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # adds self to server_state.connections
        self._opened_at = self.loop.time()
        if len(self.connections) > self.limits.max_connections and not self._evict_idle():
            self._reject()
            return
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._on_head_timeout)

    def data_received(self, data: bytes) -> None:
        if self._rejected:  # the transport is closing; never feed a refused connection to h11
            return
        self._cancel_body_timer()  # progress: handle_events re-arms it while the body is incomplete
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        # uvicorn cancels its keep-alive timer only when exc is None; a reset connection would keep it armed.
        self._unset_keepalive_if_required()
        super().connection_lost(exc)

    # H11Protocol hooks

    def handle_events(self) -> None:
        super().handle_events()
        self._update_timers()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # arms uvicorn's keep-alive timer, runs pipelined requests
        self._update_timers()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._cancel_timers()  # the transport is handed to another protocol; connection_lost won't reach us
        super().handle_websocket_upgrade(event)

    # Internals

    def _peer(self) -> str:
        return "%s:%d" % self.client if self.client else "unknown client"

    def _idle(self) -> bool:
        """No request in flight: waiting for a request head (or its end), and not already closing."""
        return (not self._rejected and self.transport is not None and not self.transport.is_closing()
                and self.cycle is None and self.conn.their_state is h11.IDLE)

    def _evict_idle(self) -> bool:
        """Close the oldest open connection without a request in flight, to make room; False if there is none."""
        idle = [other for other in self.connections
                if other is not self and isinstance(other, GuardedH11Protocol) and other._idle()]
        if not idle:
            return False
        victim = min(idle, key=lambda other: other._opened_at)
        victim._cancel_timers()
        victim.connections.discard(victim)
        victim.logger.debug("Connection cap reached; closed the idle connection from %s", victim._peer())
        victim.transport.close()
        return True

    def _reject(self) -> None:
        self._rejected = True
        self.connections.discard(self)  # gone as soon as the 503 is flushed; uvicorn's shutdown needn't wait
        self.logger.warning("Too many open connections (limit %d); refused a connection from %s with 503",
                            self.limits.max_connections, self._peer())
        message = f"too many open connections (limit {self.limits.max_connections}), retry later"
        self.transport.write(_canned_response(503, "Service Unavailable", message, "too_many_connections",
                                              retry_after_s=1))
        self.transport.close()

    def _update_timers(self) -> None:
        """Arm or cancel the head/body timers for the h11 state reached after parsing or a response."""
        if self._rejected or self.transport is None or self.transport.is_closing():
            self._cancel_timers()
            return
        state = self.conn.their_state
        if state is h11.IDLE:  # waiting for a request head
            self._cancel_body_timer()
            if self._head_timer is None and self.conn.trailing_data[0]:  # part of the next head is buffered
                self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._on_head_timeout)
        elif state is h11.SEND_BODY:
            self._cancel_head_timer()
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.limits.body_idle_timeout_s, self._on_body_timeout)
        else:  # head and body complete (app running / responding), switched protocol, closed or error
            self._cancel_timers()

    def _on_head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        started = bool(self.conn.trailing_data[0])
        self.logger.debug("No complete request head from %s within %.1f s (%s); closing the connection",
                          self._peer(), self.limits.header_timeout_s, "partial head" if started else "no data")
        if started:
            message = f"the request head was not received within {self.limits.header_timeout_s:g} s"
            self.transport.write(_canned_response(408, "Request Timeout", message, "request_timeout"))
        self.transport.close()

    def _on_body_timeout(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        if self.flow.read_paused or (self.cycle is not None and self.cycle.waiting_for_100_continue):
            # The client may be waiting for us: not a stall. Look again later.
            self._body_timer = self.loop.call_later(self.limits.body_idle_timeout_s, self._on_body_timeout)
            return
        self.logger.warning("Request body from %s stalled for more than %.1f s; closing the connection",
                            self._peer(), self.limits.body_idle_timeout_s)
        self.transport.close()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()


def protocol_class(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A `GuardedH11Protocol` subclass bound to `limits`, for uvicorn's `http=` (uvicorn instantiates it per
    connection with config/server_state/app_state/_loop). Not picklable: use with a single-process server."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"limits": limits, "__module__": __name__, "__doc__": GuardedH11Protocol.__doc__})


def uvicorn_settings(limits: ConnectionLimits) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.run` / `uvicorn.Config` that enforce `limits`.

    `http` forces the h11 implementation (the guard is built on it, even where httptools is installed), and
    `loop` the asyncio event loop (the guard's eviction closes transports the way asyncio's do; uvloop, which
    ray[serve] installs, closes them differently and idle connections linger);
    `timeout_keep_alive` bounds idling between requests. uvicorn's `limit_concurrency` is deliberately not
    set: it counts connections and tasks together and answers 503 through the app only once a request head
    has arrived, so it does not protect against idle connections, and at the cap it would refuse requests
    on connections this protocol already admitted.
    """
    return {"http": protocol_class(limits), "loop": "asyncio", "timeout_keep_alive": limits.keep_alive_timeout_s}


def raise_open_file_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE toward `wanted` (never above the hard limit, never lowering it); returns the
    soft limit now in force (`resource.RLIM_INFINITY` if unlimited)."""
    if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1:
        raise ValueError(f"wanted must be a positive integer, got {wanted!r}")
    if resource is None:
        raise OSError("RLIMIT_NOFILE is not available on this platform")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return soft
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as err:  # e.g. macOS refuses more than OPEN_MAX
            logger.warning("could not raise the open file limit from %d to %d: %s", soft, target, err)
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def check_connection_cap(limits: ConnectionLimits, open_file_limit: int, reserve: int = 64) -> ConnectionLimits:
    """`limits` with max_connections lowered so that max_connections + reserve <= open_file_limit.

    `reserve`: descriptors kept for everything but client connections (listening socket, epoll, model files,
    devices, outgoing media fetches, logs). A negative `open_file_limit` (RLIM_INFINITY) means unlimited.
    Lowering the cap logs a warning saying by how much and why; a limit that leaves no room raises ValueError.
    """
    if isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0:
        raise ValueError(f"reserve must be a non-negative integer, got {reserve!r}")
    if open_file_limit < 0 or (resource is not None and open_file_limit == resource.RLIM_INFINITY):
        return limits
    room = open_file_limit - reserve
    if room < 1:
        raise ValueError(f"the open file limit ({open_file_limit}) leaves no descriptors for connections after "
                         f"reserving {reserve} for the process; raise it (ulimit -n)")
    if limits.max_connections <= room:
        return limits
    logger.warning("max_connections lowered from %d to %d: the open file limit is %d and %d descriptors are "
                   "reserved for the process (raise `ulimit -n` to allow more connections)",
                   limits.max_connections, room, open_file_limit, reserve)
    return dataclasses.replace(limits, max_connections=room)


class _Seen:
    """Rate-limit state of one message key."""

    __slots__ = ("last_emit", "suppressed")

    def __init__(self, last_emit: float) -> None:
        self.last_emit = last_emit  # clock() seconds of the last record let through
        self.suppressed = 0  # records dropped since then


def _one_line(text: str) -> str:
    return " | ".join(part for part in (line.strip() for line in text.splitlines()) if part)


class OneLineRateLimitedLogs(logging.Filter):
    """A logger filter: records at `min_level` or above become one line, and repeats are rate-limited.

    One line: the formatted message with its lines joined by " | ", plus " | ExcType: text" for its exception;
    the traceback and stack info are dropped (the record is modified in place, before any handler sees it).
    Rate limit: records with the same key (logger name, first line of the unformatted message template with
    0x... addresses blanked, exception type) pass at most once per `interval_s`; the next one that passes ends with
    "[N similar suppressed in the last T s]". Counts of a key nobody logs again are never reported.
    At most `max_keys` keys are tracked (least recently passed ones are forgotten). Thread-safe.
    """

    def __init__(self, interval_s: float = 10.0, *, min_level: int = logging.WARNING, max_keys: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        if not (isinstance(interval_s, (int, float)) and math.isfinite(interval_s) and interval_s > 0):
            raise ValueError(f"interval_s must be a positive number of seconds, got {interval_s!r}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be positive, got {max_keys!r}")
        self.interval_s = float(interval_s)
        self.min_level = min_level
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str, str], _Seen] = {}  # insertion order = order of last pass

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        template = _ADDRESS.sub("0x", str(record.msg).lstrip().partition("\n")[0])[:200]
        key = (record.name, template, type(exc).__qualname__ if exc is not None else "")
        now = self._clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen.last_emit < self.interval_s:
                seen.suppressed += 1
                return False
            suppressed, since_s = (seen.suppressed, now - seen.last_emit) if seen is not None else (0, 0.0)
            self._seen.pop(key, None)
            while len(self._seen) >= self.max_keys:
                del self._seen[next(iter(self._seen))]
            self._seen[key] = _Seen(now)
        self._reduce(record, exc, suppressed, since_s)
        return True

    @staticmethod
    def _reduce(record: logging.LogRecord, exc: BaseException | None, suppressed: int, since_s: float) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a broken %-template: keep its parts rather than lose the record
            message = f"{record.msg} {record.args!r}"
        text = _one_line(message)
        if exc is not None:
            detail = _one_line(str(exc))
            exc_text = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
            text = f"{text} | {exc_text}" if text else exc_text
        if suppressed:
            text += f" [{suppressed} similar suppressed in the last {since_s:.0f} s]"
        record.msg = text
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        record.__dict__.pop("color_message", None)  # uvicorn's formatter would print this template instead


def install_log_filters(interval_s: float = 10.0, loggers: Iterable[str] = ERROR_LOGGERS, *,
                        min_level: int = logging.WARNING) -> Callable[[], None]:
    """Attach one `OneLineRateLimitedLogs` to each named logger; returns a function that detaches it.

    Covers asyncio's "socket.accept() out of system resource" (logged with the EMFILE traceback on every
    failed accept) and uvicorn's error logger. Note that the latter also carries "Exception in ASGI
    application": its traceback is reduced to one line too (pass `loggers=("asyncio",)` to keep it).
    Logger filters see only records logged on that very logger, not ones propagated from child loggers.
    """
    log_filter = OneLineRateLimitedLogs(interval_s, min_level=min_level)
    targets = [logging.getLogger(name) for name in loggers]
    for target in targets:
        target.addFilter(log_filter)

    def remove() -> None:
        for target in targets:
            target.removeFilter(log_filter)

    return remove
