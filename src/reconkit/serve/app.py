"""The KServe V2 / Open Inference Protocol REST app (Starlette, run by uvicorn; see ``reconkit.serve.server``).

Endpoints: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/{v}]``,
``.../ready``, ``.../config`` (Triton's model configuration extension), ``.../stats`` and ``/v2/models/stats``
(Triton's statistics extension), ``POST .../infer`` and ``GET /metrics`` (Prometheus). Errors are JSON
``{"error": "..."}`` with the status: 400 bad input (naming the tensor), 401 missing / wrong bearer token,
404 unknown model or version or endpoint, 405 wrong method, 408 a body that paused longer than the client
timeout, 413 body over the size limit (before or after decompressing a ``gzip`` / ``deflate`` body), 422 an input
the model returns NaN / inf for, 503 queue full or shutting down (``Retry-After``), 504 request timeout, 500
inference failure; 499 (only logged and counted) a client that disconnected before its answer. Health endpoints
(server and model liveness / readiness) need no token (for orchestrator probes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import Awaitable, Callable

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import reconkit
from reconkit.errors import ReconkitError
from reconkit.serve.protocol import (
    HEADER_LENGTH,
    InferRequest,
    RequestError,
    decode_infer_request,
    encode_infer_response,
    split_body,
)
from reconkit.serve.state import EXTENSIONS, ServedModel, ServerConfig, ServerState, bearer_token_ok

__all__ = ["ServerConfig", "create_app"]

_log = logging.getLogger("reconkit.serve")
Handler = Callable[[Request], Awaitable[Response]]


def _endpoint(state: ServerState, kind: str, handler: Handler, public: bool = False) -> Handler:
    """Wrap ``handler`` with auth, error mapping, metrics and one JSON log line per request."""
    token = state.config.auth_token

    async def wrapped(request: Request) -> Response:
        start = time.perf_counter()
        error = None
        try:
            if token and not public and not bearer_token_ok(request.headers.get("authorization", ""), token):
                raise RequestError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
            response = await handler(request)
        except RequestError as exc:
            error = exc.message
            response = JSONResponse({"error": error}, exc.status, headers=exc.headers)
        except Exception as exc:  # noqa: BLE001  (never let one request take the server down)
            _log.exception("unhandled error", extra={"path": request.url.path})
            error = f"internal error: {type(exc).__name__}: {exc}"
            response = JSONResponse({"error": error}, 500)
        state.record_request(kind, response.status_code, time.perf_counter() - start,
                             {"method": request.method, "path": request.url.path[:200]}, error,
                             log_success=kind != "health")
        return response

    return wrapped


# Content-Encoding of request bodies -> zlib window bits (tritonclient's request_compression_algorithm sends
# gzip, or deflate as zlib.compress writes it; HTTP's "deflate" is the zlib format, though some clients send raw
# deflate, taken too when the body has no zlib header; "x-gzip" is gzip, RFC 9110 8.4.1.3)
_ENCODINGS = {"identity": None, "gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS,
              "deflate": zlib.MAX_WBITS}


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """Decompress a ``gzip`` / ``deflate`` body; at most ``limit`` bytes come out (413 beyond: no zip bombs)."""
    wbits = _ENCODINGS[encoding]
    if encoding == "deflate" and not (len(body) >= 2 and body[0] & 0x0F == 8 and (body[0] << 8 | body[1]) % 31 == 0):
        wbits = -zlib.MAX_WBITS  # no zlib header: raw deflate
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise RequestError(400, f"request body is not valid {encoding} data ({exc})") from None
    if len(data) > limit:
        raise RequestError(413, f"decompressed request body exceeds the limit of {limit} bytes")
    if not inflater.eof:
        raise RequestError(400, f"request body is truncated {encoding} data")
    if inflater.unused_data:
        raise RequestError(400, f"request body has {len(inflater.unused_data)} bytes after its {encoding} data")
    return data


MIN_BODY_RATE = 500
"""Bytes per second a request body must average beyond its first ``--client-timeout-s`` (as Apache's
``mod_reqtimeout`` ``body=…,MinRate=500``): a body that trickles in, each pause shorter than the timeout, would
otherwise hold its connection for ever. A 28 MiB slice may take 16 hours at this rate: no real link is refused."""


async def _read_body(request: Request, limit: int, pause_s: float) -> bytes:
    """The request body, decompressed; ``limit`` bounds both what is read and what decompression gives. A client
    that sends nothing for ``pause_s`` seconds, or sends the body slower than ``pause_s`` plus one second per
    :data:`MIN_BODY_RATE` bytes received, gets 408 and the connection is closed."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    encoding = request.headers.get("content-encoding", "identity").strip().lower() or "identity"
    if encoding not in _ENCODINGS:
        raise RequestError(400, f"request Content-Encoding {encoding[:40]!r} is not supported (identity, gzip, x-gzip, "
                                "deflate)")
    chunks, size = [], 0
    stream = request.stream()
    started = time.monotonic()
    try:
        while True:
            allowed = started + pause_s + size / MIN_BODY_RATE - time.monotonic()  # the minimum average rate
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), max(0.0, min(pause_s, allowed)))
            except StopAsyncIteration as end:
                # its traceback holds this frame (chunks, body) in a reference cycle with wait_for's task: without
                # this, every request's body stayed in memory until Python's cyclic GC happened to run
                end.__traceback__ = None
                break
            except asyncio.TimeoutError:
                if allowed < pause_s:
                    raise RequestError(408, f"client sent the request body slower than {MIN_BODY_RATE} bytes/s "
                                            f"({size} bytes in {time.monotonic() - started:.1f} s)",
                                       {"Connection": "close"}) from None
                raise RequestError(408, f"client sent no request data for {pause_s:g} s ({size} bytes of the body "
                                        "received)", {"Connection": "close"}) from None
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise RequestError(499, "client disconnected before sending the whole body") from None
    body = b"".join(chunks)
    if encoding == "identity":
        return body
    # in a thread, however small the body: the time goes with the output, up to `limit` (a 0.6 MB deflate body
    # of zeros inflates to 512 MiB in seconds)
    return await asyncio.to_thread(_inflate, body, encoding, limit)


async def _infer_while_connected(state: ServerState, served: ServedModel, request: Request,
                                 infer_request: InferRequest) -> dict[str, np.ndarray]:
    """``state.infer``'s outputs, unless the client disconnects first (its body already read): then the inference is
    cancelled, so that a queued request leaves the model's queue as a cancelled gRPC call's does, rather than
    holding a queue slot and running for nobody, and RequestError(499) is raised. An answer that arrives as the
    client leaves may still come back (Python 3.11's ``asyncio.wait_for`` returns it despite the cancel): the
    statistics then count it as answered, and so it is returned, not counted as 499 too."""
    inference = asyncio.ensure_future(state.infer(served, infer_request))
    disconnect = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((inference, disconnect), return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        inference.cancel()  # no-op once done
    if not inference.done():
        with contextlib.suppress(asyncio.CancelledError):
            await inference  # lets state.infer count it
    if inference.cancelled():
        raise RequestError(499, "client disconnected before the answer")
    return inference.result()


async def _disconnected(request: Request) -> None:
    """Return once the client of ``request`` (whose body has been read) closes its connection."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _routes(state: ServerState) -> list[Route]:
    def served(request: Request) -> ServedModel:
        return state.served(request.path_params["name"], request.path_params.get("version"))

    async def server_metadata(request: Request) -> Response:
        extensions = [*EXTENSIONS, "binary_tensor_data"]
        return JSONResponse({"name": "reconkit", "version": reconkit.__version__, "extensions": extensions})

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        return JSONResponse({"ready": state.accepting}, 200 if state.accepting else 503)

    async def model_metadata(request: Request) -> Response:
        return JSONResponse(state.model_metadata(served(request)))

    async def model_ready(request: Request) -> Response:
        s = served(request)
        return JSONResponse({"name": s.entry.name, "version": s.entry.version, "ready": state.accepting},
                            200 if state.accepting else 503)

    async def model_config(request: Request) -> Response:
        return JSONResponse(state.model_config(served(request)))

    async def model_statistics(request: Request) -> Response:
        return JSONResponse(state.model_statistics(request.path_params.get("name"), request.path_params.get("version")))

    async def infer(request: Request) -> Response:
        s = served(request)
        body = await _read_body(request, state.config.max_request_bytes, state.config.client_timeout_s)
        json_part, binary = split_body(body, request.headers.get(HEADER_LENGTH))
        infer_request = decode_infer_request(await state.parse_header(json_part), binary, s.model)
        results = await _infer_while_connected(state, s, request, infer_request)
        # in a thread: outputs asked for as JSON are a Python list of every value (a batch of 640 × 368 images:
        # ~1 s on the event loop, with every REST and gRPC client waiting)
        content, headers = await asyncio.to_thread(encode_infer_response, s.entry.name, s.entry.version,
                                                   infer_request, results)
        return Response(content, 200, headers=headers)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(state.metrics.registry), headers={"content-type": CONTENT_TYPE_LATEST})

    model_routes = [("", model_metadata, "GET", "metadata"), ("/ready", model_ready, "GET", "health"),
                    ("/config", model_config, "GET", "metadata"), ("/stats", model_statistics, "GET", "metadata"),
                    ("/infer", infer, "POST", "infer")]
    routes = [
        Route("/v2", _endpoint(state, "metadata", server_metadata)),
        Route("/v2/models/stats", _endpoint(state, "metadata", model_statistics)),  # before /v2/models/{name}
        Route("/v2/health/live", _endpoint(state, "health", live, public=True)),
        Route("/v2/health/ready", _endpoint(state, "health", ready, public=True)),
        Route("/metrics", _endpoint(state, "metrics", metrics)),
    ]
    for suffix, handler, method, kind in model_routes:
        wrapped = _endpoint(state, kind, handler, public=kind == "health")  # as gRPC's ModelReady
        routes.append(Route("/v2/models/{name}" + suffix, wrapped, methods=[method]))
        routes.append(Route("/v2/models/{name}/versions/{version}" + suffix, wrapped, methods=[method]))
    return routes


def create_app(config: ServerConfig) -> Starlette:
    """Load every model of ``config.model_repository`` and build the app (batchers start with the app).

    Raises ``ReconkitError`` for a missing / empty repository or a model that ONNX Runtime cannot load.
    ``app.state.serve`` is the shared state (``shutting_down`` is set by the server on SIGTERM).
    """
    state = ServerState(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await state.start()
        grpc_server = None
        if config.grpc_address is not None:
            from reconkit.serve.grpc_api import start_grpc_server  # loads grpcio only when asked for

            try:
                grpc_server = await start_grpc_server(state)
            except ReconkitError as exc:
                state.startup_error = exc  # uvicorn only logs a failed startup; build_server's caller re-raises it
                await state.stop()
                raise
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(config.request_timeout_s + 5.0)  # answers the calls already accepted
            await state.stop()

    async def http_error(request: Request, exc: Exception) -> Response:
        """Starlette's own refusals (no route, method not allowed) as JSON errors like every other one, counted in
        the metrics (endpoint ``other``; answered at once, so with no latency to speak of) and logged likewise."""
        status = getattr(exc, "status_code", 500)
        where = f"{request.method} {request.url.path[:200]}"
        error = {404: f"no such endpoint: {where}", 405: f"method not allowed: {where}"}.get(status, str(exc))
        state.record_request("other", status, 0.0, {"method": request.method, "path": request.url.path[:200]}, error)
        return JSONResponse({"error": error}, status, headers=getattr(exc, "headers", None))

    app = Starlette(routes=_routes(state), lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.serve = state
    return app
