"""The Open Inference Protocol (KServe V2) gRPC endpoint, served next to the REST app on the same models.

``ServerConfig.grpc_address`` (``reconkit serve --grpc-port``) starts it inside the app's event loop, so the two
front ends share the models, batchers (requests from both join the same batches), limits, metrics and statistics.
Clients: ``tritonclient.grpc`` (``get_model_config`` and ``get_inference_statistics`` included), ``perf_analyzer``
and KServe's gRPC clients, unchanged (schema: :mod:`reconkit.serve.grpc_schema`).

Tensor data: ``raw_input_contents`` (one little-endian buffer per input, in input order; what tritonclient sends)
or the typed ``contents`` of each input (``fp32_contents``...). Outputs are always returned as
``raw_output_contents``. Request parameter ``timeout`` (microseconds, any numeric parameter kind) and the call's
gRPC deadline both bound the wait. Errors: the REST status maps to a gRPC code (400 INVALID_ARGUMENT, 401 UNAUTHENTICATED,
404 NOT_FOUND, 408 DEADLINE_EXCEEDED (request message not received within the client timeout), 413
RESOURCE_EXHAUSTED, 422 FAILED_PRECONDITION, 503 UNAVAILABLE, 504 DEADLINE_EXCEEDED, 500 INTERNAL) with the same
message. Messages over ``max_request_bytes`` are refused by gRPC itself (RESOURCE_EXHAUSTED) before they are read;
more than ``grpc_max_concurrent_rpcs`` calls at once likewise.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError

import reconkit
from reconkit.errors import ReconkitError
from reconkit.serve.connections import connection_cap
from reconkit.serve.grpc_schema import MESSAGES, METHODS, SERVICE
from reconkit.serve.model import TensorSpec
from reconkit.serve.protocol import (
    InferRequest,
    RequestError,
    check_all_inputs,
    check_integer_range,
    check_output_name,
    input_spec,
    little_endian_bytes,
    parse_timeout,
    tensor_shape,
    v2_datatype,
)
from reconkit.serve.state import EXTENSIONS, ServedModel, ServerState, bearer_token_ok

__all__ = ["decode_grpc_request", "encode_grpc_response", "start_grpc_server"]

_log = logging.getLogger("reconkit.serve")

_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 404: grpc.StatusCode.NOT_FOUND,
          408: grpc.StatusCode.DEADLINE_EXCEEDED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
          422: grpc.StatusCode.FAILED_PRECONDITION, 499: grpc.StatusCode.CANCELLED, 500: grpc.StatusCode.INTERNAL,
          503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
# V2 datatype -> the typed-contents field that may carry it (FP16 only travels raw)
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
             "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}
_HEALTH = {"ServerLive", "ServerReady", "ModelReady"}  # answered without a token, as the REST health endpoints
_GRPC_INT_MAX = 2**31 - 1  # grpcio's integer options are C ints (and a protobuf message is below 2 GiB anyway)


def _bad(message: str) -> RequestError:
    return RequestError(400, message)


def _tensor(spec: TensorSpec, item, raw: bytes | None) -> np.ndarray:
    shape = tensor_shape(spec, item.datatype, list(item.shape))
    count = math.prod(shape)
    if raw is not None:
        if item.HasField("contents"):
            raise _bad(f"input '{spec.name}': both raw_input_contents and contents given")
        nbytes = count * spec.dtype.itemsize
        if len(raw) != nbytes:
            raise _bad(f"input '{spec.name}': raw_input_contents holds {len(raw)} bytes, but shape {list(shape)} "
                       f"of {spec.datatype} needs {nbytes}")
        return np.frombuffer(raw, dtype=spec.dtype).reshape(shape)
    field = _CONTENTS.get(spec.datatype)
    if field is None:
        raise _bad(f"input '{spec.name}': {spec.datatype} data must be sent in raw_input_contents")
    values = getattr(item.contents, field)
    if len(values) != count:
        raise _bad(f"input '{spec.name}': contents.{field} holds {len(values)} values, shape {list(shape)} "
                   f"needs {count}")
    if spec.dtype.kind in "iu":  # int_contents carries INT8 / INT16 as int32: the cast below would wrap 300 to 44
        check_integer_range(spec, np.asarray(values), f"contents.{field}")
    return np.asarray(values, dtype=spec.dtype).reshape(shape)


def _parameter(parameters, key: str):
    if key not in parameters:
        return None
    choice = parameters[key].WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameters[key], choice)


def decode_grpc_request(message, served: ServedModel) -> InferRequest:
    """Decode and check a ``ModelInferRequest`` against the model's inputs; RequestError(400) naming the tensor."""
    model = served.model
    if not message.inputs:
        raise _bad("'inputs' must be a non-empty list of tensors")
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise _bad(f"raw_input_contents has {len(raw)} buffers for {len(message.inputs)} inputs: give every input "
                   "as a raw buffer or every input as typed contents (the protocol does not allow a mix)")
    inputs: dict[str, np.ndarray] = {}
    for index, item in enumerate(message.inputs):
        spec = input_spec(model, item.name, inputs)
        inputs[spec.name] = _tensor(spec, item, raw[index] if raw else None)
    check_all_inputs(model, inputs)
    requested = [item.name for item in message.outputs] or [spec.name for spec in model.outputs]
    for index, name in enumerate(requested):
        check_output_name(model, name, requested[:index])
    timeout = parse_timeout(_parameter(message.parameters, "timeout"))
    return InferRequest(message.id or None, inputs, dict.fromkeys(requested, True), timeout)


def encode_grpc_response(served: ServedModel, request: InferRequest, results: dict[str, np.ndarray]):
    """``ModelInferResponse`` with every requested output in ``raw_output_contents`` (little-endian, row-major)."""
    response = MESSAGES["ModelInferResponse"](model_name=served.entry.name, model_version=served.entry.version,
                                              id=request.id or "")
    for name in request.outputs:
        array = results[name]
        response.outputs.add(name=name, datatype=v2_datatype(array), shape=list(array.shape))
        response.raw_output_contents.append(little_endian_bytes(array))
    return response


class _Servicer:
    """One coroutine per rpc of :data:`reconkit.serve.grpc_schema.METHODS`; problems raise RequestError."""

    def __init__(self, state: ServerState):
        self.state = state

    async def ServerLive(self, request, context):
        return MESSAGES["ServerLiveResponse"](live=True)

    async def ServerReady(self, request, context):
        return MESSAGES["ServerReadyResponse"](ready=self.state.accepting)

    async def ModelReady(self, request, context):
        self.state.served(request.name, request.version)
        return MESSAGES["ModelReadyResponse"](ready=self.state.accepting)

    async def ServerMetadata(self, request, context):
        return MESSAGES["ServerMetadataResponse"](name="reconkit", version=reconkit.__version__, extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        served = self.state.served(request.name, request.version)
        return MESSAGES["ModelMetadataResponse"](**self.state.model_metadata(served))

    async def ModelConfig(self, request, context):
        config = self.state.model_config(self.state.served(request.name, request.version))
        return MESSAGES["ModelConfigResponse"](config=json_format.ParseDict(config, MESSAGES["ModelConfig"]()))

    async def ModelStatistics(self, request, context):
        statistics = self.state.model_statistics(request.name, request.version)
        return json_format.ParseDict(statistics, MESSAGES["ModelStatisticsResponse"]())

    async def ModelInfer(self, request, context):
        if self.state.shutting_down:
            raise RequestError(503, "server is shutting down")
        served = self.state.served(request.model_name, request.model_version)
        infer_request = decode_grpc_request(request, served)
        results = await self.state.infer(served, infer_request, context.time_remaining())
        return encode_grpc_response(served, infer_request, results)


async def _read_message(context, timeout_s: float) -> bytes:
    """The call's one request message (bytes); RequestError 408 when it has not fully arrived within ``timeout_s``
    seconds of the call's start (a stalled client would otherwise hold one of the concurrent-call slots for ever),
    400 when the client ends the call without one."""
    try:
        raw = await asyncio.wait_for(context.read(), timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(408, f"client sent no complete request message within {timeout_s:g} s") from None
    if raw is grpc.aio.EOF:
        raise RequestError(400, "the call carries no request message")
    return raw


async def _abort(context, code: grpc.StatusCode, details: str) -> None:
    """End the call with ``code`` and ``details`` (raises grpcio's AbortError, as ``context.abort`` does).

    When the call has already ended in gRPC's core, the status cannot be sent: its deadline passed or its client
    cancelled it while the server was answering (e.g. a 504 at the client's own deadline, the same instant), and
    grpcio's ExecuteBatchError (an ``InternalError``) comes out of ``abort``. Let through, grpcio logged it with a
    traceback at error level although nothing was wrong; CancelledError instead ends the handler as grpcio ends a
    call its client has left, quietly. The call was already counted and logged with the status it was to get.
    """
    try:
        await context.abort(code, details)
    except grpc.aio.InternalError:
        raise asyncio.CancelledError from None


def _wrap(state: ServerState, rpc: str, handler: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
    """Auth, reading the message within the client timeout (:func:`_read_message`), decoding (a message that does
    not parse is INVALID_ARGUMENT), RequestError -> gRPC status, metrics (endpoint ``grpc_<kind>``, the REST status)
    and one log line.

    The returned coroutine is a stream-unary handler: grpcio hands a unary handler its message only once it has
    wholly arrived, with no time limit, so the message is read here instead. On the wire the calls stay unary.
    """
    kind = "health" if rpc in _HEALTH else "infer" if rpc == "ModelInfer" else "metadata"
    token = state.config.auth_token
    message_type = MESSAGES[METHODS[rpc][0]]

    async def wrapped(_requests, context):
        start = time.perf_counter()
        status, error, response = 200, None, None
        try:
            authorization = dict(context.invocation_metadata() or ()).get("authorization", "")
            if token and rpc not in _HEALTH and not bearer_token_ok(authorization, token):
                raise RequestError(401, "missing or wrong bearer token")
            raw = await _read_message(context, state.config.client_timeout_s)
            try:
                request = message_type.FromString(raw)
            except DecodeError as exc:
                raise RequestError(400, f"request is not a valid {message_type.DESCRIPTOR.name} message: {exc}") from None
            response = await handler(request, context)
        except asyncio.CancelledError:  # the client cancelled the call or went away: no answer, but counted
            state.record_request(f"grpc_{kind}", 499, time.perf_counter() - start, {"rpc": rpc},
                                 "call cancelled before it was answered (client gone or server stopping)")
            raise
        except RequestError as exc:
            status, error = exc.status, exc.message
        except Exception as exc:  # noqa: BLE001  (never let one call take the server down)
            _log.exception("unhandled error", extra={"rpc": rpc})
            status, error = 500, f"internal error: {type(exc).__name__}: {exc}"
        state.record_request(f"grpc_{kind}", status, time.perf_counter() - start, {"rpc": rpc}, error,
                             log_success=kind != "health")
        if error is not None:
            await _abort(context, _CODES.get(status, grpc.StatusCode.UNKNOWN), error)
        return response

    return wrapped


async def start_grpc_server(state: ServerState) -> grpc.aio.Server:
    """Bind ``state.config.grpc_address`` (TLS with the config's certificate, if any), start serving (in the running
    event loop) and set ``state.grpc_port``.

    Raises ReconkitError when the address cannot be bound. Stop it with ``await server.stop(grace_seconds)``.
    """
    config = state.config
    port_text = config.grpc_address.rpartition(":")[2]
    if not (port_text.isdigit() and int(port_text) <= 65535):  # grpcio binds port 70000 as 70000 % 65536, silently
        raise ReconkitError(f"gRPC: cannot bind {config.grpc_address}: the port must be a number from 0 to 65535")
    client_timeout_ms = min(max(1, round(config.client_timeout_s * 1e3)), _GRPC_INT_MAX)
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", min(config.max_request_bytes, _GRPC_INT_MAX)),
                 ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0),
                 # stalled clients (REST: reconkit.serve.connections): at most max_connections open (grpcio closes
                 # the ones beyond); a connection that has not set up HTTP/2 (preface and SETTINGS, after TLS)
                 # within the client timeout is closed, and so is one without a call for that long (GOAWAY first)
                 ("grpc.max_allowed_incoming_connections", connection_cap(config.max_connections)),
                 ("grpc.server_handshake_timeout_ms", client_timeout_ms),
                 ("grpc.max_connection_idle_ms", client_timeout_ms)],
        maximum_concurrent_rpcs=config.grpc_max_concurrent_rpcs,
    )
    servicer = _Servicer(state)
    handlers = {
        rpc: grpc.stream_unary_rpc_method_handler(
            _wrap(state, rpc, getattr(servicer, rpc)),
            request_deserializer=None,  # bytes: _wrap reads and parses them, so a corrupt message gets INVALID_ARGUMENT
            response_serializer=MESSAGES[response].SerializeToString)
        for rpc, (_, response) in METHODS.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    try:
        if state.tls is None:
            port = server.add_insecure_port(config.grpc_address)
        else:
            credentials = grpc.ssl_server_credentials([state.tls], root_certificates=state.tls_client_ca,
                                                      require_client_auth=state.tls_client_ca is not None)
            port = server.add_secure_port(config.grpc_address, credentials)
    except RuntimeError as exc:
        raise ReconkitError(f"gRPC: cannot bind {config.grpc_address}: {exc}") from None
    if port == 0:
        raise ReconkitError(f"gRPC: cannot bind {config.grpc_address}")
    await server.start()
    state.grpc_port = port
    _log.info("gRPC endpoint started", extra={"address": config.grpc_address, "port": port})
    return server
