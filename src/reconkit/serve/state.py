"""What the REST and gRPC front ends share: settings, the loaded models and their batchers, and one inference path.

Both protocols decode a request into an :class:`~reconkit.serve.protocol.InferRequest` and call
:meth:`ServerState.infer`, so validation, batching, timeouts and output checks are the same whichever one a client
speaks. Problems are :class:`~reconkit.serve.protocol.RequestError` with an HTTP status; the gRPC front end maps
it to a gRPC status code.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import multiprocessing
import ssl
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from reconkit.errors import ConfigError, ReconkitError, check_number
from reconkit.serve import protocol
from reconkit.serve.batcher import DynamicBatcher
from reconkit.serve.metrics import ServeMetrics, TritonModelMetrics
from reconkit.serve.model import OnnxModel, select_providers
from reconkit.serve.protocol import InferRequest, RequestError, header_of, parse_header_outcome
from reconkit.serve.repository import BatchingConfig, ModelEntry, discover_models
from reconkit.serve.statistics import ModelStatistics
from reconkit.serve.validation import check_inputs, check_outputs

__all__ = ["DEVICES", "EXTENSIONS", "ServedModel", "ServerConfig", "ServerState", "bearer_token_ok",
           "bearer_token_problem"]

# protocol extensions served over both REST and gRPC (REST adds binary_tensor_data), named as Triton names them
EXTENSIONS = ["model_configuration", "statistics"]
DEVICES = ("auto", "cpu", "cuda")
"""What :attr:`ServerConfig.device` may be (``reconkit serve --device``)."""
MAX_JSON_PARSES = 4
"""JSON headers over :data:`~reconkit.serve.protocol.JSON_IN_WORKER_BYTES` in the worker process or waiting for it
at once: each holds its body (up to ``--max-request-mb``) while it waits, so more are answered 503 (``Retry-After``)."""

_log = logging.getLogger("reconkit.serve")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Server settings.

    model_repository: Triton-layout directory ``<name>/<version>/model.onnx``.
    batching: defaults for models without ``config.pbtxt``.
    request_timeout_s: longest an inference request may take, queueing included (seconds); 504 after.
    max_request_bytes: largest request body (REST) or message (gRPC) accepted; 413 / RESOURCE_EXHAUSTED above.
    auth_token: when set, every endpoint but health needs ``Authorization: Bearer <auth_token>`` (gRPC: the
        ``authorization`` metadata key).
    device: ``"auto"`` (CUDA execution provider when ONNX Runtime has it), ``"cpu"`` or ``"cuda"``.
    intra_op_threads: ONNX Runtime threads per session (0: its default).
    grpc_address: ``"host:port"`` for the gRPC endpoint (port 0: any free port), or None for REST only.
    grpc_max_concurrent_rpcs: gRPC calls handled at once (health and metadata included); more are refused with
        RESOURCE_EXHAUSTED before they are read.
    tls_cert, tls_key: PEM certificate chain and private key; when both are set REST is served over HTTPS and gRPC
        over TLS (clients check the certificate against their CA), otherwise both are plain.
    tls_client_ca: PEM CA certificate(s) for mutual TLS: with it, both endpoints accept only clients presenting a
        certificate signed by one of them (needs ``tls_cert`` / ``tls_key``).
    client_timeout_s: REST: longest a client may take to send a request's headers (from connecting, or from the
        previous response), else the connection is closed; longest its body may pause, else 408 (as
        when it averages under 500 bytes/s beyond that time); and longest a response may go unread, else the
        connection is closed. gRPC: longest
        a connection may take to set up HTTP/2 or stay without a call, else it is closed; and longest a call's
        request message may take to arrive, else DEADLINE_EXCEEDED.
    max_connections: REST connections open at once (at most half the process's file-descriptor limit); with more,
        the one waiting longest for a request is closed, or the new one when every connection has a request in
        flight. The gRPC endpoint keeps as many at most (grpcio closes the new ones beyond).

    Raises :class:`~reconkit.errors.ConfigError` naming the field unless ``request_timeout_s`` and
    ``client_timeout_s`` are finite numbers > 0, ``max_request_bytes``, ``grpc_max_concurrent_rpcs`` and
    ``max_connections`` integers >= 1, ``intra_op_threads`` an integer >= 0, ``device`` one of :data:`DEVICES`, and
    for an ``auth_token`` no client could send (:func:`bearer_token_problem`).
    """

    model_repository: Path
    batching: BatchingConfig = dataclasses.field(default_factory=BatchingConfig)
    request_timeout_s: float = 30.0
    max_request_bytes: int = 512 * 2**20
    auth_token: str | None = None
    device: str = "auto"
    intra_op_threads: int = 0
    grpc_address: str | None = None
    grpc_max_concurrent_rpcs: int = 256
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    client_timeout_s: float = 30.0
    max_connections: int = 1000

    def __post_init__(self) -> None:
        check_number("ServerConfig.request_timeout_s", self.request_timeout_s, 0, strict=True)
        check_number("ServerConfig.max_request_bytes", self.max_request_bytes, 1, integer=True)
        if self.device not in DEVICES:
            raise ConfigError(f"ServerConfig.device must be one of {DEVICES}, got {self.device!r}")
        check_number("ServerConfig.intra_op_threads", self.intra_op_threads, 0, integer=True)
        check_number("ServerConfig.grpc_max_concurrent_rpcs", self.grpc_max_concurrent_rpcs, 1, integer=True)
        check_number("ServerConfig.client_timeout_s", self.client_timeout_s, 0, strict=True)
        check_number("ServerConfig.max_connections", self.max_connections, 1, integer=True)
        problem = self.auth_token and bearer_token_problem(self.auth_token)
        if problem:
            raise ConfigError(f"ServerConfig.auth_token: {problem}; no client could send it, so every request would "
                              "be refused")

    def tls_pair(self) -> tuple[bytes, bytes] | None:
        """``(key PEM, certificate chain PEM)`` after checking that they load as a pair; None without TLS.

        Raises ReconkitError naming the file when one of the two is missing, unreadable or they do not match, or
        when the key is encrypted (gRPC takes only a plain key, and no passphrase is asked for).
        """
        if self.tls_cert is None and self.tls_key is None:
            return None
        if self.tls_cert is None or self.tls_key is None:
            raise ReconkitError("TLS needs both a certificate (tls_cert) and its private key (tls_key)")
        pems = [_read_tls_file(path) for path in (self.tls_key, self.tls_cert)]

        def passphrase() -> str:  # without it OpenSSL prompted on the terminal, or failed with a bare EINVAL OSError
            raise ReconkitError(f"{self.tls_key}: the private key is encrypted; give it without a passphrase "
                                f"(openssl pkey -in {self.tls_key} -out server.key)")

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.tls_cert, self.tls_key, passphrase)
        except ssl.SSLError as exc:
            raise ReconkitError(f"{self.tls_cert}, {self.tls_key}: not a PEM certificate chain and its private key: "
                                f"{exc.reason or exc}") from None
        return pems[0], pems[1]

    def client_ca(self) -> bytes | None:
        """The ``tls_client_ca`` PEM after checking that it loads as CA certificates; None without mutual TLS.

        Raises ReconkitError naming the file when it is unreadable or holds no certificate, or when the server
        itself has no certificate.
        """
        if self.tls_client_ca is None:
            return None
        if self.tls_cert is None or self.tls_key is None:
            raise ReconkitError("mutual TLS (tls_client_ca) needs the server's own certificate and key "
                                "(tls_cert, tls_key)")
        path = Path(self.tls_client_ca)
        pem = _read_tls_file(path)
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_verify_locations(cadata=pem.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
            raise ReconkitError(f"{path}: not a PEM CA certificate: {getattr(exc, 'reason', None) or exc}") from None
        return pem


def _read_tls_file(path: Path | str) -> bytes:
    """The bytes of a PEM file; ReconkitError naming it when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ReconkitError(f"{path}: cannot read TLS file: {exc.strerror or exc}") from None


def bearer_token_problem(token: str) -> str | None:
    """Why no client can present ``token`` (never shown: it is a secret), or None. An HTTP header arrives stripped
    and, beyond ASCII, as Latin-1; gRPC metadata is printable ASCII: a token from a Kubernetes secret made from a file
    that ends in a newline refused every request (401) without a word at start-up, and a non-ASCII one too (500 where
    the locale cannot decode it)."""
    if token != token.strip():
        return "the bearer token starts or ends with whitespace (a newline at the end of the secret's file?)"
    if not (token.isascii() and token.isprintable()):
        return "the bearer token holds a character that is not printable ASCII"
    return None


def bearer_token_ok(authorization: str, token: str) -> bool:
    """Whether an ``Authorization`` value (HTTP header or gRPC metadata) is ``Bearer <token>`` (constant-time)."""
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


@dataclasses.dataclass
class ServedModel:
    """One model version: its repository entry, ONNX Runtime session, (once started) batcher and statistics."""

    entry: ModelEntry
    model: OnnxModel
    batcher: DynamicBatcher | None = None
    statistics: ModelStatistics = dataclasses.field(default_factory=ModelStatistics)


class ServerState:
    """Everything the handlers share: loaded models (name -> version -> model), metrics, flags.

    ``tls`` is the loaded ``(key, certificate chain)`` PEM pair or None, ``tls_client_ca`` the CA PEM that client
    certificates must chain to (mutual TLS) or None; ``grpc_port`` the bound gRPC port once the
    gRPC endpoint runs (None otherwise); ``startup_error`` what stopped the server from starting (e.g. a gRPC
    address that cannot be bound).
    """

    def __init__(self, config: ServerConfig):
        self.config = config
        self.tls = config.tls_pair()  # first: a bad certificate / key fails, naming the file, before models load
        self.tls_client_ca = config.client_ca()
        self.metrics = ServeMetrics.create()
        providers = select_providers(config.device)
        self.models: dict[str, dict[str, ServedModel]] = {}
        for entry in discover_models(config.model_repository, config.batching):
            started = time.monotonic()
            model = OnnxModel(entry.onnx_path, providers, config.intra_op_threads)
            self.models.setdefault(entry.name, {})[entry.version] = ServedModel(entry, model)
            _log.info("loaded model", extra={"model": entry.name, "version": entry.version, "graphs": model.graphs,
                                             "load_s": round(time.monotonic() - started, 2),
                                             "providers": model.providers, "batching": dataclasses.asdict(entry.batching)})
        self.metrics.registry.register(TritonModelMetrics(self._model_counters))
        self.ready = False
        self.shutting_down = False
        self.grpc_port: int | None = None
        self.startup_error: Exception | None = None
        self._json_workers: ProcessPoolExecutor | None = None
        self._json_parses = 0

    def _all_served(self, name: str | None = None) -> list[ServedModel]:
        """Every model version (of model ``name`` only, when given), by name and then version number."""
        chosen = [s for model, versions in self.models.items() if name in (None, model) for s in versions.values()]
        return sorted(chosen, key=lambda s: (s.entry.name, int(s.entry.version)))

    def _model_counters(self):
        """``(name, version, statistics, queue depth)`` of every model version, for the Prometheus collector."""
        for served in self._all_served():
            depth = served.batcher.queue_depth if served.batcher is not None else 0
            yield served.entry.name, served.entry.version, served.statistics, depth

    @property
    def accepting(self) -> bool:
        """Ready for inference: started and not draining."""
        return self.ready and not self.shutting_down

    def served(self, name: str, version: str | None) -> ServedModel:
        """The model version a request names (None or "": the highest version); RequestError(404) otherwise."""
        versions = self.models.get(name)
        if versions is None:
            raise RequestError(404, f"unknown model {name[:100]!r}; served models: {sorted(self.models)}")
        if not version:
            return versions[max(versions, key=int)]
        if version not in versions:
            raise RequestError(404, f"model '{name}' has no version {version[:20]!r}; versions: {sorted(versions, key=int)}")
        return versions[version]

    def model_metadata(self, served: ServedModel) -> dict:
        """The protocol's model metadata (name, versions, platform, inputs / outputs with -1 for dynamic axes)."""
        return {
            "name": served.entry.name,
            "versions": sorted(self.models[served.entry.name], key=int),
            "platform": "onnxruntime_onnx",
            "inputs": [spec.as_metadata() for spec in served.model.inputs],
            "outputs": [spec.as_metadata() for spec in served.model.outputs],
        }

    def model_config(self, served: ServedModel) -> dict:
        """The model's configuration as Triton's ``ModelConfig`` in JSON: the batching in use, the graph's inputs and
        outputs (``dims`` without the batch axis when ``max_batch_size > 0``), its ``reconkit.*`` metadata as
        ``parameters``. The gRPC ``ModelConfig`` call answers the same fields."""
        entry, b = served.entry, served.entry.batching
        skip = 1 if b.max_batch_size > 0 else 0

        def tensors(specs: list) -> list[dict]:
            return [{"name": spec.name, "data_type": f"TYPE_{spec.datatype}", "dims": list(spec.shape[skip:])}
                    for spec in specs]

        kind = "KIND_GPU" if "CUDAExecutionProvider" in served.model.providers else "KIND_CPU"
        config = {
            "name": entry.name, "platform": "onnxruntime_onnx", "backend": "onnxruntime",
            "max_batch_size": b.max_batch_size, "input": tensors(served.model.inputs),
            "output": tensors(served.model.outputs),
            "instance_group": [{"name": f"{entry.name}_0", "count": b.instances, "kind": kind}],
            "default_model_filename": entry.onnx_path.name,
            "parameters": {key: {"string_value": value} for key, value in served.model.metadata.items()},
        }  # fmt: skip
        if b.dynamic and b.max_batch_size > 0:
            config["dynamic_batching"] = {"max_queue_delay_microseconds": round(b.max_queue_delay_s * 1e6),
                                          "default_queue_policy": {"max_queue_size": b.max_queue_size}}
        return config

    def model_statistics(self, name: str | None, version: str | None) -> dict:
        """Triton's statistics extension answer ``{"model_stats": [...]}``: every model version without ``name``,
        every version of ``name`` without ``version``, else that one; RequestError(404) for an unknown one."""
        if not name:
            if version:
                raise RequestError(400, "statistics for a version need the model's name")
            chosen = self._all_served()
        elif version:
            chosen = [self.served(name, version)]
        else:
            self.served(name, None)  # 404 for an unknown model
            chosen = self._all_served(name)
        return {"model_stats": [s.statistics.as_json(s.entry.name, s.entry.version) for s in chosen]}

    def record_request(self, endpoint: str, status: int, seconds: float, fields: dict, error: str | None = None,
                       log_success: bool = True) -> None:
        """Count one request in the metrics and log it as one JSON line (``fields`` name it; refused ones always,
        answered ones when ``log_success``: health probes are not logged)."""
        self.metrics.observe_request(endpoint, status, seconds)
        if log_success or error is not None:
            fields = {**fields, "status": status, "latency_ms": round(seconds * 1e3, 3)}
            _log.info("request", extra=fields if error is None else {**fields, "error": error})

    async def infer(self, served: ServedModel, request: InferRequest,
                    deadline_s: float | None = None) -> dict[str, np.ndarray]:
        """Validate, queue for a batch, run and check one decoded request; the outputs by name.

        deadline_s: the transport's own time limit (gRPC deadline), on top of the server's and the request's.
        Raises RequestError: 400 bad inputs, 503 not started / queue full / draining, 504 past the timeout,
        422 non-finite outputs, 500 when ONNX Runtime fails. Either way the request is counted in the model's
        statistics (:mod:`reconkit.serve.statistics`), as a failure too when it is cancelled (its client went away).
        """
        start = time.perf_counter_ns()
        try:
            results = await self._infer(served, request, deadline_s)
        except (RequestError, asyncio.CancelledError):
            served.statistics.record_request(request.batch_size, time.perf_counter_ns() - start, ok=False)
            raise
        served.statistics.record_request(request.batch_size, time.perf_counter_ns() - start, ok=True)
        return results

    async def _infer(self, served: ServedModel, request: InferRequest,
                     deadline_s: float | None) -> dict[str, np.ndarray]:
        if served.batcher is None:
            raise RequestError(503, "server is not started yet", {"Retry-After": "1"})
        check_inputs(request, served.entry.batching.max_batch_size, served.model.spatial_sizes)
        limits = [self.config.request_timeout_s, request.timeout_s, deadline_s]
        timeout = max(0.0, min(t for t in limits if t is not None))
        try:
            results = await asyncio.wait_for(served.batcher.submit(request), timeout)
        except asyncio.TimeoutError:
            raise RequestError(504, f"model '{served.entry.name}': no result within {timeout:g} s") from None
        check_outputs(results, served.entry.name)
        return results

    async def start(self) -> None:
        for name, versions in self.models.items():
            for served in versions.values():
                served.batcher = DynamicBatcher(
                    name, served.model, served.entry.batching,
                    on_queue_depth=self.metrics.queue_depth.labels(name, served.entry.version).set,
                    on_batch=self.metrics.batch_size.labels(name, served.entry.version).observe,
                    on_executed=served.statistics.record_execution,
                )
        self.ready = True

    async def parse_header(self, json_part: bytes) -> dict:
        """A request's JSON header (:func:`~reconkit.serve.protocol.parse_header_outcome`); one longer than
        :data:`~reconkit.serve.protocol.JSON_IN_WORKER_BYTES` is parsed in a worker process (spawned on first use,
        one at a time), so that the event loop answers other requests meanwhile. RequestError 400 for what the
        parse finds (or a header too deeply nested to come back from the worker), 503 when the worker died (e.g. out
        of memory; the next request starts a new one) or when :data:`MAX_JSON_PARSES` large headers are already
        there."""
        if len(json_part) <= protocol.JSON_IN_WORKER_BYTES:
            return header_of(parse_header_outcome(json_part))
        if self._json_parses >= MAX_JSON_PARSES:
            raise RequestError(503, f"{MAX_JSON_PARSES} large JSON requests are being parsed or waiting; retry later, "
                                    "or send large tensors as binary data", {"Retry-After": "1"})
        if self._json_workers is None:
            self._json_workers = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        self._json_parses += 1
        try:
            outcome = await asyncio.get_running_loop().run_in_executor(
                self._json_workers, parse_header_outcome, json_part)
        except RecursionError as exc:  # parsed, but nested too deeply for pickle to hand the result back
            raise RequestError(400, f"request header nests too deeply ({exc})") from None
        except (BrokenProcessPool, OSError, RuntimeError) as exc:  # it died (out of memory?) or could not start
            self._json_workers = None
            raise RequestError(503, f"the JSON parsing process failed ({type(exc).__name__}); send large tensors as "
                                    "binary data") from None
        finally:
            self._json_parses -= 1
        return header_of(outcome)

    async def stop(self) -> None:
        if self._json_workers is not None:
            self._json_workers.shutdown(wait=False, cancel_futures=True)
        self.ready = False
        await asyncio.gather(*(s.batcher.close() for v in self.models.values() for s in v.values() if s.batcher))
