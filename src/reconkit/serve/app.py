"""The KServe V2 / Open Inference Protocol REST app (Starlette, run by uvicorn; see ``reconkit.serve.server``).

Endpoints: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/{v}]``,
``.../ready``, ``.../config``, ``POST .../infer`` and ``GET /metrics`` (Prometheus). Errors are JSON
``{"error": "..."}`` with the status: 400 bad input (naming the tensor), 401 missing / wrong bearer token,
404 unknown model or version, 413 body over the size limit, 503 queue full or shutting down (``Retry-After``),
504 request timeout, 500 inference failure. Health endpoints need no token (for orchestrator probes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import reconkit
from reconkit.serve.batcher import DynamicBatcher
from reconkit.serve.metrics import ServeMetrics
from reconkit.serve.model import OnnxModel, select_providers
from reconkit.serve.protocol import HEADER_LENGTH, RequestError, decode_infer_request, encode_infer_response
from reconkit.serve.repository import BatchingConfig, ModelEntry, discover_models
from reconkit.serve.validation import check_inputs, check_outputs

__all__ = ["ServerConfig", "create_app"]

_log = logging.getLogger("reconkit.serve")
Handler = Callable[[Request], Awaitable[Response]]


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Server settings.

    model_repository: Triton-layout directory ``<name>/<version>/model.onnx``.
    batching: defaults for models without ``config.pbtxt``.
    request_timeout_s: longest an inference request may take, queueing included (seconds); 504 after.
    max_request_bytes: largest request body accepted; 413 above.
    auth_token: when set, every endpoint but health needs ``Authorization: Bearer <auth_token>``.
    device: ``"auto"`` (CUDA execution provider when ONNX Runtime has it), ``"cpu"`` or ``"cuda"``.
    intra_op_threads: ONNX Runtime threads per session (0: its default).
    """

    model_repository: Path
    batching: BatchingConfig = dataclasses.field(default_factory=BatchingConfig)
    request_timeout_s: float = 30.0
    max_request_bytes: int = 512 * 2**20
    auth_token: str | None = None
    device: str = "auto"
    intra_op_threads: int = 0


@dataclasses.dataclass
class _Served:
    entry: ModelEntry
    model: OnnxModel
    batcher: DynamicBatcher | None = None


class _State:
    """Everything the handlers share: loaded models (name -> version -> model), metrics, flags."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.metrics = ServeMetrics.create()
        providers = select_providers(config.device)
        self.models: dict[str, dict[str, _Served]] = {}
        for entry in discover_models(config.model_repository, config.batching):
            model = OnnxModel(entry.onnx_path, providers, config.intra_op_threads)
            self.models.setdefault(entry.name, {})[entry.version] = _Served(entry, model)
            _log.info("loaded model", extra={"model": entry.name, "version": entry.version,
                                             "providers": model.providers, "batching": dataclasses.asdict(entry.batching)})
        self.ready = False
        self.shutting_down = False

    def served(self, name: str, version: str | None) -> _Served:
        versions = self.models.get(name)
        if versions is None:
            raise RequestError(404, f"unknown model {name[:100]!r}; served models: {sorted(self.models)}")
        if version is None:
            return versions[max(versions, key=int)]
        if version not in versions:
            raise RequestError(404, f"model '{name}' has no version {version[:20]!r}; versions: {sorted(versions, key=int)}")
        return versions[version]

    async def start(self) -> None:
        for name, versions in self.models.items():
            for served in versions.values():
                served.batcher = DynamicBatcher(
                    name, served.model, served.entry.batching,
                    on_queue_depth=self.metrics.queue_depth.labels(name, served.entry.version).set,
                    on_batch=self.metrics.batch_size.labels(name, served.entry.version).observe,
                )
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await asyncio.gather(*(s.batcher.close() for v in self.models.values() for s in v.values() if s.batcher))


def _endpoint(state: _State, kind: str, handler: Handler, public: bool = False) -> Handler:
    """Wrap ``handler`` with auth, error mapping, metrics and one JSON log line per request."""
    token = state.config.auth_token

    async def wrapped(request: Request) -> Response:
        start = time.perf_counter()
        error = None
        try:
            if token and not public and not _authorized(request, token):
                raise RequestError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
            response = await handler(request)
        except RequestError as exc:
            error = exc.message
            response = JSONResponse({"error": error}, exc.status, headers=exc.headers)
        except Exception as exc:  # noqa: BLE001  (never let one request take the server down)
            _log.exception("unhandled error", extra={"path": request.url.path})
            error = f"internal error: {type(exc).__name__}: {exc}"
            response = JSONResponse({"error": error}, 500)
        seconds = time.perf_counter() - start
        state.metrics.observe_request(kind, response.status_code, seconds)
        if kind != "health" or error is not None:
            fields = {"method": request.method, "path": request.url.path[:200], "status": response.status_code,
                      "latency_ms": round(seconds * 1e3, 3)}
            _log.info("request", extra=fields if error is None else {**fields, "error": error})
        return response

    return wrapped


def _authorized(request: Request, token: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    if request.headers.get("content-encoding", "identity").lower() != "identity":
        raise RequestError(400, "compressed request bodies (Content-Encoding) are not supported")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise RequestError(499, "client disconnected before sending the whole body") from None
    return b"".join(chunks)


def _routes(state: _State) -> list[Route]:
    def served(request: Request) -> _Served:
        return state.served(request.path_params["name"], request.path_params.get("version"))

    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": "reconkit", "version": reconkit.__version__, "extensions": ["binary_tensor_data"]})

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        is_ready = state.ready and not state.shutting_down
        return JSONResponse({"ready": is_ready}, 200 if is_ready else 503)

    async def model_metadata(request: Request) -> Response:
        s = served(request)
        return JSONResponse({
            "name": s.entry.name,
            "versions": sorted(state.models[s.entry.name], key=int),
            "platform": "onnxruntime_onnx",
            "inputs": [spec.as_metadata() for spec in s.model.inputs],
            "outputs": [spec.as_metadata() for spec in s.model.outputs],
        })

    async def model_ready(request: Request) -> Response:
        s = served(request)
        is_ready = state.ready and not state.shutting_down
        return JSONResponse({"name": s.entry.name, "version": s.entry.version, "ready": is_ready},
                            200 if is_ready else 503)

    async def model_config(request: Request) -> Response:
        s = served(request)
        b = s.entry.batching
        return JSONResponse({
            "name": s.entry.name, "platform": "onnxruntime_onnx", "max_batch_size": b.max_batch_size,
            "input": [spec.as_metadata() for spec in s.model.inputs],
            "output": [spec.as_metadata() for spec in s.model.outputs],
            "dynamic_batching": {"max_queue_delay_microseconds": int(b.max_queue_delay_s * 1e6),
                                 "default_queue_policy": {"max_queue_size": b.max_queue_size}} if b.dynamic else None,
            "instance_group": [{"count": b.instances}],
            "parameters": s.model.metadata,
        })

    async def infer(request: Request) -> Response:
        s = served(request)
        if s.batcher is None:
            raise RequestError(503, "server is not started yet", {"Retry-After": "1"})
        body = await _read_body(request, state.config.max_request_bytes)
        infer_request = decode_infer_request(body, request.headers.get(HEADER_LENGTH), s.model)
        check_inputs(infer_request, s.entry.batching.max_batch_size, s.model.spatial_sizes)
        timeout = min(state.config.request_timeout_s, infer_request.timeout_s or float("inf"))
        try:
            results = await asyncio.wait_for(s.batcher.submit(infer_request), timeout)
        except asyncio.TimeoutError:
            raise RequestError(504, f"model '{s.entry.name}': no result within {timeout:g} s") from None
        check_outputs(results, s.entry.name)
        content, headers = encode_infer_response(s.entry.name, s.entry.version, infer_request, results)
        return Response(content, 200, headers=headers)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(state.metrics.registry), headers={"content-type": CONTENT_TYPE_LATEST})

    model_routes = [("", model_metadata, "GET", "metadata"), ("/ready", model_ready, "GET", "health"),
                    ("/config", model_config, "GET", "metadata"), ("/infer", infer, "POST", "infer")]
    routes = [
        Route("/v2", _endpoint(state, "metadata", server_metadata)),
        Route("/v2/health/live", _endpoint(state, "health", live, public=True)),
        Route("/v2/health/ready", _endpoint(state, "health", ready, public=True)),
        Route("/metrics", _endpoint(state, "metrics", metrics)),
    ]
    for suffix, handler, method, kind in model_routes:
        wrapped = _endpoint(state, kind, handler)
        routes.append(Route("/v2/models/{name}" + suffix, wrapped, methods=[method]))
        routes.append(Route("/v2/models/{name}/versions/{version}" + suffix, wrapped, methods=[method]))
    return routes


def create_app(config: ServerConfig) -> Starlette:
    """Load every model of ``config.model_repository`` and build the app (batchers start with the app).

    Raises ``ReconkitError`` for a missing / empty repository or a model that ONNX Runtime cannot load.
    ``app.state.serve`` is the shared state (``shutting_down`` is set by the server on SIGTERM).
    """
    state = _State(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await state.start()
        yield
        await state.stop()

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"no such endpoint: {request.method} {request.url.path[:200]}"}, 404)

    app = Starlette(routes=_routes(state), lifespan=lifespan, exception_handlers={404: not_found})
    app.state.serve = state
    return app
