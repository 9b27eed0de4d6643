"""REST connections that a client cannot hold open for nothing (slow or stalled clients, "slowloris").

uvicorn's own HTTP/1.1 protocol (h11) times out only an idle keep-alive connection *after* a response: a client
that connects and sends nothing, or half of its headers, holds a socket and a file descriptor for ever, and enough
of them exhaust the process's descriptors (health probes then fail). :func:`guarded_protocol` makes a subclass
with three guards:

* **header timeout**: from the moment a connection opens, and again after each response, the client has
  ``header_timeout_s`` to finish the next request's headers, or the connection is closed. (The body is guarded in
  the app: a body that pauses longer than the same time is answered 408, see ``reconkit.serve.app``.)
* **connection cap**: with more than ``max_connections`` open, the connection waiting the longest for a request is
  closed to make room; when every connection has a request in flight, the new connection is closed instead.
* **send timeout**: a response that the client stops reading (its TCP window shut, so the response waits in the
  server's buffers) ends the connection once ``header_timeout_s`` pass without the client taking any of it (as
  nginx's ``send_timeout``). Such a connection, closed gracefully, would wait for ever for its buffer to flush,
  while still counted against the cap and never chosen to make room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct

from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    import fcntl
    import resource
    import termios
except ImportError:  # not on Windows
    fcntl = resource = termios = None

__all__ = ["connection_cap", "guarded_protocol"]

_log = logging.getLogger("reconkit.serve")


def _unsent_bytes(transport: asyncio.Transport) -> int:
    """Bytes written to ``transport`` that the client has not taken yet: the transport's buffer plus, where the
    platform says (Linux's ``SIOCOUTQ``), the socket's send queue, which holds megabytes and drains only as the
    client reads."""
    unsent = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None and getattr(termios, "TIOCOUTQ", None) is not None:
        with contextlib.suppress(OSError):
            unsent += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    return unsent


def connection_cap(requested: int) -> int:
    """``requested``, or half the process's file-descriptor limit when that is lower (the other half stays for
    model files, gRPC and logs)."""
    if resource is None:
        return requested
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return requested if soft == resource.RLIM_INFINITY else min(requested, max(8, soft // 2))


class _GuardedH11Protocol(H11Protocol):
    header_timeout_s: float = 30.0
    max_connections: int = 1000
    _last_cap_log: float = float("-inf")

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._await_request()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._header_timer is not None and self.cycle is not self._idle_cycle:  # a request's headers arrived
            self._header_timer.cancel()
            self._header_timer = None

    def on_response_complete(self) -> None:
        if self._send_timer is not None:  # a pipelined request's response: its own time from now
            self._send_timer.cancel()
        self._watch_sending(_unsent_bytes(self.transport))  # (the app hands over each response whole)
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._await_request()  # (a pipelined request may already be running: then it is not waited for)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._header_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._send_timer = None
        super().connection_lost(exc)

    # --- guards --------------------------------------------------------------------------------------------------
    def _await_request(self) -> None:
        """Start the clock for the next request's headers."""
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._idle_cycle = self.cycle
        self.idle_since = self.loop.time()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.cycle is self._idle_cycle and not self.transport.is_closing():
            _log.debug("closed a connection: no complete request headers within the timeout",
                       extra={"client": self.client, "timeout_s": self.header_timeout_s})
            self.transport.close()

    def _watch_sending(self, unsent: int) -> None:
        """While ``unsent`` bytes of a response wait for the client (:func:`_unsent_bytes`), check in
        ``header_timeout_s`` that it has taken some of them."""
        if unsent:
            self._send_timer = self.loop.call_later(self.header_timeout_s, self._check_sending, unsent)

    def _check_sending(self, unsent_before: int) -> None:
        self._send_timer = None
        unsent = _unsent_bytes(self.transport)
        if unsent < unsent_before:
            self._watch_sending(unsent)
            return
        _log.debug("closed a connection: the client read none of the response within the timeout",
                   extra={"client": self.client, "timeout_s": self.header_timeout_s, "unsent_bytes": unsent})
        self.transport.abort()  # close() would wait for the unread response to flush

    def _make_room(self) -> None:
        waiting = [c for c in self.connections
                   if c is not self and getattr(c, "_header_timer", None) is not None and not c.transport.is_closing()]
        victim = min(waiting, key=lambda c: c.idle_since) if waiting else self
        now = self.loop.time()
        if now - type(self)._last_cap_log > 10.0:  # one line per 10 s however many connections arrive
            type(self)._last_cap_log = now
            _log.warning("connection limit reached: closed the connection " +
                         ("waiting longest for a request" if victim is not self else "just opened (all are busy)"),
                         extra={"max_connections": self.max_connections})
        victim.transport.close()


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol class with a header timeout, a connection cap and a send timeout (pass as
    ``uvicorn.Config(http=...)``)."""
    if header_timeout_s <= 0 or max_connections < 1:
        raise ValueError("header_timeout_s must be positive and max_connections at least 1")
    return type("GuardedH11Protocol", (_GuardedH11Protocol,),
                {"header_timeout_s": header_timeout_s, "max_connections": max_connections})
