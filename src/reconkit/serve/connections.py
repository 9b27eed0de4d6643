"""REST connections that a client cannot hold open for nothing (slow or stalled clients, "slowloris").

uvicorn's own HTTP/1.1 protocol (h11) times out only an idle keep-alive connection *after* a response: a client
that connects and sends nothing, or half of its headers, holds a socket and a file descriptor for ever, and enough
of them exhaust the process's descriptors (health probes then fail). :func:`guarded_protocol` makes a subclass
with two guards:

* **header timeout**: from the moment a connection opens, and again after each response, the client has
  ``header_timeout_s`` to finish the next request's headers, or the connection is closed. (The body is guarded in
  the app: a body that pauses longer than the same time is answered 408, see ``reconkit.serve.app``.)
* **connection cap**: with more than ``max_connections`` open, the connection waiting the longest for a request is
  closed to make room; when every connection has a request in flight, the new connection is closed instead.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    import resource
except ImportError:  # not on Windows
    resource = None

__all__ = ["connection_cap", "guarded_protocol"]

_log = logging.getLogger("reconkit.serve")


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
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._await_request()  # (a pipelined request may already be running: then it is not waited for)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
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
    """uvicorn's h11 protocol class with a header timeout and a connection cap (pass as ``uvicorn.Config(http=...)``)."""
    if header_timeout_s <= 0 or max_connections < 1:
        raise ValueError("header_timeout_s must be positive and max_connections at least 1")
    return type("GuardedH11Protocol", (_GuardedH11Protocol,),
                {"header_timeout_s": header_timeout_s, "max_connections": max_connections})
