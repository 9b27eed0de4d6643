"""Run the app with uvicorn; SIGTERM / SIGINT shut down gracefully.

On the signal the server stops accepting connections, reports not-ready, answers every request it already
accepted (queued and running inferences included), then stops the batchers and exits.
"""

from __future__ import annotations

import signal
import socket
import ssl

import uvicorn

from reconkit.errors import ReconkitError
from reconkit.serve.app import ServerConfig, create_app
from reconkit.serve.connections import connection_cap, guarded_protocol

__all__ = ["ReconServer", "build_server", "serve"]


class ReconServer(uvicorn.Server):
    """uvicorn server that reports not-ready from the first SIGTERM / SIGINT and drains before exiting."""

    def handle_exit(self, sig: int, frame) -> None:
        # Unlike uvicorn's own handler, the signal is not re-raised after the drain: a graceful stop exits 0.
        self.config.app.state.serve.shutting_down = True
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # second Ctrl-C: stop without waiting
        self.should_exit = True


def build_server(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000) -> ReconServer:
    """Load the models and return the (not yet started) server; ``server.run()`` blocks until shut down."""
    app = create_app(config)
    uv_config = uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=False, lifespan="on",
        timeout_graceful_shutdown=config.request_timeout_s + 5.0,
        limit_concurrency=None, timeout_keep_alive=30,
        http=guarded_protocol(config.client_timeout_s, connection_cap(config.max_connections)),
        ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key,
        ssl_ca_certs=None if config.tls_client_ca is None else str(config.tls_client_ca),
        ssl_cert_reqs=ssl.CERT_NONE if config.tls_client_ca is None else ssl.CERT_REQUIRED,
    )
    return ReconServer(uv_config)


def bind_rest_socket(host: str, port: int) -> socket.socket:
    """The REST port, bound (not yet listening: connections are refused until the server starts) as uvicorn binds it.

    Raises ``ReconkitError`` naming the address when it cannot be bound (in use, no such local address, no
    permission), so that ``serve`` fails at once rather than after loading every model (minutes for large ones).
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as exc:  # OverflowError: a port beyond 65535
        sock.close()
        reason = "the port must be a number from 0 to 65535" if isinstance(exc, OverflowError) else exc.strerror
        raise ReconkitError(f"REST: cannot bind {host}:{port}: {reason or exc}") from None
    return sock


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until SIGTERM / SIGINT; raises ReconkitError when the REST port cannot be bound (before any model
    loads) or the gRPC endpoint could not start (e.g. port in use)."""
    with bind_rest_socket(host, port) as sock:
        server = build_server(config, host, port)
        try:
            server.run(sockets=[sock])  # after a failed startup uvicorn >= 0.50 exits, older releases return
        except SystemExit:
            if server.config.app.state.serve.startup_error is None:
                raise
    error = server.config.app.state.serve.startup_error
    if error is not None:  # say why instead
        raise error from None
