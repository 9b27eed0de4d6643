"""Open Inference Protocol (KServe V2) inference requests and responses, JSON and binary tensor data.

Binary tensor data extension (what ``tritonclient.http`` sends): the body is a JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw little-endian tensors, in the order of the inputs
whose ``parameters.binary_data_size`` is set. Outputs are returned the same way when the request asks for it
(``outputs[i].parameters.binary_data`` or the request parameter ``binary_data_output``).

Every problem with a request raises :class:`RequestError` with the HTTP status and a message naming the tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Container, Mapping
from typing import Any, NamedTuple

import numpy as np

from reconkit.errors import ReconkitError
from reconkit.serve.model import V2_DATATYPES, OnnxModel, TensorSpec

__all__ = ["HEADER_LENGTH", "InferRequest", "RequestError", "check_all_inputs", "check_integer_range",
           "check_output_name", "decode_infer_request", "encode_infer_response", "header_of", "input_spec",
           "little_endian_bytes", "parse_header_outcome", "parse_timeout", "split_body", "tensor_shape", "v2_datatype"]

HEADER_LENGTH = "inference-header-content-length"


class RequestError(ReconkitError):
    """A request the server refuses: ``status`` is the HTTP status, ``headers`` extra response headers."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})

    def __reduce__(self) -> tuple:
        # Exception pickles as cls(*args), and args is (message,): a TypeError when unpickled (a process pool)
        return type(self), (self.status, self.message, self.headers), self.__dict__


@dataclasses.dataclass
class InferRequest:
    """A decoded inference request.

    inputs: input name -> array with the model's dtype and the request's shape (batch first).
    outputs: output name -> whether to return it as binary data, in the order to return them.
    timeout_s: the request's own timeout (``parameters.timeout``, microseconds on the wire), or None.
    """

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: dict[str, bool]
    timeout_s: float | None

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])


def _bad(message: str) -> RequestError:
    return RequestError(400, message)


JSON_IN_WORKER_BYTES = 8 << 20
"""A JSON header longer than this is parsed in a worker process (``ServerState.parse_header``), so that the server
answers other requests meanwhile: Python's ``json`` holds the interpreter lock while it parses (a 15-coil 640 × 368
slice sent as JSON ``data`` is ~140 MiB of text and ~5 s of parsing)."""


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """``(JSON header, binary tensor data)`` of a request body, split at ``Inference-Header-Content-Length``."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        length = int(header_length)
    except ValueError:
        raise _bad(f"Inference-Header-Content-Length {header_length[:40]!r} is not an integer") from None
    if not 0 < length <= len(body):
        raise _bad(f"Inference-Header-Content-Length {length} does not fit the {len(body)}-byte body")
    return body[:length], memoryview(body)[length:]


class UnreadableData(NamedTuple):
    """An input's JSON ``data`` that is no array of numbers (ragged, or not a list): why, for the 400."""

    reason: str


def _as_array(data: Any) -> np.ndarray | UnreadableData:
    try:
        return np.asarray(data)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        return UnreadableData(str(exc))


def _holds_boolean(data: list) -> bool:
    """Whether a nested JSON list holds a boolean anywhere (numpy reads ``[0.5, true]`` as ``[0.5, 1.0]``)."""
    pending = [data]
    while pending:
        items = pending.pop()
        kinds = set(map(type, items))
        if bool in kinds:
            return True
        if list in kinds:
            pending.extend(item for item in items if type(item) is list)
    return False


def parse_header_outcome(json_part: bytes) -> tuple[str, Any]:
    """Parse a request's JSON header: ``("header", dict)``, each input's ``data`` list already an array (or
    :class:`UnreadableData`), or ``("error", message)``. Returns rather than raises, as it also runs in a worker
    process, where an exception carrying the document would travel back whole."""
    try:
        header = json.loads(json_part)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError, a number over 4300 digits
        return "error", f"request header is not valid JSON: {type(exc).__name__}: {exc}"
    if not isinstance(header, dict):
        return "error", "request header must be a JSON object"
    items = header.get("inputs")
    booleans = b"true" in json_part or b"false" in json_part  # the exact check costs ~5 % of the parse: only then
    for item in items if isinstance(items, list) else ():
        if isinstance(item, dict) and isinstance(item.get("data"), list):
            values = _as_array(item["data"])
            if booleans and isinstance(values, np.ndarray) and values.dtype.kind in "iuf" and _holds_boolean(
                    item["data"]):
                values = UnreadableData("JSON booleans among the numbers")
            item["data"] = values
    return "header", header


def header_of(outcome: tuple[str, Any]) -> dict:
    """The header of a :func:`parse_header_outcome` result; RequestError(400) for its error."""
    kind, value = outcome
    if kind == "error":
        raise _bad(value)
    return value


def _parameters(obj: dict, where: str) -> dict:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise _bad(f"{where}: 'parameters' must be a JSON object")
    return params


def input_spec(model: OnnxModel, name: Any, seen: Mapping[str, Any]) -> TensorSpec:
    """The model input an input tensor names; RequestError(400) when the name is unknown or already in ``seen``."""
    spec = model.input(name) if isinstance(name, str) else None
    if spec is None:
        raise _bad(f"unknown input tensor {repr(name)[:100]}; model expects {[s.name for s in model.inputs]}")
    if name in seen:
        raise _bad(f"input '{name}' given more than once")
    return spec


def check_all_inputs(model: OnnxModel, inputs: Mapping[str, Any]) -> None:
    """RequestError(400) listing the model inputs the request left out."""
    missing = [spec.name for spec in model.inputs if spec.name not in inputs]
    if missing:
        raise _bad(f"missing input tensor(s) {missing}; model expects {[s.name for s in model.inputs]}")


def check_output_name(model: OnnxModel, name: Any, seen: Container[str] = ()) -> None:
    """RequestError(400) when a requested output is not one of the model's, or already in ``seen`` (the outputs
    requested before it), as :func:`input_spec` does for inputs."""
    known = {spec.name for spec in model.outputs}
    if not isinstance(name, str) or name not in known:
        raise _bad(f"unknown output tensor {repr(name)[:100]}; model outputs are {sorted(known)}")
    if name in seen:
        raise _bad(f"output '{name}' requested more than once")


def tensor_shape(spec: TensorSpec, datatype: Any, shape: Any) -> tuple[int, ...]:
    """An input tensor's shape after checking its datatype and shape against ``spec``; RequestError(400) otherwise."""
    if datatype != spec.datatype:
        raise _bad(f"input '{spec.name}': datatype {repr(datatype)[:40]} not accepted, model expects {spec.datatype}")
    return _check_shape(spec, shape)


MAX_DIMENSION = 2**31 - 1  # no MRI axis comes near it; bounds what a zero-size shape could ask numpy to build


def _check_shape(spec: TensorSpec, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise _bad(f"input '{spec.name}': shape must be a list of integers, got {str(shape)[:200]}")
    if not all(1 <= d <= MAX_DIMENSION for d in shape):
        raise _bad(f"input '{spec.name}': every dimension of the shape must be between 1 and {MAX_DIMENSION}, got "
                   f"{str(shape)[:200]}")
    if len(shape) != len(spec.shape):
        raise _bad(f"input '{spec.name}': shape {str(shape)[:200]} has {len(shape)} dimensions, model expects "
                   f"{list(spec.shape)}")
    for axis, (got, want) in enumerate(zip(shape, spec.shape)):
        if want >= 0 and got != want:
            raise _bad(f"input '{spec.name}': shape {shape} has size {got} on axis {axis}, model expects {list(spec.shape)}")
    return tuple(shape)


def _tensor(spec: TensorSpec, item: dict, binary: memoryview, offset: int) -> tuple[np.ndarray, int]:
    """Decode one input; returns the array and the new offset into the binary section."""
    shape = tensor_shape(spec, item.get("datatype"), item.get("shape"))
    count = math.prod(shape)
    nbytes = count * spec.dtype.itemsize
    size = _parameters(item, f"input '{spec.name}'").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != nbytes:
            raise _bad(f"input '{spec.name}': binary_data_size {repr(size)[:40]} bytes, but shape {list(shape)} of "
                       f"{spec.datatype} needs {nbytes}")
        if offset + size > len(binary):
            raise _bad(f"input '{spec.name}': binary data ends after {len(binary) - offset} of {size} bytes")
        array = np.frombuffer(binary[offset:offset + size], dtype=spec.dtype).reshape(shape)
        return array, offset + size
    if "data" not in item:
        raise _bad(f"input '{spec.name}': neither 'data' nor parameters.binary_data_size given")
    array = _json_values(spec, item["data"])
    if array.size != count:
        raise _bad(f"input '{spec.name}': 'data' holds {array.size} values, shape {list(shape)} needs {count}")
    return array.reshape(shape), offset


_JSON_KINDS = {"f": "iuf", "i": "iu", "u": "iu", "b": "b"}  # numpy kinds of JSON values each datatype takes


def _json_values(spec: TensorSpec, data: Any) -> np.ndarray:
    """``data`` (a flat or nested JSON list) as an array of the input's dtype: JSON numbers only (no strings or
    booleans for a number type), and every value within the datatype's range."""
    values = data if isinstance(data, (np.ndarray, UnreadableData)) else _as_array(data)
    if isinstance(values, UnreadableData):
        raise _bad(f"input '{spec.name}': 'data' is not a list of {spec.datatype} numbers: {values.reason}")
    if values.dtype.kind not in _JSON_KINDS.get(spec.dtype.kind, ""):
        found = {"U": "strings", "b": "booleans", "O": "nulls, nested objects or mixed values"}.get(
            values.dtype.kind, f"{values.dtype} values")
        raise _bad(f"input '{spec.name}': 'data' must hold {spec.datatype} values as JSON "
                   f"{'booleans' if spec.dtype.kind == 'b' else 'numbers'}, got {found}")
    check_integer_range(spec, values, "'data'")
    with np.errstate(over="ignore", invalid="ignore"):
        array = values.astype(spec.dtype)
    if spec.dtype.kind == "f":  # JSON integers too: 70000 is beyond FP16
        beyond = np.isfinite(values) & ~np.isfinite(array)
        if beyond.any():
            raise _bad(f"input '{spec.name}': {int(beyond.sum())} value(s) are beyond the range of {spec.datatype} "
                       f"(largest magnitude {float(np.finfo(spec.dtype).max):.4g})")
    return array


def check_integer_range(spec: TensorSpec, values: np.ndarray, field: str) -> None:
    """RequestError(400) when an integer input's ``values`` (any shape) do not all fit its datatype, which a cast
    would wrap (300 as INT8 is 44); ``field`` names where they were sent (``'data'``, ``contents.int_contents``)."""
    if spec.dtype.kind in "iu" and values.size:
        info = np.iinfo(spec.dtype)
        if values.min() < info.min or values.max() > info.max:
            raise _bad(f"input '{spec.name}': {field} holds values outside the range of {spec.datatype}")


def _flag(params: dict, key: str, default: bool, where: str) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise _bad(f"{where}: parameter '{key}' must be true or false, got {repr(value)[:40]}")
    return value


def _requested_outputs(header: dict, model: OnnxModel) -> dict[str, bool]:
    """Output name -> as binary. No ``outputs`` (or an empty list, as gRPC): every output of the model."""
    default_binary = _flag(_parameters(header, "request"), "binary_data_output", False, "request")
    requested = header.get("outputs")
    if requested is None or requested == []:
        return {spec.name: default_binary for spec in model.outputs}
    if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
        raise _bad("'outputs' must be a list of objects")
    outputs: dict[str, bool] = {}
    for item in requested:
        name = item.get("name")
        check_output_name(model, name, outputs)
        outputs[name] = _flag(_parameters(item, f"output '{name}'"), "binary_data", default_binary, f"output '{name}'")
    return outputs


MAX_TIMEOUT_US = 2**63 - 1  # gRPC's int64_param; a larger JSON integer would overflow a float


def parse_timeout(timeout: Any) -> float | None:
    """The request parameter ``timeout`` (microseconds on the wire) in seconds; None when not given."""
    if timeout is None:
        return None
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= MAX_TIMEOUT_US:
        raise _bad(f"request parameter 'timeout' must be a positive number of microseconds up to {MAX_TIMEOUT_US}, "
                   f"got {repr(timeout)[:40]}")  # NaN fails the comparison too
    return timeout / 1e6


def decode_infer_request(header: dict, binary: memoryview, model: OnnxModel) -> InferRequest:
    """Decode and check a request, its parsed JSON header (:func:`parse_header_outcome`) and binary data
    (:func:`split_body`), against ``model``'s inputs (names, datatypes, shapes, byte lengths)."""
    items = header.get("inputs")
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise _bad("'inputs' must be a non-empty list of tensor objects")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for item in items:
        spec = input_spec(model, item.get("name"), inputs)
        inputs[spec.name], offset = _tensor(spec, item, binary, offset)
    check_all_inputs(model, inputs)
    if offset != len(binary):
        raise _bad(f"request carries {len(binary)} bytes of binary data but the inputs use {offset}")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad(f"request 'id' must be a string (it is echoed in the response), got {str(request_id)[:100]}")
    return InferRequest(request_id, inputs, _requested_outputs(header, model),
                        parse_timeout(_parameters(header, "request").get("timeout")))


def v2_datatype(array: np.ndarray) -> str:
    """The KServe V2 datatype name of ``array``'s dtype (``"FP32"``...)."""
    for datatype, dtype in V2_DATATYPES.items():
        if array.dtype == dtype:
            return datatype
    raise ReconkitError(f"output dtype {array.dtype} has no KServe V2 datatype")


def little_endian_bytes(array: np.ndarray) -> bytes:
    """The raw little-endian, row-major bytes of ``array`` (the protocol's binary tensor layout)."""
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


JSON_VALUES_PER_CALL = 1 << 14
"""Values of a JSON output encoded per ``json.dumps`` call: the C encoder holds the GIL for a whole call, so the
server's event loop (when the response is encoded in a thread) gets a turn between calls, ~10 ms apart."""


def _json_text_of(array: np.ndarray) -> str:
    """``array``'s values, row-major, as the JSON list ``json.dumps(array.ravel().tolist())`` writes (compact), in
    calls of :data:`JSON_VALUES_PER_CALL` values."""
    flat = array.ravel()
    parts = (json.dumps(flat[start : start + JSON_VALUES_PER_CALL].tolist(), separators=(",", ":"))[1:-1]
             for start in range(0, flat.size, JSON_VALUES_PER_CALL))
    return "[" + ",".join(parts) + "]"


def encode_infer_response(model_name: str, version: str, request: InferRequest,
                          results: Mapping[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """Response body and headers; binary outputs follow the JSON header (``Inference-Header-Content-Length``).

    The JSON text is what ``json.dumps(response, separators=(",", ":"))`` gives, with each JSON output's ``data``
    encoded in pieces (:func:`_json_text_of`), so that a thread encoding a large one leaves the event loop turns."""

    def compact(value: Any) -> str:
        return json.dumps(value, separators=(",", ":"))

    outputs, chunks = [], []
    for name, as_binary in request.outputs.items():
        array = results[name]
        entry: dict[str, Any] = {"name": name, "datatype": v2_datatype(array), "shape": list(array.shape)}
        if as_binary:
            data = little_endian_bytes(array)
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
            outputs.append(compact(entry))
        else:
            outputs.append(compact(entry)[:-1] + ',"data":' + _json_text_of(array) + "}")
    response = f'{{"model_name":{compact(model_name)},"model_version":{compact(version)},"outputs":[{",".join(outputs)}]'
    if request.id is not None:
        response += f',"id":{compact(request.id)}'
    header = (response + "}").encode()
    if not chunks:
        return header, {"content-type": "application/json"}
    return b"".join([header, *chunks]), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}

