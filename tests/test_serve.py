"""KServe V2 server, REST and gRPC: tritonclient round trips equal ONNX Runtime, every error path, batching, metrics,
Triton's model configuration and statistics extensions, SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.client
import importlib.metadata
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc as tritonclient_grpc
import tritonclient.http as tritonclient_http
import trustme
import yaml
from cryptography.hazmat.primitives import serialization
from google.protobuf import json_format
from google.protobuf.message import Message
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import model_config_pb2, service_pb2
from tritonclient.utils import InferenceServerException

from reconkit.cli.serve import build_parser
from reconkit.errors import ReconkitError
from reconkit.export import export_onnx
from reconkit.export.triton_repository import write_triton_repository
from reconkit.models import build_model, contract_model
from reconkit.ops import ifft2c, rss_complex
from reconkit.serve import BatchingConfig, ServerConfig, build_server, serve
from reconkit.serve.grpc_schema import MESSAGES, METHODS, SERVICE

COILS, HEIGHT, WIDTH = 3, 10, 7  # odd width on purpose


class MaskedMagnitude(torch.nn.Module):
    """Contract-shaped stand-in model: root-sum-of-squares over coils and real/imag of the masked k-space."""

    def forward(self, masked_kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        kspace = masked_kspace * mask
        return torch.sqrt((kspace**2).sum(dim=(1, 4)) + 1.0)


def export_contract_model(path: Path) -> Path:
    """ONNX contract (docs/architecture.md): masked_kspace [b, c, h, w, 2], mask [b, 1, 1, w, 1] -> image [b, h, w]."""
    torch.onnx.export(
        MaskedMagnitude(), (torch.randn(1, 2, 4, 6, 2), torch.ones(1, 1, 1, 6, 1)), str(path),
        input_names=["masked_kspace", "mask"], output_names=["image"], dynamo=False,
        dynamic_axes={"masked_kspace": {0: "batch", 1: "coils", 2: "height", 3: "width"},
                      "mask": {0: "batch", 3: "width"}, "image": {0: "batch", 1: "height", 2: "width"}},
    )
    return path


def sample(batch: int = 1, width: int = WIDTH, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    kspace = rng.standard_normal((batch, COILS, HEIGHT, width, 2)).astype(np.float32)
    mask = (rng.random((batch, 1, 1, width, 1)) < 0.5).astype(np.float32)
    return kspace, mask


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(repository: Path, **config):
    """Run the server in a thread on a free 127.0.0.1 port; yields (url, app state); stops it at the end."""
    port = free_port()
    server = build_server(ServerConfig(repository, **config), "127.0.0.1", port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield url, server.config.app.state.serve
    finally:
        server.should_exit = True
        thread.join(30)


def wait_until_queued(state, timeout_s: float = 10.0) -> None:
    """Wait until a request waits in the queue of model 'recon' version 1 (sent from another thread)."""
    deadline = time.monotonic() + timeout_s
    while state.models["recon"]["1"].batcher.queue_depth < 1 and time.monotonic() < deadline:
        time.sleep(0.01)


def post(url: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(url, timeout=30)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def get(url: str, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(url, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def json_request(kspace: np.ndarray, mask: np.ndarray, **overrides) -> dict:
    inputs = [
        {"name": "masked_kspace", "datatype": "FP32", "shape": list(kspace.shape), "data": kspace.ravel().tolist()},
        {"name": "mask", "datatype": "FP32", "shape": list(mask.shape), "data": mask.ravel().tolist()},
    ]
    return {"inputs": inputs, **overrides}


def error_of(status_body: tuple) -> tuple[int, str]:
    status, _, body = status_body
    return status, json.loads(body)["error"]


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    onnx_path = export_contract_model(root / "recon.onnx")
    write_triton_repository(onnx_path, root / "models", "recon", version=1, max_batch_size=8)
    write_triton_repository(onnx_path, root / "models", "recon", version=2, max_batch_size=8)
    return root / "models"


@pytest.fixture(scope="module")
def plain_repository(repository) -> Path:
    """The same model without config.pbtxt, so the server's BatchingConfig applies (config.pbtxt would win)."""
    version_dir = repository.parent / "plain" / "recon" / "1"
    version_dir.mkdir(parents=True)
    (version_dir / "model.onnx").write_bytes((repository / "recon" / "1" / "model.onnx").read_bytes())
    return repository.parent / "plain"


@pytest.fixture(scope="module")
def direct(repository) -> ort.InferenceSession:
    return ort.InferenceSession(str(repository / "recon" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def server(repository):
    with running_server(repository, batching=BatchingConfig(max_queue_delay_s=0.0)) as (url, state):
        yield url, state


def triton_infer(url: str, kspace: np.ndarray, mask: np.ndarray, binary: bool, model: str = "recon", **kwargs):
    client = tritonclient_http.InferenceServerClient(url)
    inputs = [tritonclient_http.InferInput("masked_kspace", list(kspace.shape), "FP32"),
              tritonclient_http.InferInput("mask", list(mask.shape), "FP32")]
    inputs[0].set_data_from_numpy(kspace, binary_data=binary)
    inputs[1].set_data_from_numpy(mask, binary_data=binary)
    outputs = [tritonclient_http.InferRequestedOutput("image", binary_data=binary)]
    try:
        return client.infer(model, inputs, outputs=outputs, **kwargs)
    finally:
        client.close()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("batch,width", [(1, WIDTH), (3, 8)])
def test_tritonclient_equals_direct_onnxruntime(server, direct, binary, batch, width):
    url, _ = server
    kspace, mask = sample(batch, width, seed=batch)
    result = triton_infer(url, kspace, mask, binary, model_version="2", request_id="r1")
    expected = direct.run(["image"], {"masked_kspace": kspace, "mask": mask})[0]
    np.testing.assert_array_equal(result.as_numpy("image"), expected)
    assert result.get_response()["model_version"] == "2" and result.get_response()["id"] == "r1"


class ZeroFilled(torch.nn.Module):
    """Zero-filled reconstruction through reconkit.ops: RSS over coils of the centred inverse FFT."""

    def forward(self, masked_kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return rss_complex(ifft2c(masked_kspace * mask), dim=1)


def test_exported_zero_filled_model_served_equals_onnxruntime_and_torch(tmp_path):
    """reconkit.export.export_onnx (MatMul FFT in the graph, two sizes, odd width) -> Triton repository -> server."""
    onnx_path = export_onnx(ZeroFilled(), tmp_path / "zf.onnx", example_shape=[(COILS, 12, 9), (COILS, 10, 8)])
    repository = tmp_path / "models"
    write_triton_repository(onnx_path, repository, "zero_filled", max_batch_size=4)
    kspace = np.random.default_rng(5).standard_normal((2, 5, 12, 9, 2)).astype(np.float32)  # other coil count
    mask = np.zeros((2, 1, 1, 9, 1), np.float32)
    mask[..., 2:7, :] = 1
    direct = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    expected = direct.run(["image"], {"masked_kspace": kspace, "mask": mask})[0]
    with running_server(repository) as (url, _):
        client = tritonclient_http.InferenceServerClient(url)
        try:
            meta = client.get_model_metadata("zero_filled")
            inputs = [tritonclient_http.InferInput("masked_kspace", list(kspace.shape), "FP32"),
                      tritonclient_http.InferInput("mask", list(mask.shape), "FP32")]
            inputs[0].set_data_from_numpy(kspace)
            inputs[1].set_data_from_numpy(mask)
            served = client.infer("zero_filled", inputs).as_numpy("image")
        finally:
            client.close()
        other_size = json_request(np.zeros((1, 2, 12, 8, 2), np.float32), np.ones((1, 1, 1, 8, 1), np.float32))
        status, error = error_of(post(url, "/v2/models/zero_filled/infer", json.dumps(other_size).encode()))
    assert meta["inputs"][0] == {"name": "masked_kspace", "datatype": "FP32", "shape": [-1, -1, -1, -1, 2]}
    np.testing.assert_array_equal(served, expected)
    eager = ZeroFilled()(torch.from_numpy(kspace), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(served, eager, rtol=1e-4, atol=1e-5)
    assert status == 400 and "height x width 12x8 is not a size the model was exported for (12x9, 10x8)" in error


def test_metadata_health_and_readiness(server):
    url, _ = server
    client = tritonclient_http.InferenceServerClient(url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("recon") and client.is_model_ready("recon", "1")
        assert not client.is_model_ready("missing")
        meta = client.get_model_metadata("recon")
        assert meta["versions"] == ["1", "2"]
        assert meta["inputs"] == [{"name": "masked_kspace", "datatype": "FP32", "shape": [-1, -1, -1, -1, 2]},
                                  {"name": "mask", "datatype": "FP32", "shape": [-1, 1, 1, -1, 1]}]
        assert meta["outputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, -1, -1]}]
        assert client.get_server_metadata()["extensions"] == ["model_configuration", "statistics", "binary_tensor_data"]
        assert client.get_model_config("recon")["max_batch_size"] == 8
    finally:
        client.close()


def test_default_outputs_and_request_level_binary_flag(server, direct):
    url, _ = server
    kspace, mask = sample()
    expected = direct.run(["image"], {"masked_kspace": kspace, "mask": mask})[0]
    status, headers, body = post(url, "/v2/models/recon/infer", json.dumps(json_request(kspace, mask)).encode())
    assert status == 200
    output = json.loads(body)["outputs"][0]
    np.testing.assert_array_equal(np.asarray(output["data"], np.float32).reshape(output["shape"]), expected)
    request = json_request(kspace, mask, parameters={"binary_data_output": True})
    status, headers, body = post(url, "/v2/models/recon/infer", json.dumps(request).encode())
    length = int(headers["inference-header-content-length"])
    assert status == 200 and json.loads(body[:length])["outputs"][0]["parameters"]["binary_data_size"] == expected.nbytes
    np.testing.assert_array_equal(np.frombuffer(body[length:], np.float32).reshape(expected.shape), expected)
    # "outputs": [] asks for every output, as no "outputs" at all (and as an empty list over gRPC)
    status, _, body = post(url, "/v2/models/recon/infer", json.dumps(json_request(kspace, mask, outputs=[])).encode())
    assert status == 200 and [o["name"] for o in json.loads(body)["outputs"]] == ["image"]
    # nested data (row-major lists of lists) and JSON integers are numbers too
    nested = json_request(kspace, mask)
    nested["inputs"][0]["data"] = kspace.tolist()
    nested["inputs"][1]["data"] = mask.astype(int).tolist()
    status, _, body = post(url, "/v2/models/recon/infer", json.dumps(nested).encode())
    output = json.loads(body)["outputs"][0]
    np.testing.assert_array_equal(np.asarray(output["data"], np.float32).reshape(output["shape"]), expected)


def binary_body(kspace: np.ndarray, mask: np.ndarray, kspace_size: int | None = None) -> tuple[bytes, dict]:
    header = {"inputs": [
        {"name": "masked_kspace", "datatype": "FP32", "shape": list(kspace.shape),
         "parameters": {"binary_data_size": kspace.nbytes if kspace_size is None else kspace_size}},
        {"name": "mask", "datatype": "FP32", "shape": list(mask.shape), "parameters": {"binary_data_size": mask.nbytes}},
    ], "outputs": [{"name": "image", "parameters": {"binary_data": True}}]}
    head = json.dumps(header).encode()
    return head + kspace.tobytes() + mask.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


def _bad_requests() -> list[tuple[str, object, str]]:
    kspace, mask = sample()
    good = json_request(kspace, mask)
    nan_kspace = kspace.copy()
    nan_kspace[0, 0, 0, 0, 0] = np.nan
    inf_mask = mask.copy()
    inf_mask[0, 0, 0, 1, 0] = np.inf
    _, wide_mask = sample(width=WIDTH + 1)
    unknown = json.loads(json.dumps(good))
    unknown["inputs"].append({"name": "extra", "datatype": "FP32", "shape": [1], "data": [0.0]})
    missing = {"inputs": good["inputs"][:1]}
    bad_dtype = json.loads(json.dumps(good))
    bad_dtype["inputs"][1]["datatype"] = "INT32"
    bad_rank = json.loads(json.dumps(good))
    bad_rank["inputs"][1]["shape"] = [1, WIDTH]
    bad_static = json.loads(json.dumps(good))
    bad_static["inputs"][0]["shape"] = [1, COILS, HEIGHT, WIDTH, 3]
    short_data = json.loads(json.dumps(good))
    short_data["inputs"][1]["data"] = short_data["inputs"][1]["data"][:-1]
    strings = json.loads(json.dumps(good))
    strings["inputs"][1]["data"] = ["a"] * WIDTH
    numeric_strings = json.loads(json.dumps(good))
    numeric_strings["inputs"][1]["data"] = ["1.0"] * WIDTH  # np.asarray(..., float32) would take these
    booleans = json.loads(json.dumps(good))
    booleans["inputs"][1]["data"] = [True] * WIDTH
    mixed_booleans = json.loads(json.dumps(good))  # numpy read [1.0, true, 0.0, ...] as [1.0, 1.0, 0.0, ...]
    mixed_booleans["inputs"][1]["data"][1] = True
    nested_booleans = json.loads(json.dumps(good))
    nested_booleans["inputs"][0]["data"] = np.asarray(nested_booleans["inputs"][0]["data"]).reshape(
        nested_booleans["inputs"][0]["shape"]).tolist()
    nested_booleans["inputs"][0]["data"][0][0][0][0][1] = False
    nulls = json.loads(json.dumps(good))
    nulls["inputs"][1]["data"] = [None] * WIDTH
    beyond_fp32 = json.loads(json.dumps(good))
    beyond_fp32["inputs"][1]["data"] = [1e39] + [1.0] * (WIDTH - 1)
    huge_empty = json.loads(json.dumps(good))  # 0 elements, so the count check passes; numpy cannot build it
    huge_empty["inputs"][0].update(shape=[1, 0, 10**30, WIDTH, 2], data=[])
    huge_dim = json.loads(json.dumps(good))
    huge_dim["inputs"][0]["shape"] = [1, 2**40, HEIGHT, WIDTH, 2]
    empty_second = sample(batch=2)[0]
    empty_second[1] = 0.0
    big_batch = json_request(*sample(batch=9))
    batch_mismatch = json_request(kspace, sample(batch=2)[1])
    return [
        ("not json", b"{", "not valid JSON"),
        ("deep json", b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        ("5000-digit number", b'{"inputs": [], "id": ' + b"9" * 5000 + b"}", "not valid JSON"),  # int() refuses it
        ("not an object", b"[1, 2]", "must be a JSON object"),
        ("no inputs", {"inputs": []}, "'inputs' must be a non-empty list"),
        ("unknown tensor", unknown, "unknown input tensor 'extra'"),
        ("missing tensor", missing, "missing input tensor(s) ['mask']"),
        ("dtype", bad_dtype, "input 'mask': datatype 'INT32' not accepted, model expects FP32"),
        ("rank", bad_rank, "input 'mask': shape [1, 7] has 2 dimensions"),
        ("static dim", bad_static, "input 'masked_kspace': shape [1, 3, 10, 7, 3] has size 3 on axis 4"),
        ("data length", short_data, "input 'mask': 'data' holds 6 values, shape [1, 1, 1, 7, 1] needs 7"),
        ("data type", strings, "input 'mask': 'data' must hold FP32 values as JSON numbers, got strings"),
        ("numeric strings", numeric_strings, "input 'mask': 'data' must hold FP32 values as JSON numbers, got strings"),
        ("booleans", booleans, "input 'mask': 'data' must hold FP32 values as JSON numbers, got booleans"),
        ("mixed booleans", mixed_booleans, "input 'mask': 'data' is not a list of FP32 numbers: JSON booleans among"),
        ("nested booleans", nested_booleans,
         "input 'masked_kspace': 'data' is not a list of FP32 numbers: JSON booleans among"),
        ("nulls", nulls, "input 'mask': 'data' must hold FP32 values as JSON numbers, got nulls"),
        ("beyond fp32", beyond_fp32, "input 'mask': 1 value(s) are beyond the range of FP32"),
        ("zero-size shape", huge_empty, "input 'masked_kspace': every dimension of the shape must be between 1 and"),
        ("huge dimension", huge_dim, "input 'masked_kspace': every dimension of the shape must be between 1 and"),
        ("nan", json_request(nan_kspace, mask), "input 'masked_kspace': 1 value(s) are NaN or infinite"),
        ("inf", json_request(kspace, inf_mask), "input 'mask': 1 value(s) are NaN or infinite"),
        ("zero kspace", json_request(empty_second, sample(batch=2)[1]),
         "input 'masked_kspace': sample 1 is all zero (no acquired data)"),
        ("zero mask", json_request(kspace, np.zeros_like(mask)), "input 'mask': sample 0 selects no k-space column"),
        ("soft mask", json_request(kspace, mask * 0.5), "input 'mask': values must be 0 or 1 (acquired columns), got 0.5"),
        ("mask width", json_request(kspace, wide_mask), "input 'mask': width 8 (axis 3) does not match 'masked_kspace' width 7"),
        ("batch limit", big_batch, "batch size 9 exceeds the model's max_batch_size 8"),
        ("batch mismatch", batch_mismatch, "inputs disagree on the batch size"),
        ("unknown output", json_request(kspace, mask, outputs=[{"name": "kspace"}]), "unknown output tensor 'kspace'"),
        ("output name not a string", json_request(kspace, mask, outputs=[{"name": ["image"]}]),
         "unknown output tensor ['image']"),
        ("repeated output", json_request(kspace, mask, outputs=[{"name": "image"}, {"name": "image"}]),
         "output 'image' requested more than once"),
        ("binary flag text", json_request(kspace, mask, outputs=[{"name": "image", "parameters": {"binary_data": "false"}}]),
         "output 'image': parameter 'binary_data' must be true or false, got 'false'"),
        ("request flag text", json_request(kspace, mask, parameters={"binary_data_output": 1}),
         "request: parameter 'binary_data_output' must be true or false, got 1"),
        ("id not a string", json_request(kspace, mask, id={"n": 1}), "request 'id' must be a string"),
        ("bad timeout", json_request(kspace, mask, parameters={"timeout": -5}), "'timeout' must be a positive number"),
        ("nan timeout", json_request(kspace, mask, parameters={"timeout": float("nan")}), "'timeout' must be a positive"),
        ("huge timeout", json_request(kspace, mask, parameters={"timeout": 10**400}), "'timeout' must be a positive"),
    ]


@pytest.mark.parametrize("name,request_body,message", _bad_requests(), ids=[c[0] for c in _bad_requests()])
def test_json_input_validation_is_400_naming_the_problem(server, name, request_body, message):
    url, _ = server
    body = request_body if isinstance(request_body, bytes) else json.dumps(request_body).encode()
    status, error = error_of(post(url, "/v2/models/recon/infer", body))
    assert status == 400 and message in error, error


def test_large_json_headers_parsed_in_a_worker_process_give_the_same_answers(server, direct, monkeypatch):
    """Above JSON_IN_WORKER_BYTES (here: every request) the header is parsed in a worker process, so the event loop
    stays free: the same image, and the same 400 for every bad request."""
    from reconkit.serve import protocol

    url, state = server
    monkeypatch.setattr(protocol, "JSON_IN_WORKER_BYTES", 0)
    kspace, mask = sample()
    expected = direct.run(["image"], {"masked_kspace": kspace, "mask": mask})[0]
    status, _, body = post(url, "/v2/models/recon/infer", json.dumps(json_request(kspace, mask)).encode())
    output = json.loads(body)["outputs"][0]
    assert status == 200 and state._json_workers is not None
    np.testing.assert_array_equal(np.asarray(output["data"], np.float32).reshape(output["shape"]), expected)
    ragged = json_request(kspace, mask)
    ragged["inputs"][0]["data"] = [[1.0, 2.0], [3.0]]
    for request_body, message in [*((b, m) for _, b, m in _bad_requests()),
                                  (ragged, "input 'masked_kspace': 'data' is not a list of FP32 numbers")]:
        body = request_body if isinstance(request_body, bytes) else json.dumps(request_body).encode()
        status, error = error_of(post(url, "/v2/models/recon/infer", body))
        assert status == 400 and message in error, error


def test_deeply_nested_large_json_headers_are_400_and_keep_the_parsing_process(server, monkeypatch):
    """A header nested a few hundred levels deep parses in the worker process, but its result then fails to travel back
    (pickle: RecursionError, a RuntimeError), which was taken for a dead worker: 503 "retry later" for a request that
    can never succeed, and a new process spawned for the next large request (found probing nesting depths while
    fuzzing headers through the worker; a range of depths, since where each step gives up depends on the stack)."""
    from reconkit.serve import protocol

    url, state = server
    monkeypatch.setattr(protocol, "JSON_IN_WORKER_BYTES", 0)
    body = json.dumps(json_request(*sample())).encode()
    assert post(url, "/v2/models/recon/infer", body)[0] == 200
    workers = state._json_workers
    for depth in range(850, 1001, 10):
        nested = b'{"parameters": {"x": ' + b"[" * depth + b"]" * depth + b'}, "inputs": []}'
        status, error = error_of(post(url, "/v2/models/recon/infer", nested))
        assert status == 400, (depth, error)
    assert state._json_workers is workers and post(url, "/v2/models/recon/infer", body)[0] == 200


def test_large_json_headers_beyond_the_parse_bound_are_503(server, monkeypatch):
    """Each large JSON request holds its body while it waits for the one parsing process; with MAX_JSON_PARSES of
    them there, the next is 503 with Retry-After (they once queued without bound), and a slot freed is taken again."""
    from reconkit.serve import protocol, state

    url, server_state = server
    monkeypatch.setattr(protocol, "JSON_IN_WORKER_BYTES", 0)
    body = json.dumps(json_request(*sample())).encode()
    monkeypatch.setattr(server_state, "_json_parses", state.MAX_JSON_PARSES)
    status, headers, answer = post(url, "/v2/models/recon/infer", body)
    assert status == 503 and "large JSON requests" in json.loads(answer)["error"]
    assert {k.lower(): v for k, v in headers.items()}["retry-after"] == "1"
    server_state._json_parses = state.MAX_JSON_PARSES - 1
    assert post(url, "/v2/models/recon/infer", body)[0] == 200 and server_state._json_parses == state.MAX_JSON_PARSES - 1


def test_wrong_method_is_a_json_405(server):
    url, _ = server
    for method, path in (("GET", "/v2/models/recon/infer"), ("POST", "/v2/models/recon"), ("POST", "/v2")):
        conn = http.client.HTTPConnection(url, timeout=30)
        try:
            conn.request(method, path, body=b"{}" if method == "POST" else None)
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        assert response.status == 405 and response.getheader("content-type") == "application/json"
        assert json.loads(body)["error"] == f"method not allowed: {method} {path}"
        assert response.getheader("allow")


def _raw_connection(url: str) -> socket.socket:
    host, port = url.split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _closed_by_server(sock: socket.socket, within_s: float) -> tuple[bool, bytes]:
    """Whether the server closes ``sock`` within ``within_s`` seconds, and what it sent before closing."""
    sock.settimeout(within_s)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
        return True, received
    except TimeoutError:
        return False, received
    except ConnectionResetError:
        return True, received


def test_stalled_clients_are_timed_out_and_connections_capped(repository):
    """Slow or stalled clients ("slowloris"): silent connections and half-sent headers are closed after the client
    timeout, a paused body gets 408; beyond max_connections the connection idle longest makes room, so a health
    probe still gets through."""
    with running_server(repository, client_timeout_s=2.0, max_connections=4, grpc_address="127.0.0.1:0") as (url, state):
        silent = _raw_connection(url)
        half_headers = _raw_connection(url)
        half_headers.sendall(b"POST /v2/models/recon/infer HTTP/1.1\r\nHost: x\r\nContent-Le")
        start = time.monotonic()
        assert _closed_by_server(silent, 10)[0] and _closed_by_server(half_headers, 10)[0]
        assert 1.8 < time.monotonic() - start < 8
        paused_body = _raw_connection(url)
        paused_body.sendall(b"POST /v2/models/recon/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        closed, answer = _closed_by_server(paused_body, 10)
        assert closed and answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"client sent no request data for 2 s (1 bytes of the body received)" in answer
        # an idle keep-alive connection gets the same time after its response
        keep_alive = http.client.HTTPConnection(url, timeout=30)
        keep_alive.request("GET", "/v2/health/live")
        assert keep_alive.getresponse().read() and _closed_by_server(keep_alive.sock, 10)[0]
        # the cap: 6 silent connections on a server that keeps 4; the oldest go, the newest and a probe get in
        sockets = []
        for _ in range(6):
            sockets.append(_raw_connection(url))
            time.sleep(0.05)
        assert get(url, "/v2/health/live")[0] == 200
        time.sleep(0.2)
        closed = [_closed_by_server(sock, 0.01)[0] for sock in sockets]  # well before the 2 s timeout
        assert closed[:3] == [True, True, True] and not any(closed[4:]), closed
        # gRPC: grpcio keeps at most max_connections too and closes the ones beyond at once
        grpc_sockets = [_raw_connection(f"127.0.0.1:{state.grpc_port}") for _ in range(6)]
        time.sleep(0.3)
        assert [_closed_by_server(sock, 0.01)[0] for sock in grpc_sockets] == [False] * 4 + [True] * 2
        for sock in (silent, half_headers, paused_body, *sockets, *grpc_sockets):
            sock.close()
        # a client that sends its request on time is served as usual
        kspace, mask = sample()
        assert triton_infer(url, kspace, mask, binary=True).as_numpy("image").shape == (1, HEIGHT, WIDTH)


def test_a_body_that_trickles_in_is_timed_out_by_its_average_rate(repository):
    """Each pause (0.4 s) shorter than the client timeout (2 s): the per-pause limit alone never fired, so 20 such
    clients held every connection slot; the body must average MIN_BODY_RATE bytes/s after the timeout."""
    with running_server(repository, client_timeout_s=2.0) as (url, _):
        trickle = _raw_connection(url)
        trickle.sendall(b"POST /v2/models/recon/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        start, answer = time.monotonic(), b""
        trickle.settimeout(0.4)
        with contextlib.suppress(OSError):  # the server closes the connection: the next send fails
            while time.monotonic() - start < 10 and not answer:
                trickle.sendall(b" ")
                with contextlib.suppress(TimeoutError):
                    answer = trickle.recv(65536)
        elapsed = time.monotonic() - start
        answer += _closed_by_server(trickle, 5)[1]  # the rest of the response, up to the close
        trickle.close()
        assert answer.startswith(b"HTTP/1.1 408 ") and b"slower than 500 bytes/s" in answer, answer
        assert 1.8 < elapsed < 6


def test_a_response_the_client_stops_reading_is_dropped_after_the_client_timeout(repository):
    """A client that sends its request and never reads the answer ("slow read"): the unsent response held its
    connection open for ever, and such connections, never chosen to make room, held the slots: every new connection
    (health probes too) was closed. A response that makes no progress for the client timeout now ends its
    connection."""
    with running_server(repository, client_timeout_s=0.5, max_connections=1) as (url, _):
        kspace, mask = np.ones((1, 1, 1000, 800, 2), np.float32), np.ones((1, 1, 1, 800, 1), np.float32)
        body, headers = binary_body(kspace, mask)
        head = json.loads(body[:int(headers["Inference-Header-Content-Length"])])
        del head["outputs"]  # the image as JSON: ~15 MB, more than the socket buffers hold
        head = json.dumps(head).encode()
        body = head + kspace.tobytes() + mask.tobytes()
        host, port = url.split(":")
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
        stalled.connect((host, int(port)))
        stalled.sendall(b"POST /v2/models/recon/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                        b"Inference-Header-Content-Length: %d\r\n\r\n%s" % (len(body), len(head), body))
        time.sleep(1.5)  # the answer is written and, 0.5 s later, its connection closed gracefully (never done)
        deadline, probes = time.monotonic() + 3.0, []
        while probes[-3:] != [200] * 3 and time.monotonic() < deadline:
            with contextlib.suppress(ConnectionError):  # closed at once while the stalled connection holds the slot
                probes.append(get(url, "/v2/health/live")[0])
            time.sleep(0.05)
        assert probes[-3:] == [200] * 3
        stalled.close()


def test_binary_byte_lengths_are_checked(server):
    url, _ = server
    kspace, mask = sample()
    body, headers = binary_body(kspace, mask, kspace_size=kspace.nbytes - 4)
    status, error = error_of(post(url, "/v2/models/recon/infer", body, headers))
    assert status == 400 and f"input 'masked_kspace': binary_data_size {kspace.nbytes - 4} bytes" in error
    body, headers = binary_body(kspace, mask)
    status, error = error_of(post(url, "/v2/models/recon/infer", body[:-4], headers))
    assert status == 400 and "input 'mask': binary data ends after" in error
    status, error = error_of(post(url, "/v2/models/recon/infer", body + b"xxxx", headers))
    assert status == 400 and "binary data but the inputs use" in error
    status, error = error_of(post(url, "/v2/models/recon/infer", body, {"Inference-Header-Content-Length": "9" * 12}))
    assert status == 400 and "does not fit" in error
    status, _, _ = post(url, "/v2/models/recon/infer", body, headers)
    assert status == 200  # the same server still answers good requests after all the bad ones


@pytest.mark.parametrize("path", ["/v2/models/nope/infer", "/v2/models/recon/versions/3/infer",
                                  "/v2/models/..%2F..%2Fetc/infer", "/v2/models/recon/versions/..%2F1/infer"])
def test_unknown_model_or_version_is_404(server, path):
    url, _ = server
    kspace, mask = sample()
    status, error = error_of(post(url, path, json.dumps(json_request(kspace, mask)).encode()))
    assert status == 404 and any(m in error for m in ("unknown model", "has no version", "no such endpoint"))


def test_concurrent_requests_are_batched_by_shape(plain_repository, direct):
    """8 concurrent requests of two widths within a 1 s window: fewer runs than requests, right answers."""
    batching = BatchingConfig(max_batch_size=8, max_queue_delay_s=1.0)
    with running_server(plain_repository, batching=batching) as (url, state):
        samples = [sample(1, WIDTH if i % 2 else WIDTH + 1, seed=i) for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda s: triton_infer(url, *s, binary=True).as_numpy("image"), samples))
        for (kspace, mask), result in zip(samples, results):
            expected = direct.run(["image"], {"masked_kspace": kspace, "mask": mask})[0]
            np.testing.assert_allclose(result, expected, rtol=1e-6)
        runs = state.metrics.batch_size.labels("recon", "1").collect()[0].samples
        count = next(s.value for s in runs if s.name.endswith("_count"))
        total = next(s.value for s in runs if s.name.endswith("_sum"))
        assert total == 8 and 2 <= count < 8  # two shapes never share a batch; at least one batch merged requests


def test_exported_unet_batches_requests_with_different_masks(tmp_path):
    """An exported U-Net behind the server: its front end transforms only the sampled lines, picked from the mask at
    run time, so concurrent requests with different masks share a batch and each gets its own image."""
    torch.manual_seed(3)
    unet = build_model("unet", in_chans=1, out_chans=1, chans=4, num_pool_layers=2).eval()
    height, width = 16, 13
    version_dir = tmp_path / "models" / "unet" / "1"  # no config.pbtxt: the server's BatchingConfig applies
    version_dir.mkdir(parents=True)
    export_onnx(unet, version_dir / "model.onnx", (COILS, height, width))
    rng = np.random.default_rng(7)
    samples = []
    for i in range(6):
        mask = (rng.random(width) < 0.15 * (i + 1)).astype(np.float32)
        mask[width // 2 - 1 : width // 2 + 2] = 1
        mask = mask.reshape(1, 1, 1, width, 1)
        samples.append((rng.standard_normal((1, COILS, height, width, 2)).astype(np.float32) * mask, mask))
    batching = BatchingConfig(max_batch_size=8, max_queue_delay_s=1.0)
    with running_server(tmp_path / "models", batching=batching) as (url, state):
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda s: triton_infer(url, *s, binary=True, model="unet").as_numpy("image"),
                                    samples))
        runs = state.metrics.batch_size.labels("unet", "1").collect()[0].samples
        count = next(s.value for s in runs if s.name.endswith("_count"))
    model = contract_model(unet)
    for (kspace, mask), result in zip(samples, results):
        with torch.no_grad():
            expected = model(torch.from_numpy(kspace), torch.from_numpy(mask)).numpy()
        assert np.linalg.norm(result - expected) <= 1e-4 * np.linalg.norm(expected)
    assert count < 6  # at least one batch held requests with different masks


def test_multi_size_model_is_served_one_session_per_size(tmp_path, count_onnx_sessions, caplog):
    """A file exported for two sizes: the server opens one session per size, each from its branch alone (ONNX
    Runtime would prepare every branch of every session), keeps height and width dynamic in the model's metadata,
    answers both sizes with the whole file's output and refuses a third with 400. A file whose branches cannot be
    cut out (node names dropped, as an ONNX optimiser may leave it) is opened whole, with a logged warning."""
    import onnx

    torch.manual_seed(5)
    varnet = build_model("varnet", num_cascades=1, sens_chans=2, sens_pools=1, chans=2, pools=1)
    exported = export_onnx(varnet, tmp_path / "two.onnx", [(32, 24), (40, 30)])
    whole = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    renamed = onnx.load(str(exported))
    for node in renamed.graph.node:
        node.name = ""
    for name, proto in (("two", onnx.load(str(exported))), ("renamed", renamed)):
        (tmp_path / "models" / name / "1").mkdir(parents=True)
        onnx.save(proto, str(tmp_path / "models" / name / "1" / "model.onnx"))
    opened = count_onnx_sessions()
    rng = np.random.default_rng(11)
    with running_server(tmp_path / "models") as (url, state):
        for name in ("two", "renamed"):
            status, body = get(url, f"/v2/models/{name}")
            assert status == 200 and json.loads(body)["inputs"][0]["shape"] == [-1, -1, -1, -1, 2]
            for height, width in ((32, 24), (40, 30)):
                mask = np.zeros((2, 1, 1, width, 1), np.float32)
                mask[..., ::3, :] = mask[..., width // 2 - 3 : width // 2 + 3, :] = 1
                kspace = rng.standard_normal((2, 3, height, width, 2)).astype(np.float32) * mask
                served = triton_infer(url, kspace, mask, binary=True, model=name).as_numpy("image")
                expected = whole.run(["image"], {"masked_kspace": kspace, "mask": mask})[0]
                np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6 * float(np.abs(expected).max()))
            body, headers = binary_body(*sample(width=24))  # 10 x 24: not exported
            status, _, raw = post(url, f"/v2/models/{name}/infer", body, headers)
            assert status == 400 and "10x24 is not a size the model was exported for (32x24, 40x30)" in raw.decode()
        graphs = {name: versions["1"].model.graphs for name, versions in state.models.items()}
    assert graphs == {"two": 2, "renamed": 1}
    assert sorted(type(model).__name__ for model in opened) == ["bytes", "bytes", "str"]  # two branches, one file
    assert any("opening the whole file" in record.getMessage() for record in caplog.records)


def test_queue_full_503_and_timeout_504(plain_repository):
    batching = BatchingConfig(max_batch_size=8, max_queue_delay_s=1.5, max_queue_size=1)
    with running_server(plain_repository, batching=batching) as (url, state):
        body = json.dumps(json_request(*sample())).encode()
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, url, "/v2/models/recon/infer", body)
            wait_until_queued(state)
            status, headers, raw = post(url, "/v2/models/recon/infer", body)
            assert status == 503 and headers["retry-after"] == "1" and "queue is full" in json.loads(raw)["error"]
            assert first.result()[0] == 200  # the queued request still completes
        timed = json.dumps(json_request(*sample(), parameters={"timeout": 100_000})).encode()  # 0.1 s, microseconds
        status, error = error_of(post(url, "/v2/models/recon/infer", timed))
        assert status == 504 and "no result within 0.1 s" in error
        assert state.models["recon"]["1"].batcher.queue_depth == 0  # the timed-out request left the queue


def test_a_client_that_disconnects_while_queued_frees_its_queue_slot(plain_repository):
    """A REST client that closes its connection while its request waits for a batch: the request leaves the queue
    (it used to hold the only slot, so the next client got 503, and then ran for nobody) and is counted as 499."""
    batching = BatchingConfig(max_batch_size=8, max_queue_delay_s=5.0, max_queue_size=1)
    with running_server(plain_repository, batching=batching) as (url, state):
        served = state.models["recon"]["1"]
        body = json.dumps(json_request(*sample())).encode()
        host, port = url.split(":")
        with socket.create_connection((host, int(port))) as client:
            client.sendall(b"POST /v2/models/recon/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                           % (len(body), body))
            wait_until_queued(state)
        deadline = time.monotonic() + 5
        while served.statistics.requests["fail"].count < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert served.batcher.queue_depth == 0
        timed = json.dumps(json_request(*sample(), parameters={"timeout": 200_000})).encode()
        assert error_of(post(url, "/v2/models/recon/infer", timed))[0] == 504  # admitted to the queue, not 503
        text = get(url, "/metrics")[1].decode()
    assert served.statistics.execution_count == 0  # nothing ran for the client that left
    assert 'reconkit_serve_errors_total{code="499",endpoint="infer"} 1.0' in text


@pytest.mark.parametrize("first", ["disconnect", "answer"])
def test_a_client_that_leaves_as_its_answer_arrives_is_counted_alike_in_metrics_and_statistics(plain_repository,
                                                                                                 first):
    """The REST client goes away in the same turn of the event loop as its answer arrives. Python 3.11's
    ``asyncio.wait_for`` then returns the answer although the inference was cancelled, so the statistics counted a
    success while the handler still answered 499, which ``/metrics`` counted as a failure (soak test: 2 of 43
    requests whose clients left after sending them). Either outcome is fine; the two counts must agree."""
    from reconkit.serve.app import _infer_while_connected
    from reconkit.serve.protocol import InferRequest, RequestError
    from reconkit.serve.state import ServerState

    state = ServerState(ServerConfig(plain_repository))
    kspace, mask = sample()
    request = InferRequest(None, {"masked_kspace": kspace, "mask": mask}, {"image": False}, None)

    async def race():
        await state.start()
        served = state.served("recon", None)
        loop = asyncio.get_running_loop()
        gone, answered = loop.create_future(), loop.create_future()

        async def submit(_):
            return await answered

        async def receive():
            await gone
            return {"type": "http.disconnect"}

        served.batcher.submit = submit
        events = {"disconnect": lambda: gone.set_result(None), "answer": lambda: answered.set_result({"image": mask})}
        loop.call_later(0.05, lambda: [events[name]() for name in sorted(events, key=lambda name: name != first)])
        try:
            return await _infer_while_connected(state, served, SimpleNamespace(receive=receive), request)
        except RequestError as exc:
            return exc.status
        finally:
            await state.stop()

    outcome = asyncio.run(race())
    counts = state.models["recon"]["1"].statistics.requests
    assert (counts["success"].count, counts["fail"].count) == ((0, 1) if outcome == 499 else (1, 0)), outcome


def test_server_timeout_504(plain_repository):
    with running_server(plain_repository, batching=BatchingConfig(max_queue_delay_s=2.0), request_timeout_s=0.2) as (url, _):
        kspace, mask = sample()
        with pytest.raises(InferenceServerException, match="no result within 0.2 s"):
            triton_infer(url, kspace, mask, binary=True)


def test_request_size_limit_413(repository):
    kspace, mask = sample()
    body, headers = binary_body(kspace, mask)
    with running_server(repository, max_request_bytes=len(body) - 1) as (url, _):
        status, error = error_of(post(url, "/v2/models/recon/infer", body, headers))
        assert status == 413 and "exceeds the limit" in error
        small_kspace, small_mask = kspace[:, :1], mask
        body, headers = binary_body(np.ascontiguousarray(small_kspace), small_mask)
        assert post(url, "/v2/models/recon/infer", body, headers)[0] == 200


def test_a_request_body_is_freed_when_its_request_ends(server):
    """The end of the body stream (a StopAsyncIteration through ``asyncio.wait_for``) left the reading frame, with
    the body twice (its chunks and their join), in a reference cycle: each request's body stayed in memory until
    Python's cyclic GC ran (``reconkit serve``: +95 MB per 46 MiB request, 1.26 GB after 14). With the GC off,
    three requests in a row leave less than one and a half bodies behind (the server keeps at most its last one)."""
    import gc
    import tracemalloc

    url, _ = server
    kspace = np.random.default_rng(0).standard_normal((1, 4, 256, 256, 2)).astype(np.float32)  # 2 MiB
    body, headers = binary_body(kspace, np.ones((1, 1, 1, 256, 1), np.float32))
    assert post(url, "/v2/models/recon/infer", body, headers)[0] == 200  # first-use allocations happen here
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        statuses = [post(url, "/v2/models/recon/infer", body, headers)[0] for _ in range(3)]
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        gc.enable()
    assert statuses == [200] * 3 and held < 1.5 * len(body), held


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request_bodies_equal_plain_ones(server, direct, algorithm):
    url, _ = server
    kspace, mask = sample(2, seed=5)
    kspace = kspace * mask  # masked k-space: mostly zeros, what compression is for
    for binary in (True, False):
        result = triton_infer(url, kspace, mask, binary, request_compression_algorithm=algorithm)
        np.testing.assert_array_equal(result.as_numpy("image"),
                                      direct.run(["image"], {"masked_kspace": kspace, "mask": mask})[0])


def test_compressed_bodies_are_bounded_and_checked(repository):
    kspace, mask = sample()
    body, headers = binary_body(kspace, mask)
    with running_server(repository, max_request_bytes=4 * len(body)) as (url, _):
        # small on the wire, over the limit once inflated: refused without inflating it all
        bomb = gzip.compress(body + bytes(1000 * len(body)))
        assert len(bomb) < 2 * len(body)
        status, error = error_of(post(url, "/v2/models/recon/infer", bomb, {**headers, "Content-Encoding": "gzip"}))
        assert status == 413 and "decompressed request body exceeds the limit" in error
        small, small_headers = binary_body(np.ascontiguousarray(kspace[:, :1]), mask)
        cases = [
            ("gzip", small[:-1], "is not valid gzip data"),
            ("gzip", gzip.compress(small)[:-12], "truncated gzip data"),
            ("deflate", zlib.compress(small) + b"extra", "5 bytes after its deflate data"),
            ("br", small, "Content-Encoding 'br' is not supported (identity, gzip, x-gzip, deflate)"),
        ]
        for encoding, payload, message in cases:
            status, error = error_of(post(url, "/v2/models/recon/infer", payload,
                                          {**small_headers, "Content-Encoding": encoding}))
            assert status == 400 and message in error, (encoding, error)
        raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        raw_deflate = raw_deflate.compress(small) + raw_deflate.flush()  # what some clients send as "deflate"
        for encoding, payload in (("gzip", gzip.compress(small)), ("deflate", zlib.compress(small)),
                                  ("x-gzip", gzip.compress(small)), ("deflate", raw_deflate), ("identity", small)):
            assert post(url, "/v2/models/recon/infer", payload,
                        {**small_headers, "Content-Encoding": encoding})[0] == 200, encoding


def _noting_the_event_loop(monkeypatch, module, name: str) -> list[bool]:
    """Wrap ``module.name`` so that each call notes whether it ran on an event loop's thread; returns the notes."""
    function, on_loop = getattr(module, name), []

    def noting(*args):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return function(*args)

    monkeypatch.setattr(module, name, noting)
    return on_loop


def test_compressed_bodies_are_inflated_off_the_event_loop(server, monkeypatch):
    """Inflating takes as long as the output is big: a 0.6 MB deflate body that inflates to the 512 MiB limit took
    3.5 s on the event loop (it was left there below 1 MiB compressed), and two clients sending such bodies held
    health probes up to 6 s. Every compressed body is now inflated in a thread."""
    from reconkit.serve import app

    url, _ = server
    on_loop = _noting_the_event_loop(monkeypatch, app, "_inflate")
    body, headers = binary_body(*sample())
    bomb = zlib.compress(bytes(64 * 2**20))  # 64 kB on the wire
    assert post(url, "/v2/models/recon/infer", gzip.compress(body), {**headers, "Content-Encoding": "gzip"})[0] == 200
    assert post(url, "/v2/models/recon/infer", bomb, {**headers, "Content-Encoding": "deflate"})[0] == 400
    assert on_loop == [False, False]


def test_responses_are_encoded_off_the_event_loop(server, monkeypatch):
    """A response whose outputs are asked for as JSON is a Python list of every value (~1 s for a batch of large
    images), which held every other client while it was encoded on the event loop; it is encoded in a thread."""
    from reconkit.serve import app

    url, _ = server
    on_loop = _noting_the_event_loop(monkeypatch, app, "encode_infer_response")
    assert post(url, "/v2/models/recon/infer", *binary_body(*sample()))[0] == 200
    assert on_loop == [False]


@pytest.mark.parametrize("values_per_call", [3, 1 << 14])
def test_json_response_text_is_json_dumps_of_the_response(monkeypatch, values_per_call):
    """The response header is assembled with each JSON output encoded in pieces (so that the thread encoding it lets
    the event loop run between pieces); the text must stay exactly ``json.dumps`` of the whole response."""
    from reconkit.serve import protocol

    monkeypatch.setattr(protocol, "JSON_VALUES_PER_CALL", values_per_call)
    rng = np.random.default_rng(0)
    results = {"image": rng.standard_normal((2, 3, 4)).astype(np.float32), "empty": np.zeros((0, 2), np.float32),
               "raw": rng.standard_normal((1, 5)).astype(np.float32)}
    for request_id in ("req-\u00e9\"1\"", None):
        request = protocol.InferRequest(request_id, {}, {"image": False, "empty": False, "raw": True}, None)
        body, headers = protocol.encode_infer_response("recon", "1", request, results)
        length = int(headers[protocol.HEADER_LENGTH])
        expected = {"model_name": "recon", "model_version": "1", "outputs": [
            {"name": "image", "datatype": "FP32", "shape": [2, 3, 4], "data": results["image"].ravel().tolist()},
            {"name": "empty", "datatype": "FP32", "shape": [0, 2], "data": []},
            {"name": "raw", "datatype": "FP32", "shape": [1, 5], "parameters": {"binary_data_size": 20}}]}
        if request_id is not None:
            expected["id"] = request_id
        assert body[:length] == json.dumps(expected, separators=(",", ":")).encode()
        assert body[length:] == results["raw"].tobytes()


def test_bearer_token_auth_401(repository):
    with running_server(repository, auth_token="s3cret") as (url, _):
        kspace, mask = sample()
        with pytest.raises(InferenceServerException, match="missing or wrong bearer token"):
            triton_infer(url, kspace, mask, binary=True)
        with pytest.raises(InferenceServerException, match="missing or wrong bearer token"):
            triton_infer(url, kspace, mask, binary=True, headers={"Authorization": "Bearer wrong"})
        assert get(url, "/metrics")[0] == 401 and get(url, "/v2/models/recon")[0] == 401
        assert get(url, "/v2/health/ready")[0] == 200  # probes need no token
        assert get(url, "/v2/models/recon/ready")[0] == 200  # model readiness neither (as gRPC's ModelReady)
        result = triton_infer(url, kspace, mask, binary=True, headers={"Authorization": "Bearer s3cret"})
        assert result.as_numpy("image").shape == (1, HEIGHT, WIDTH)


def test_spatial_sizes_nested_thousands_deep_open_the_whole_file(tmp_path):
    """``reconkit.spatial_sizes`` of arrays nested 100 000 deep (a model file from elsewhere) stopped the server's
    start with a RecursionError traceback; like other sizes it cannot use, it opens the file as one session."""
    import onnx

    from reconkit.serve.model import OnnxModel

    proto = onnx.load(str(export_onnx(ZeroFilled(), tmp_path / "zf.onnx", example_shape=(COILS, 12, 9))))
    next(entry for entry in proto.metadata_props if entry.key == "reconkit.spatial_sizes").value = (
        "[" * 100_000 + "]" * 100_000)
    onnx.save(proto, str(tmp_path / "deep.onnx"))
    assert OnnxModel(tmp_path / "deep.onnx").graphs == 1


def test_onnxruntime_failure_is_500_and_server_carries_on(tmp_path):
    """A graph that fails at run time for some sizes (Reshape to [-1, 10, 7]): 500 naming it, next request works."""
    from onnx import TensorProto, helper, numpy_helper, save

    kspace = helper.make_tensor_value_info("masked_kspace", TensorProto.FLOAT, ["b", "c", "h", "w", 2])
    mask = helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["b", 1, 1, "w", 1])
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["b", "h", "w"])
    nodes = [helper.make_node("Mul", ["masked_kspace", "mask"], ["masked"]),
             helper.make_node("ReduceSum", ["masked", "axes"], ["summed"], keepdims=0),
             helper.make_node("Reshape", ["summed", "shape"], ["image"])]
    constants = [numpy_helper.from_array(np.array([1, 4], np.int64), "axes"),
                 numpy_helper.from_array(np.array([-1, 10, 7], np.int64), "shape")]
    graph = helper.make_graph(nodes, "fragile", [kspace, mask], [image], initializer=constants)
    (tmp_path / "fragile" / "1").mkdir(parents=True)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "fragile/1/model.onnx"))
    with running_server(tmp_path) as (url, _):
        bad = json_request(*sample(width=6))
        status, error = error_of(post(url, "/v2/models/fragile/infer", json.dumps(bad).encode()))
        assert status == 500 and "inference failed" in error and "Reshape" in error
        status, _, body = post(url, "/v2/models/fragile/infer", json.dumps(json_request(*sample())).encode())
        assert status == 200 and json.loads(body)["outputs"][0]["shape"] == [1, HEIGHT, WIDTH]


def test_non_finite_output_is_422_never_nan_in_json(tmp_path):
    """A model that returns NaN for some inputs (sqrt of a signed sum): 422 naming the output, not a 200 whose JSON
    holds NaN (not JSON at all for strict parsers); the next request is answered."""
    from onnx import TensorProto, helper, numpy_helper, save

    kspace = helper.make_tensor_value_info("masked_kspace", TensorProto.FLOAT, ["b", "c", "h", "w", 2])
    mask = helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["b", 1, 1, "w", 1])
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["b", "h", "w"])
    nodes = [helper.make_node("Mul", ["masked_kspace", "mask"], ["masked"]),
             helper.make_node("ReduceSum", ["masked", "axes"], ["summed"], keepdims=0),
             helper.make_node("Sqrt", ["summed"], ["image"])]
    graph = helper.make_graph(nodes, "signed_sqrt", [kspace, mask], [image],
                              initializer=[numpy_helper.from_array(np.array([1, 4], np.int64), "axes")])
    (tmp_path / "signed_sqrt" / "1").mkdir(parents=True)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "signed_sqrt/1/model.onnx"))
    with running_server(tmp_path) as (url, _):
        kspace_in, mask_in = sample()
        for binary in (False, True):  # binary outputs would carry NaN bytes just as well
            body = json_request(-np.abs(kspace_in), mask_in, parameters={"binary_data_output": binary})
            status, error = error_of(post(url, "/v2/models/signed_sqrt/infer", json.dumps(body).encode()))
            assert status == 422, error
            assert "output 'image' holds" in error and "NaN / inf" in error
        status, _, body = post(url, "/v2/models/signed_sqrt/infer", json.dumps(json_request(np.abs(kspace_in), mask_in)).encode())
        assert status == 200 and np.isfinite(json.loads(body)["outputs"][0]["data"]).all()


def test_outputs_a_request_did_not_ask_for_do_not_fail_it_in_a_shared_batch(tmp_path):
    """Requests batched together are run for the union of their outputs; the NaN / inf check looked at all of them, so
    a request asking only for a finite output got 422 for another output that a batch neighbour had asked for (alone
    it got 200; found by reading the batcher while fuzzing output selections)."""
    from onnx import TensorProto, helper, save

    from reconkit.serve.protocol import InferRequest, RequestError
    from reconkit.serve.state import ServerState

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 3]) for name in ("same", "log")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["same"]), helper.make_node("Log", ["x"], ["log"])],
                              "two_outputs", [x], outputs)
    (tmp_path / "two" / "1").mkdir(parents=True)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "two/1/model.onnx"))
    state = ServerState(ServerConfig(tmp_path, batching=BatchingConfig(max_queue_delay_s=0.2)))
    negative = InferRequest(None, {"x": np.array([[-1.0, 2.0, 3.0]], np.float32)}, {"same": False}, None)
    positive = InferRequest(None, {"x": np.array([[1.0, 2.0, 3.0]], np.float32)}, {"log": False}, None)

    async def both() -> list:
        await state.start()
        try:
            served = state.served("two", None)
            return await asyncio.gather(state.infer(served, negative), state.infer(served, positive),
                                        return_exceptions=True)
        finally:
            await state.stop()

    results = asyncio.run(both())
    assert not any(isinstance(result, RequestError) for result in results), results
    np.testing.assert_array_equal(results[0]["same"], negative.inputs["x"])
    np.testing.assert_allclose(results[1]["log"], np.log(positive.inputs["x"]))
    assert state.models["two"]["1"].statistics.execution_count == 1  # one batch of both


def test_metrics_count_requests_errors_and_batches(repository, caplog):
    caplog.set_level("INFO", logger="reconkit.serve")
    with running_server(repository) as (url, _):
        kspace, mask = sample()
        for _ in range(3):
            triton_infer(url, kspace, mask, binary=True)
        post(url, "/v2/models/recon/infer", b"{")
        post(url, "/v2/models/nope/infer", b"{}")
        get(url, "/v2/nope")  # refused by the router itself: were neither counted nor logged (found by fuzzing)
        get(url, "/v2/models/recon/infer")
        status, body = get(url, "/metrics")
        text = body.decode()
    assert status == 200
    assert 'reconkit_serve_errors_total{code="404",endpoint="other"} 1.0' in text
    assert 'reconkit_serve_errors_total{code="405",endpoint="other"} 1.0' in text
    logged = [(r.method, r.path, r.status) for r in caplog.records if r.getMessage() == "request" and r.status >= 404]
    assert ("GET", "/v2/nope", 404) in logged and ("GET", "/v2/models/recon/infer", 405) in logged
    assert 'reconkit_serve_requests_total{code="200",endpoint="infer"} 3.0' in text
    assert 'reconkit_serve_errors_total{code="400",endpoint="infer"} 1.0' in text
    assert 'reconkit_serve_errors_total{code="404",endpoint="infer"} 1.0' in text
    assert 'reconkit_serve_request_latency_seconds_count{endpoint="infer"} 5.0' in text
    assert 'reconkit_serve_batch_size_count{model="recon",version="2"} 3.0' in text
    assert 'reconkit_serve_queue_depth{model="recon",version="2"} 0.0' in text


def test_model_config_is_tritons_model_config(server, direct, plain_repository):
    """GET .../config parses with Triton's own ModelConfig schema (an unknown field or enum name would raise) and
    says what the server does: dims without the batch axis, the batching in use, the graph's metadata."""
    url, _ = server
    client = tritonclient_http.InferenceServerClient(url)
    try:
        config = json_format.ParseDict(client.get_model_config("recon", "1"), model_config_pb2.ModelConfig())
    finally:
        client.close()
    tensors = [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims))
               for t in [*config.input, *config.output]]
    assert tensors == [("masked_kspace", "TYPE_FP32", [-1, -1, -1, 2]), ("mask", "TYPE_FP32", [1, 1, -1, 1]),
                       ("image", "TYPE_FP32", [-1, -1])]
    assert (config.name, config.platform, config.backend, config.max_batch_size) == ("recon", "onnxruntime_onnx",
                                                                                     "onnxruntime", 8)
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 64
    assert [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [
        (1, "KIND_CPU")]
    metadata = direct.get_modelmeta().custom_metadata_map
    assert {k: v.string_value for k, v in config.parameters.items()} == dict(metadata)
    with running_server(plain_repository, batching=BatchingConfig(max_batch_size=0)) as (plain_url, _):
        status, body = get(plain_url, "/v2/models/recon/config")
    unbatched = json_format.ParseDict(json.loads(body), model_config_pb2.ModelConfig())
    assert status == 200 and unbatched.max_batch_size == 0 and not unbatched.HasField("dynamic_batching")
    assert list(unbatched.input[0].dims) == [-1, -1, -1, -1, 2]  # no batching: the batch axis is part of the dims


def test_statistics_count_requests_runs_queue_and_compute(plain_repository):
    """Triton's statistics extension after 4 concurrent requests (batched within a 0.5 s window), one of batch 2
    and one refused: counts add up, the window shows as queue time, per-run stats sum to the runs."""
    batching = BatchingConfig(max_batch_size=8, max_queue_delay_s=0.5)
    with running_server(plain_repository, batching=batching) as (url, _):
        before_ms = time.time() * 1e3
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: triton_infer(url, *sample(seed=i), binary=True), range(4)))
        triton_infer(url, *sample(2, seed=9), binary=True)
        kspace, mask = sample()
        kspace[0, 0, 0, 0, 0] = np.nan
        assert post(url, "/v2/models/recon/infer", json.dumps(json_request(kspace, mask)).encode())[0] == 400
        status, body = get(url, "/v2/models/recon/stats")
        after_ms = time.time() * 1e3
        scraped = {sample.name: sample for family in text_string_to_metric_families(get(url, "/metrics")[1].decode())
                   for sample in family.samples if sample.name.startswith("nv_")}
        client = tritonclient_http.InferenceServerClient(url)
        try:
            every, one = client.get_inference_statistics(), client.get_inference_statistics("recon", "1")
            assert every == one == json.loads(body)
        finally:
            client.close()
    assert status == 200
    (stats,) = json.loads(body)["model_stats"]
    requests, runs = stats["inference_stats"], stats["batch_stats"]
    assert (stats["name"], stats["version"], stats["inference_count"]) == ("recon", "1", 6)
    assert requests["success"]["count"] == 5 and requests["fail"]["count"] == 1 and requests["fail"]["ns"] > 0
    assert 2 <= stats["execution_count"] < 5  # at least two of the concurrent requests shared a run
    assert sum(run["compute_infer"]["count"] for run in runs) == stats["execution_count"]
    assert sum(run["batch_size"] * run["compute_infer"]["count"] for run in runs) == 6
    for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert requests[phase]["count"] == 5, phase  # every answered request was queued and run; the refused one not
    assert requests["queue"]["ns"] >= 0.4e9  # the first of the concurrent requests waited out the 0.5 s window
    assert requests["success"]["ns"] >= requests["queue"]["ns"] + requests["compute_infer"]["ns"] > 0
    assert before_ms <= stats["last_inference"] <= after_ms
    # the same counters under NVIDIA Triton's Prometheus names, for dashboards written for Triton
    assert all(sample.labels == {"model": "recon", "version": "1"} for sample in scraped.values())
    assert {name: sample.value for name, sample in scraped.items()} == {
        "nv_inference_request_success": 5, "nv_inference_request_failure": 1, "nv_inference_count": 6,
        "nv_inference_exec_count": stats["execution_count"],
        "nv_inference_request_duration_us": requests["success"]["ns"] // 1000,
        **{f"nv_inference_{phase}_duration_us": requests[phase]["ns"] // 1000
           for phase in ("queue", "compute_input", "compute_infer", "compute_output")},
        "nv_inference_pending_request_count": 0}


def test_statistics_endpoints_select_models_and_versions(server):
    url, _ = server

    def listed(path: str) -> list[tuple[str, str]]:
        status, body = get(url, path)
        assert status == 200, body
        return [(entry["name"], entry["version"]) for entry in json.loads(body)["model_stats"]]

    assert listed("/v2/models/stats") == listed("/v2/models/recon/stats") == [("recon", "1"), ("recon", "2")]
    assert listed("/v2/models/recon/versions/2/stats") == [("recon", "2")]
    for path, message in (("/v2/models/nope/stats", "unknown model 'nope'"),
                          ("/v2/models/recon/versions/3/stats", "has no version '3'")):
        status, body = get(url, path)
        assert status == 404 and message in json.loads(body)["error"]


def wait_until_ready(process: subprocess.Popen, url: str, log_path: Path, timeout_s: float = 60.0) -> None:
    """Wait until the server process at ``url`` answers /v2/health/ready with 200; fail with its log if it exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
        with contextlib.suppress(OSError):
            if get(url, "/v2/health/ready")[0] == 200:
                return
        time.sleep(0.1)


def test_sigterm_mid_load_answers_every_accepted_request(plain_repository, tmp_path):
    """40 requests, 4 concurrent; SIGTERM once 10 are answered and a request has waited >= 50 ms in the server's
    300 ms batching window. Every request in flight then must get a complete, correct 200; every other request
    either got one or was refused before the server accepted it (no response bytes at all); the process exits 0."""
    port = free_port()
    log_path = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "reconkit", "serve", "--model-repository", str(plain_repository),
           "--port", str(port), "--max-queue-delay-ms", "300", "--max-batch-size", "8"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"127.0.0.1:{port}"
    try:
        wait_until_ready(process, url, log_path)
        kspace, mask = sample()
        expected = np.sqrt(((kspace * mask) ** 2).sum(axis=(1, 4)) + 1.0)
        body, headers = binary_body(kspace, mask)
        sent_at: dict[int, float] = {}  # requests sent and not yet finished
        outcomes: dict[int, str] = {}

        def one(i: int) -> None:
            sent_at[i] = time.monotonic()
            try:
                status, response_headers, raw = post(url, "/v2/models/recon/infer", body, headers)
            except (ConnectionRefusedError, ConnectionResetError, http.client.RemoteDisconnected):
                outcomes[i] = "refused"
                return
            finally:
                sent_at.pop(i)
            if status != 200:
                outcomes[i] = f"status {status}: {raw[:200]!r}"
                return
            length = int(response_headers["inference-header-content-length"])  # IncompleteRead would fail the test
            image = np.frombuffer(raw[length:], np.float32).reshape(expected.shape)
            outcomes[i] = "ok" if np.allclose(image, expected, rtol=1e-5) else "wrong result"

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(one, i) for i in range(40)]
            while True:
                now = time.monotonic()
                waiting = [i for i, t in list(sent_at.items()) if now - t >= 0.05]
                if len(outcomes) >= 10 and waiting:
                    process.send_signal(signal.SIGTERM)
                    break
                assert len(outcomes) < 40, "load finished before SIGTERM could be sent"
                time.sleep(0.005)
            for future in futures:
                future.result()
        assert process.wait(60) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    assert all(outcomes[i] == "ok" for i in waiting), (waiting, outcomes)
    assert set(outcomes.values()) <= {"ok", "refused"}, outcomes
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert any(entry.get("message") == "request" and entry.get("status") == 200 for entry in lines)



_SLOW_LOAD = """
import pathlib, time
from reconkit.serve import model

_load = model.OnnxModel.__init__


def _slow_load(self, *args, **kwargs):  # a model that takes a minute to load
    pathlib.Path({flag!r}).touch()
    time.sleep(60)
    _load(self, *args, **kwargs)


model.OnnxModel.__init__ = _slow_load
"""


def test_sigterm_while_models_load_stops_the_server(plain_repository, tmp_path):
    """While its models loaded, `reconkit serve` had no SIGTERM handler. A plain process died of the signal (return
    code -15), but as a container's PID 1 (deploy/Dockerfile's exec-form ENTRYPOINT), which ignores the signals it
    has no handler for, the SIGTERM was lost: the server loaded, served, and was stopped only by SIGKILL at the end
    of the grace period. Now the CLI's handler ends it at once, exit status 143."""
    site = tmp_path / "site"
    site.mkdir()
    flag = tmp_path / "loading"
    (site / "sitecustomize.py").write_text(_SLOW_LOAD.format(flag=str(flag)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "reconkit", "serve", "--model-repository", str(plain_repository), "--port",
           str(free_port())]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        while not flag.exists():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 128 + signal.SIGTERM, process.communicate()[0]
    finally:
        if process.poll() is None:
            process.kill()


_BLOCKER = """
import importlib.abc, sys

BLOCKED = frozenset({blocked!r})


class NotInTheServingImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not installed in deploy/Dockerfile)", name=name)
        return None


sys.meta_path.insert(0, NotInTheServingImage())
"""


def _distribution_name(requirement: str) -> str:
    """``"jsonargparse[signatures]>=4.27"`` -> ``"jsonargparse"``; PEP 503 normalised."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9][A-Za-z0-9_.-]*", requirement.strip()).group(0)).lower()


def _distribution_closure(requirements: list[str]) -> set[str]:
    """Normalised names of the installed distributions ``requirements`` need, with what those need in turn
    (extras' requirements left out)."""
    seen: set[str] = set()
    todo = [_distribution_name(r) for r in requirements]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            todo += [_distribution_name(r) for r in importlib.metadata.requires(current) or () if "extra ==" not in r]
    return seen


def image_requirements(dockerfile: str) -> list[str]:
    """The requirements of the ``pip install`` command that a file in deploy/ runs before installing reconkit."""
    text = (Path(__file__).resolve().parents[1] / "deploy" / dockerfile).read_text()
    return re.findall(r'"([^"]+)"', re.search(r"pip install (.*?)&&", text, re.S).group(1))


def serving_image_blocked_modules() -> set[str]:
    """Top-level modules that reconkit's installed dependencies bring but deploy/Dockerfile's ``pip install``
    line does not (the image installs reconkit itself with ``--no-deps``)."""
    image = _distribution_closure(image_requirements("Dockerfile"))
    project = [r for r in importlib.metadata.requires("reconkit") if "extra ==" not in r]
    missing = _distribution_closure(project) - image
    return {module for module, dists in importlib.metadata.packages_distributions().items()
            if module.isidentifier() and not module.startswith("_") and all(_distribution_name(d) in missing for d in dists)}


def test_serving_image_packages_are_enough_for_rest_and_grpc(repository, direct, tmp_path):
    """deploy/Dockerfile (and Dockerfile.cuda) install reconkit with --no-deps beside a short package list. Run its
    entry point, REST and gRPC, with every other dependency unimportable: it starts, answers both protocols with
    ONNX Runtime's result and exits 0 on SIGTERM (a missing package would be an ImportError in the container)."""
    cuda = [r.replace("onnxruntime-gpu", "onnxruntime") for r in image_requirements("Dockerfile.cuda")]
    assert cuda == image_requirements("Dockerfile")  # the same packages, ONNX Runtime's CUDA build in the CUDA image
    blocked = serving_image_blocked_modules()
    assert {"torch", "h5py", "scipy", "lightning", "yaml", "tensorboard"} <= blocked, sorted(blocked)
    assert not {"onnxruntime", "numpy", "starlette", "uvicorn", "grpc", "google"} & blocked
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOCKER.format(blocked=sorted(blocked)))
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode == 1 and "not installed in deploy/Dockerfile" in probe.stderr, probe.stderr
    port, grpc_port = free_port(), free_port()
    log_path = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "reconkit", "serve", "--model-repository", str(repository), "--host", "127.0.0.1",
           "--port", str(port), "--grpc-port", str(grpc_port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"127.0.0.1:{port}"
    try:
        wait_until_ready(process, url, log_path)
        kspace, mask = sample(2, seed=9)
        expected = direct.run(["image"], {"masked_kspace": kspace, "mask": mask})[0]
        np.testing.assert_array_equal(triton_infer(url, kspace, mask, binary=True).as_numpy("image"), expected)
        response = grpc_call(f"127.0.0.1:{grpc_port}", "ModelInfer", grpc_request(json_request(kspace, mask)))
        image = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(list(response.outputs[0].shape))
        np.testing.assert_array_equal(image, expected)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in log_path.read_text()



def test_kserve_manifest_probes_match_the_server_and_allow_for_model_loading():
    """deploy/kserve/inferenceservice.yaml: its args, after deploy/Dockerfile's ENTRYPOINT (Kubernetes' ``args``
    replace only the CMD), parse as `reconkit serve` options, and the container port and every probe use the REST
    port they give. That port opens only once the models are loaded (the bundled model: 39 s on a busy 2-vCPU VM),
    so a startup probe must hold the liveness probe back: without one, its 3 failures 10 s apart restarted the
    container before it could serve, for ever. The Dockerfile's HEALTHCHECK likewise needs a start period."""
    deploy = Path(__file__).resolve().parents[1] / "deploy"
    manifest = yaml.safe_load((deploy / "kserve" / "inferenceservice.yaml").read_text())
    (container,) = manifest["spec"]["predictor"]["containers"]
    dockerfile = (deploy / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.*)$", dockerfile, re.M).group(1))
    assert entrypoint[:2] == ["reconkit", "serve"]
    args = build_parser().parse_args(entrypoint[2:] + container["args"])
    assert [port["containerPort"] for port in container["ports"]] == [args.port]
    probes = {kind: container[f"{kind}Probe"] for kind in ("startup", "readiness", "liveness")}
    assert {kind: (probe["httpGet"]["path"], probe["httpGet"]["port"]) for kind, probe in probes.items()} == {
        "startup": ("/v2/health/live", args.port), "readiness": ("/v2/health/ready", args.port),
        "liveness": ("/v2/health/live", args.port)}
    assert probes["startup"]["periodSeconds"] * probes["startup"]["failureThreshold"] >= 300
    cmd = json.loads(re.search(r"^CMD (.*)$", dockerfile, re.M).group(1))
    healthcheck = re.search(r"^HEALTHCHECK (.*)$", dockerfile, re.M).group(1)
    assert "--start-period=300s" in healthcheck
    assert f":{build_parser().parse_args(entrypoint[2:] + cmd).port}/v2/health/ready" in healthcheck


# ---- gRPC endpoint (ServerConfig.grpc_address / reconkit serve --grpc-port) ----------------------------------------

def grpc_call(address: str, rpc: str, message, metadata=None, timeout: float = 30.0, compression=None):
    """One unary call with reconkit's own message classes (no tritonclient): the raw protocol, typed contents."""
    request_type, response_type = METHODS[rpc]
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/{SERVICE}/{rpc}", request_serializer=MESSAGES[request_type].SerializeToString,
                                   response_deserializer=MESSAGES[response_type].FromString)
        return call(message, metadata=metadata, timeout=timeout, compression=compression)


def grpc_request(body: dict, model: str = "recon", version: str = ""):
    """The JSON request ``body`` as a ModelInferRequest with typed contents (fp32_contents / int_contents)."""
    message = MESSAGES["ModelInferRequest"](model_name=model, model_version=version)
    for item in body["inputs"]:
        tensor = message.inputs.add(name=item["name"], datatype=item["datatype"], shape=item["shape"])
        if item["datatype"] == "FP32":
            tensor.contents.fp32_contents.extend(item["data"])
        else:
            tensor.contents.int_contents.extend(int(v) for v in item["data"])
    for item in body.get("outputs", []):
        message.outputs.add(name=item["name"])
    for key, value in body.get("parameters", {}).items():
        message.parameters[key].int64_param = value
    return message


@pytest.fixture(scope="module")
def grpc_server(repository):
    with running_server(repository, batching=BatchingConfig(max_queue_delay_s=0.0),
                        grpc_address="127.0.0.1:0") as (url, state):
        yield url, f"127.0.0.1:{state.grpc_port}"


@pytest.mark.parametrize("batch,width", [(1, WIDTH), (3, 8)])
def test_grpc_tritonclient_equals_direct_onnxruntime(grpc_server, direct, batch, width):
    _, address = grpc_server
    kspace, mask = sample(batch, width, seed=batch)
    client = tritonclient_grpc.InferenceServerClient(address)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("recon", "1")
        meta = client.get_model_metadata("recon", as_json=True)
        inputs = [tritonclient_grpc.InferInput("masked_kspace", list(kspace.shape), "FP32"),
                  tritonclient_grpc.InferInput("mask", list(mask.shape), "FP32")]
        inputs[0].set_data_from_numpy(kspace)
        inputs[1].set_data_from_numpy(mask)
        result = client.infer("recon", inputs, model_version="2", request_id="g1",
                              outputs=[tritonclient_grpc.InferRequestedOutput("image")])
        compressed = [client.infer("recon", inputs, compression_algorithm=algorithm).as_numpy("image")
                      for algorithm in ("gzip", "deflate")]  # gRPC's own message compression
        with pytest.raises(InferenceServerException, match="unknown model 'missing'"):
            client.is_model_ready("missing")
    finally:
        client.close()
    assert meta["versions"] == ["1", "2"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"][0] == {"name": "masked_kspace", "datatype": "FP32", "shape": ["-1", "-1", "-1", "-1", "2"]}
    expected = direct.run(["image"], {"masked_kspace": kspace, "mask": mask})[0]
    np.testing.assert_array_equal(result.as_numpy("image"), expected)
    for image in compressed:
        np.testing.assert_array_equal(image, expected)
    response = result.get_response(as_json=True)
    assert response["model_version"] == "2" and response["id"] == "g1"


def test_grpc_typed_contents_equal_rest(grpc_server, direct):
    """A KServe-style client that sends typed fp32_contents: same image as the REST JSON request and ORT."""
    url, address = grpc_server
    kspace, mask = sample(2, seed=4)
    response = grpc_call(address, "ModelInfer", grpc_request(json_request(kspace, mask)))
    (output,) = response.outputs
    image = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(list(output.shape))
    status, _, body = post(url, "/v2/models/recon/infer", json.dumps(json_request(kspace, mask)).encode())
    assert status == 200
    rest = json.loads(body)["outputs"][0]
    np.testing.assert_array_equal(image, direct.run(["image"], {"masked_kspace": kspace, "mask": mask})[0])
    np.testing.assert_array_equal(image, np.asarray(rest["data"], np.float32).reshape(rest["shape"]))
    assert output.name == "image" and output.datatype == "FP32" and response.model_version == "2"
    assert grpc_call(address, "ServerMetadata", MESSAGES["ServerMetadataRequest"]()).name == "reconkit"


_JSON_ONLY = {"not json", "deep json", "5000-digit number", "not an object", "data type", "numeric strings", "booleans", "nulls",
              "mixed booleans", "nested booleans",
              "beyond fp32", "zero-size shape", "binary flag text", "request flag text",
              "output name not a string", "id not a string", "nan timeout", "huge timeout"}  # no gRPC counterpart
# (its names and id are strings, its timeout an int64)
_GRPC_MESSAGES = {"data length": "input 'mask': contents.fp32_contents holds 6 values, shape [1, 1, 1, 7, 1] needs 7"}
_GRPC_CASES = [c for c in _bad_requests() if c[0] not in _JSON_ONLY]


@pytest.mark.parametrize("name,request_body,message", _GRPC_CASES, ids=[c[0] for c in _GRPC_CASES])
def test_grpc_bad_input_is_invalid_argument_with_the_rest_message(grpc_server, name, request_body, message):
    _, address = grpc_server
    with pytest.raises(grpc.RpcError) as caught:
        grpc_call(address, "ModelInfer", grpc_request(request_body))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _GRPC_MESSAGES.get(name, message) in caught.value.details(), caught.value.details()


def test_long_client_values_are_cut_short_in_error_messages(grpc_server):
    """Names, datatypes and parameters a client sent are echoed in the error (and the log line) at most ~100
    characters long: a 100 kB input name came back whole over REST, and over gRPC it overflowed the client's
    16 KiB limit on trailers, so the call failed with RESOURCE_EXHAUSTED and no reason instead of INVALID_ARGUMENT."""
    url, address = grpc_server
    kspace, mask = sample()
    long = "x" * 100_000
    cases = [{"inputs": [{"name": long, "datatype": "FP32", "shape": [1], "data": [0.0]}]},
             json_request(kspace, mask, outputs=[{"name": long}]),
             json_request(kspace, mask, outputs=[{"name": "image", "parameters": {"binary_data": long}}]),
             json_request(kspace, mask, parameters={"binary_data_output": long})]
    for changed in ({"datatype": long}, {"shape": [1] * 100_000}, {"parameters": {"binary_data_size": long}}):
        cases.append(json_request(kspace, mask))
        cases[-1]["inputs"][1].update(changed)
    for case in cases:
        status, error = error_of(post(url, "/v2/models/recon/infer", json.dumps(case).encode()))
        assert status == 400 and len(error) < 500, error[:300]
    # headers of 10 kB: uvicorn's HTTP parser (h11) refuses a header block that arrives in pieces beyond 16 KiB with
    # its own 400 and closes at once, so 100 kB headers got a connection reset whenever the machine was busy enough
    # to read the request in two parts
    for headers in ({"Content-Encoding": long[:10_000]}, {"Inference-Header-Content-Length": long[:10_000]}):
        status, error = error_of(post(url, "/v2/models/recon/infer", b"{}", headers))
        assert status == 400 and len(error) < 500, error[:300]
    message = grpc_request(json_request(kspace, mask))
    message.inputs[0].name = long
    with pytest.raises(grpc.RpcError) as caught:
        grpc_call(address, "ModelInfer", message)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert caught.value.details().startswith("unknown input tensor 'xxx") and len(caught.value.details()) < 500


def test_grpc_raw_contents_checks_and_unknown_models(grpc_server):
    _, address = grpc_server
    kspace, mask = sample()
    raw = grpc_request(json_request(kspace, mask))
    for tensor in raw.inputs:
        tensor.ClearField("contents")
    cases = [([kspace.tobytes()], grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents has 1 buffers for 2 inputs"),
             ([kspace.tobytes()[:-4], mask.tobytes()], grpc.StatusCode.INVALID_ARGUMENT,
              f"input 'masked_kspace': raw_input_contents holds {kspace.nbytes - 4} bytes"),
             ([kspace.tobytes(), mask.tobytes()], None, "")]
    for buffers, code, message in cases:
        request = MESSAGES["ModelInferRequest"]()
        request.CopyFrom(raw)
        request.raw_input_contents.extend(buffers)
        if code is None:
            assert grpc_call(address, "ModelInfer", request).outputs[0].shape == [1, HEIGHT, WIDTH]
            continue
        with pytest.raises(grpc.RpcError) as caught:
            grpc_call(address, "ModelInfer", request)
        assert caught.value.code() == code and message in caught.value.details()
    for shape in ([2**31, 2**31, 4, HEIGHT, 2], [2**62, 4, HEIGHT, WIDTH, 2], [1, 0, 2**40, WIDTH, 2]):
        request = MESSAGES["ModelInferRequest"]()  # element counts that overflow int64, or 0 with a huge axis
        request.CopyFrom(raw)
        del request.inputs[0].shape[:]
        request.inputs[0].shape.extend(shape)
        request.raw_input_contents.extend([b"", mask.tobytes()])
        with pytest.raises(grpc.RpcError) as caught:
            grpc_call(address, "ModelInfer", request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "every dimension of the shape must be between 1 and" in caught.value.details()
    with grpc.insecure_channel(address) as channel:  # bytes that are no ModelInferRequest at all
        call = channel.unary_unary(f"/{SERVICE}/ModelInfer", request_serializer=None,
                                   response_deserializer=MESSAGES["ModelInferResponse"].FromString)
        with pytest.raises(grpc.RpcError) as caught:
            call(b"\x0a\xff\xff\xff\xff\x0f", timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request is not a valid ModelInferRequest message" in caught.value.details()
    both = grpc_request(json_request(kspace, mask))
    both.raw_input_contents.extend([kspace.tobytes(), mask.tobytes()])
    with pytest.raises(grpc.RpcError, match="both raw_input_contents and contents given"):
        grpc_call(address, "ModelInfer", both)
    for model, version, message in (("nope", "", "unknown model 'nope'"), ("recon", "3", "has no version '3'")):
        with pytest.raises(grpc.RpcError) as caught:
            grpc_call(address, "ModelInfer", grpc_request(json_request(kspace, mask), model, version))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND and message in caught.value.details()


def identity_model(directory: Path, inputs: dict[str, int]):
    """An ONNX Runtime model (reconkit.serve.model.OnnxModel) passing each input ``name: onnx TensorProto type``,
    shape [batch, 3], to output ``{name}_out``: for datatypes other than the contract's FP32."""
    from onnx import helper, save

    from reconkit.serve.model import OnnxModel

    graph = helper.make_graph(
        [helper.make_node("Identity", [name], [f"{name}_out"]) for name in inputs], "identity",
        [helper.make_tensor_value_info(name, kind, ["batch", 3]) for name, kind in inputs.items()],
        [helper.make_tensor_value_info(f"{name}_out", kind, ["batch", 3]) for name, kind in inputs.items()])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(directory / "identity.onnx"))
    return OnnxModel(directory / "identity.onnx")


def test_json_integers_beyond_fp16_are_named_as_such(tmp_path):
    """A JSON integer beyond FP16's range (70000) became inf, refused as "NaN or infinite", which the client never
    sent; it is refused as beyond the range, as 70000.0 was (found by property-based fuzzing of the REST decoder)."""
    from onnx import TensorProto

    from reconkit.serve.protocol import RequestError, decode_infer_request

    model = identity_model(tmp_path, {"half": TensorProto.FLOAT16})
    for values in ([70000, 0, 1], [70000.0, 0, 1], [-1e39, 0, 1]):
        header = {"inputs": [{"name": "half", "datatype": "FP16", "shape": [1, 3], "data": values}]}
        with pytest.raises(RequestError, match=re.escape("input 'half': 1 value(s) are beyond the range of FP16")):
            decode_infer_request(header, memoryview(b""), model)
    header = {"inputs": [{"name": "half", "datatype": "FP16", "shape": [1, 3], "data": [65504, -2, 0.5]}]}
    np.testing.assert_array_equal(decode_infer_request(header, memoryview(b""), model).inputs["half"],
                                  np.array([[65504, -2, 0.5]], np.float16))


def test_grpc_typed_integer_contents_outside_the_datatype_are_refused_as_over_rest(tmp_path):
    """int_contents / uint_contents carry INT8, INT16 and UINT8 inputs as 32-bit integers: values beyond the input's
    datatype were cast with wrap-around (300 as INT8 became 44) and inferred on, where REST refuses them (found by
    property-based fuzzing of the two decoders with a model of integer inputs)."""
    from onnx import TensorProto

    from reconkit.serve.grpc_api import decode_grpc_request
    from reconkit.serve.protocol import RequestError, decode_infer_request

    types = {"codes": (TensorProto.INT8, "INT8", "int_contents"), "levels": (TensorProto.UINT8, "UINT8", "uint_contents")}
    served = SimpleNamespace(model=identity_model(tmp_path, {name: kind for name, (kind, _, _) in types.items()}))

    def requests(codes: list[int], levels: list[int]) -> tuple:
        """The same inputs as a gRPC message with typed contents and as a REST JSON header."""
        message, header = MESSAGES["ModelInferRequest"](model_name="integers"), {"inputs": []}
        for (name, (_, datatype, field)), values in zip(types.items(), (codes, levels)):
            getattr(message.inputs.add(name=name, datatype=datatype, shape=[1, 3]).contents, field).extend(values)
            header["inputs"].append({"name": name, "datatype": datatype, "shape": [1, 3], "data": values})
        return message, header

    message, header = requests([-128, 0, 127], [0, 7, 255])
    decoded = decode_grpc_request(message, served).inputs
    np.testing.assert_array_equal(decoded["codes"], np.array([[-128, 0, 127]], np.int8))
    for name, array in decode_infer_request(header, memoryview(b""), served.model).inputs.items():
        np.testing.assert_array_equal(decoded[name], array)
    for codes, levels, name, field in (([300, 0, 1], [0, 0, 0], "codes", "int_contents"),
                                       ([0, 0, 0], [256, 1, 2], "levels", "uint_contents")):
        message, header = requests(codes, levels)
        with pytest.raises(RequestError, match=re.escape(f"input '{name}': contents.{field} holds values outside")):
            decode_grpc_request(message, served)
        with pytest.raises(RequestError, match=re.escape(f"input '{name}': 'data' holds values outside")):
            decode_infer_request(header, memoryview(b""), served.model)


def _triton_descriptor(name: str):
    """Triton's generated descriptor of message ``name`` ("Outer.Nested" for a nested one), from the tritonclient
    wheel: the service messages or the model configuration's."""
    top, *nested = name.split(".")
    files = (service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR)
    descriptor = next(f.message_types_by_name[top] for f in files if top in f.message_types_by_name)
    for part in nested:
        descriptor = descriptor.nested_types_by_name[part]
    return descriptor


def _repeated(field) -> bool:
    """Whether a protobuf field is repeated: ``is_repeated`` since protobuf 6.31, ``label`` before it (pyproject
    allows 4.25; 7 removed ``label``)."""
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == field.LABEL_REPEATED


def test_grpc_schema_matches_tritons_generated_messages():
    """Every field of reconkit's hand-written schema has Triton's number, type and label, enums their numbers, and
    every rpc Triton's request and response types: what makes the wire format the same."""
    checked = 0
    for name, message in MESSAGES.items():
        theirs = _triton_descriptor(name)
        for field in message.DESCRIPTOR.fields:
            other = theirs.fields_by_name.get(field.name)
            assert other is not None, f"{name}.{field.name}: not in Triton's message"
            assert (field.number, field.type, _repeated(field)) == (other.number, other.type, _repeated(other)), \
                f"{name}.{field.name}"
            if field.message_type is not None:
                assert field.message_type.name == other.message_type.name, f"{name}.{field.name}"
            if field.enum_type is not None:
                assert field.enum_type.full_name == other.enum_type.full_name, f"{name}.{field.name}"
                for value in field.enum_type.values:
                    assert other.enum_type.values_by_name[value.name].number == value.number, value.name
            checked += 1
    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for rpc, (request, response) in METHODS.items():
        method = service.methods_by_name[rpc]
        assert (method.input_type.name, method.output_type.name) == (request, response), rpc
    assert service.full_name == SERVICE and checked > 100


def _parsed(response: dict, message_type: type) -> Message:
    return json_format.ParseDict(response, message_type())


def test_grpc_model_config_and_statistics_equal_rest(grpc_server):
    """perf_analyzer over gRPC reads ModelConfig and ModelStatistics: the same answers as REST, in Triton's types."""
    url, address = grpc_server
    kspace, mask = sample(2, seed=3)
    client = tritonclient_grpc.InferenceServerClient(address)
    rest = tritonclient_http.InferenceServerClient(url)
    try:
        result = client.infer("recon", [tritonclient_grpc.InferInput("masked_kspace", list(kspace.shape), "FP32")
                                        .set_data_from_numpy(kspace),
                                        tritonclient_grpc.InferInput("mask", list(mask.shape), "FP32")
                                        .set_data_from_numpy(mask)], model_version="1")
        assert result.as_numpy("image").shape == (2, HEIGHT, WIDTH)
        assert client.get_server_metadata(as_json=True)["extensions"] == ["model_configuration", "statistics"]
        config = client.get_model_config("recon", "1").config
        statistics = client.get_inference_statistics("recon", "1")
        rest_config, rest_statistics = rest.get_model_config("recon", "1"), rest.get_inference_statistics("recon", "1")
        everything = client.get_inference_statistics()
        for name, version, code, message in (("nope", "", grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
                                             ("", "1", grpc.StatusCode.INVALID_ARGUMENT, "need the model's name")):
            with pytest.raises(InferenceServerException, match=message) as caught:
                client.get_inference_statistics(name, version)
            assert caught.value.status() == str(code)
    finally:
        client.close()
        rest.close()
    assert config == _parsed(rest_config, model_config_pb2.ModelConfig)
    assert statistics == _parsed(rest_statistics, service_pb2.ModelStatisticsResponse)
    (stats,) = statistics.model_stats
    assert stats.inference_count >= 2 and stats.execution_count >= 1 and stats.inference_stats.compute_infer.ns > 0
    assert [(s.name, s.version) for s in everything.model_stats] == [("recon", "1"), ("recon", "2")]


def test_grpc_size_limit_auth_queue_and_timeouts(plain_repository):
    kspace, mask = sample()
    request = grpc_request(json_request(kspace, mask))
    batching = BatchingConfig(max_batch_size=8, max_queue_delay_s=1.5, max_queue_size=1)
    with running_server(plain_repository, batching=batching, grpc_address="127.0.0.1:0", auth_token="s3cret",
                        max_request_bytes=request.ByteSize() + 64) as (url, state):
        address = f"127.0.0.1:{state.grpc_port}"
        token = [("authorization", "Bearer s3cret")]
        assert grpc_call(address, "ServerReady", MESSAGES["ServerReadyRequest"]()).ready  # probes need no token
        for metadata in (None, [("authorization", "Bearer wrong")]):
            with pytest.raises(grpc.RpcError) as caught:
                grpc_call(address, "ModelInfer", request, metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        big = grpc_request(json_request(*sample(batch=2)))
        with pytest.raises(grpc.RpcError) as caught:
            grpc_call(address, "ModelInfer", big, token)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        zeros = grpc_request(json_request(np.zeros_like(sample(batch=2)[0]), sample(batch=2)[1]))
        with pytest.raises(grpc.RpcError) as caught:  # small once compressed, too big once inflated
            grpc_call(address, "ModelInfer", zeros, token, compression=grpc.Compression.Gzip)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "Decompressed" in caught.value.details()
        with ThreadPoolExecutor(1) as pool:  # one request waits 1.5 s for a batch: the queue (size 1) is full
            first = pool.submit(grpc_call, address, "ModelInfer", request, token)
            wait_until_queued(state)
            with pytest.raises(grpc.RpcError) as caught:
                grpc_call(address, "ModelInfer", request, token)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "queue is full" in caught.value.details()
            assert first.result().outputs[0].shape == [1, HEIGHT, WIDTH]  # the queued request still completes
        for kind in ("int64_param", "uint64_param", "double_param"):  # every numeric kind of Triton's message
            theirs = service_pb2.ModelInferRequest.FromString(request.SerializeToString())
            setattr(theirs.parameters["timeout"], kind, 100_000)  # 0.1 s, microseconds
            timed = MESSAGES["ModelInferRequest"].FromString(theirs.SerializeToString())
            with pytest.raises(grpc.RpcError) as caught:
                grpc_call(address, "ModelInfer", timed, token)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, kind
            assert "no result within 0.1 s" in caught.value.details(), kind
        with pytest.raises(grpc.RpcError) as caught:  # the client's own deadline: the server stops waiting too
            grpc_call(address, "ModelInfer", request, token, timeout=0.2)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.3)
        assert state.models["recon"]["1"].batcher.queue_depth == 0  # timed-out requests left the queue
        status, body = get(url, "/metrics", {"Authorization": "Bearer s3cret"})
    assert status == 200
    text = body.decode()
    assert 'reconkit_serve_errors_total{code="401",endpoint="grpc_infer"} 2.0' in text
    assert 'reconkit_serve_errors_total{code="503",endpoint="grpc_infer"} 1.0' in text
    assert 'reconkit_serve_requests_total{code="200",endpoint="grpc_infer"} 1.0' in text


def test_grpc_call_cancelled_while_queued_leaves_the_queue_and_is_counted(plain_repository):
    """A call its client cancels while its request waits for a batch: the request leaves the queue, and the
    statistics, /metrics and the log count it (it used to vanish from all three)."""
    request = grpc_request(json_request(*sample()))
    with running_server(plain_repository, batching=BatchingConfig(max_queue_delay_s=5.0),
                        grpc_address="127.0.0.1:0") as (url, state):
        served = state.models["recon"]["1"]
        with grpc.insecure_channel(f"127.0.0.1:{state.grpc_port}") as channel:
            call = channel.unary_unary(f"/{SERVICE}/ModelInfer",
                                       request_serializer=MESSAGES["ModelInferRequest"].SerializeToString,
                                       response_deserializer=MESSAGES["ModelInferResponse"].FromString)
            future = call.future(request, timeout=30)
            wait_until_queued(state)
            future.cancel()
            deadline = time.monotonic() + 5
            while served.statistics.requests["fail"].count < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
        assert served.batcher.queue_depth == 0
        stats = served.statistics.as_json("recon", "1")["inference_stats"]
        text = get(url, "/metrics")[1].decode()
    assert (stats["success"]["count"], stats["fail"]["count"], stats["queue"]["count"]) == (0, 1, 0)
    assert 'reconkit_serve_errors_total{code="499",endpoint="grpc_infer"} 1.0' in text


class _EndedCall:
    """A gRPC servicer context whose call has already ended in gRPC's core (its deadline passed while the server
    answered): sending the status fails as in grpcio, with an ExecuteBatchError."""

    def __init__(self, message: bytes):
        self.message = message

    def invocation_metadata(self):
        return ()

    async def read(self):
        return self.message

    def time_remaining(self):
        return 0.0

    async def abort(self, code, details):
        from grpc._cython import cygrpc

        raise cygrpc.ExecuteBatchError('Failed "execute_batch": (SendInitialMetadataOperation, SendStatusFromServer)')


def test_grpc_answer_to_a_call_past_its_deadline_ends_quietly(plain_repository, caplog):
    """A client whose deadline expires as the server answers (504 at that same deadline, under load): the status can
    no longer be sent. The handler used to let grpcio's ExecuteBatchError through, which grpcio logged with a
    traceback at error level; now it ends as a call its client left (CancelledError, which grpcio takes quietly),
    counted and logged once with the status it was to get."""
    from reconkit.serve.grpc_api import _wrap
    from reconkit.serve.protocol import RequestError
    from reconkit.serve.state import ServerState

    async def past_deadline(request, context):
        raise RequestError(504, "model 'recon': no result within 0.05 s")

    caplog.set_level("INFO")
    state = ServerState(ServerConfig(plain_repository))
    wrapped = _wrap(state, "ModelInfer", past_deadline)
    message = grpc_request(json_request(*sample())).SerializeToString()
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(wrapped(None, _EndedCall(message)))
    assert [(r.rpc, r.status) for r in caplog.records if r.getMessage() == "request"] == [("ModelInfer", 504)]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert state.metrics.registry.get_sample_value("reconkit_serve_requests_total",
                                                   {"endpoint": "grpc_infer", "code": "504"}) == 1


@pytest.mark.parametrize("uvicorn_before_0_50", [False, True])
def test_grpc_address_in_use_is_a_clear_error(repository, monkeypatch, uvicorn_before_0_50):
    """Also as uvicorn < 0.50 (pyproject allows 0.29) behaves: it logs a failed startup and returns from
    ``Server.run`` where newer releases exit, so serve() returned as if stopped and ``reconkit serve`` with its
    gRPC port taken exited 0."""
    if uvicorn_before_0_50:
        import uvicorn

        newer_startup = uvicorn.Server.startup

        async def startup_as_before_0_50(self, sockets=None):
            try:
                await newer_startup(self, sockets)
            except SystemExit:
                self.should_exit = True

        monkeypatch.setattr(uvicorn.Server, "startup", startup_as_before_0_50)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        with pytest.raises(ReconkitError, match=f"gRPC: cannot bind {address}"):
            serve(ServerConfig(repository, grpc_address=address), "127.0.0.1", free_port())
    # a port beyond 65535 through the library API (the CLI refuses it): grpcio bound 70000 as 4464, silently
    with pytest.raises(ReconkitError, match="gRPC: cannot bind 127.0.0.1:70000: the port must be a number"):
        serve(ServerConfig(repository, grpc_address="127.0.0.1:70000"), "127.0.0.1", free_port())


def test_grpc_starts_with_a_request_limit_beyond_2_gib(repository):
    """--max-request-mb 4096: grpcio's message limit is a C int, so gRPC gets 2 GiB - 1 (it had failed to start with
    OverflowError); REST keeps the whole limit. Likewise a client timeout beyond 2**31 - 1 ms (25 days)."""
    with running_server(repository, max_request_bytes=4 * 2**30, client_timeout_s=1e7,
                        grpc_address="127.0.0.1:0") as (url, state):
        assert grpc_call(f"127.0.0.1:{state.grpc_port}", "ServerLive", MESSAGES["ServerLiveRequest"]()).live
        assert get(url, "/v2/health/live")[0] == 200


def test_grpc_concurrency_bound_refuses_extra_calls_and_recovers(plain_repository):
    """grpc_max_concurrent_rpcs=1: while one call waits in its 1 s batching window, a second is RESOURCE_EXHAUSTED;
    after it the server answers again."""
    request = grpc_request(json_request(*sample()))
    batching = BatchingConfig(max_batch_size=8, max_queue_delay_s=1.0)
    with running_server(plain_repository, batching=batching, grpc_address="127.0.0.1:0",
                        grpc_max_concurrent_rpcs=1) as (_, state):
        address = f"127.0.0.1:{state.grpc_port}"
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(grpc_call, address, "ModelInfer", request)
            wait_until_queued(state)
            with pytest.raises(grpc.RpcError) as caught:
                grpc_call(address, "ModelInfer", request)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert first.result().outputs[0].shape == [1, HEIGHT, WIDTH]
        assert grpc_call(address, "ModelInfer", request).outputs[0].shape == [1, HEIGHT, WIDTH]


def _http2_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _stalled_grpc_call(address: str, unread_answer: bool = False) -> socket.socket:
    """A hand-made HTTP/2 connection (plain text) with one call, as a stalled or malicious client leaves it: a
    ModelInfer whose message stops after 3 of its 100 bytes, or (``unread_answer``) a whole ServerMetadata request
    whose answer the client never lets in (its HTTP/2 flow-control window is 0)."""
    def literal(name: str, value: str) -> bytes:  # HPACK literal header field, new name, no Huffman coding
        return bytes([0, len(name)]) + name.encode() + bytes([len(value)]) + value.encode()

    rpc = "ServerMetadata" if unread_answer else "ModelInfer"
    headers = b"".join(literal(*field) for field in [
        (":method", "POST"), (":scheme", "http"), (":path", f"/{SERVICE}/{rpc}"), (":authority", "x"),
        ("content-type", "application/grpc"), ("te", "trailers")])
    window = (4).to_bytes(2, "big") + (0).to_bytes(4, "big") if unread_answer else b""  # SETTINGS_INITIAL_WINDOW_SIZE
    message = b"\x00" + (0).to_bytes(4, "big") if unread_answer else b"\x00" + (100).to_bytes(4, "big") + b"\x0a\x01x"
    sock = _raw_connection(address)
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                 + _http2_frame(4, 0, 0, window) + _http2_frame(4, 1, 0)  # SETTINGS, ack of the server's
                 + _http2_frame(1, 4, 1, headers)  # HEADERS of stream 1, END_HEADERS
                 + _http2_frame(0, int(unread_answer), 1, message))  # DATA, END_STREAM only when whole
    return sock


def _stream_ended(sock: socket.socket, stream: int, within_s: float) -> bool:
    """Whether the server ends ``stream`` (HEADERS with END_STREAM: the call's trailers) within ``within_s``."""
    sock.settimeout(within_s)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
            while len(received) >= 9 and len(received) >= 9 + int.from_bytes(received[:3], "big"):
                length, kind, flags = int.from_bytes(received[:3], "big"), received[3], received[4]
                if kind == 1 and flags & 1 and int.from_bytes(received[5:9], "big") & 0x7FFFFFFF == stream:
                    return True
                received = received[9 + length:]
    except TimeoutError:
        pass
    return False


def test_grpc_stalled_connections_and_calls_are_timed_out(plain_repository):
    """Slow or stalled gRPC clients: a connection that never starts HTTP/2, or makes no call, is closed after the
    client timeout, and a call whose message stops half-way is ended then (DEADLINE_EXCEEDED, counted as 408)
    instead of holding its concurrent-call slot for ever; with one slot, the next call is then served. A call whose
    answer the client never reads ends with its connection, which counts as idle."""
    with running_server(plain_repository, client_timeout_s=1.0, grpc_address="127.0.0.1:0",
                        grpc_max_concurrent_rpcs=1) as (url, state):
        address = f"127.0.0.1:{state.grpc_port}"
        silent = _raw_connection(address)
        idle = _raw_connection(address)  # HTTP/2 set up, then no call
        idle.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _http2_frame(4, 0, 0) + _http2_frame(4, 1, 0))
        stalled = _stalled_grpc_call(address)
        assert _closed_by_server(silent, 10)[0] and _closed_by_server(idle, 10)[0]
        assert _stream_ended(stalled, 1, 10)
        assert grpc_call(address, "ServerLive", MESSAGES["ServerLiveRequest"]()).live  # the slot is free again
        unread = _stalled_grpc_call(address, unread_answer=True)
        assert _closed_by_server(unread, 10)[0]
        assert grpc_call(address, "ServerLive", MESSAGES["ServerLiveRequest"]()).live
        status, body = get(url, "/metrics")
        for sock in (silent, idle, stalled, unread):
            sock.close()
    assert status == 200 and 'reconkit_serve_errors_total{code="408",endpoint="grpc_infer"} 1.0' in body.decode()


def test_grpc_draining_refuses_new_calls_and_answers_accepted_ones(plain_repository):
    """What SIGTERM sets (state.shutting_down): not ready, new ModelInfer UNAVAILABLE, the queued call still answered."""
    request = grpc_request(json_request(*sample()))
    with running_server(plain_repository, batching=BatchingConfig(max_queue_delay_s=1.0),
                        grpc_address="127.0.0.1:0") as (_, state):
        address = f"127.0.0.1:{state.grpc_port}"
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(grpc_call, address, "ModelInfer", request)
            wait_until_queued(state)
            state.shutting_down = True
            assert not grpc_call(address, "ServerReady", MESSAGES["ServerReadyRequest"]()).ready
            with pytest.raises(grpc.RpcError) as caught:
                grpc_call(address, "ModelInfer", request)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in caught.value.details()
            assert first.result().outputs[0].shape == [1, HEIGHT, WIDTH]


# ---- TLS (ServerConfig.tls_cert / tls_key, reconkit serve --tls-cert / --tls-key) ------------------------------------

@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(certificate chain, private key, CA certificate) for 127.0.0.1, from a throw-away CA; the same folder also
    holds client.pem / client.key from that CA and stranger.pem / stranger.key from another one."""
    root = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    for name, issuer, identity in (("server", ca, "127.0.0.1"), ("client", ca, "client@example.org"),
                                   ("stranger", trustme.CA(), "stranger@example.org")):
        issued = issuer.issue_cert(identity, "localhost") if name == "server" else issuer.issue_cert(identity)
        issued.private_key_pem.write_to_path(root / f"{name}.key")
        (root / f"{name}.pem").write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    ca.cert_pem.write_to_path(root / "ca.pem")
    return root / "server.pem", root / "server.key", root / "ca.pem"


def test_tls_serves_https_and_grpc_and_refuses_plain_clients(repository, direct, tls_files):
    cert, key, ca = tls_files
    kspace, mask = sample()
    expected = direct.run(["image"], {"masked_kspace": kspace, "mask": mask})[0]
    with running_server(repository, grpc_address="127.0.0.1:0", tls_cert=cert, tls_key=key) as (url, state):
        host, port = url.split(":")
        context = ssl.create_default_context(cafile=str(ca))
        conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
        try:
            conn.request("POST", "/v2/models/recon/infer", body=json.dumps(json_request(kspace, mask)).encode())
            response = conn.getresponse()
            output = json.loads(response.read())["outputs"][0]
        finally:
            conn.close()
        assert response.status == 200
        np.testing.assert_array_equal(np.asarray(output["data"], np.float32).reshape(output["shape"]), expected)
        client = tritonclient_http.InferenceServerClient(url, ssl=True, ssl_options={"ca_certs": str(ca)})
        try:
            assert client.is_server_ready()
        finally:
            client.close()
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            get(url, "/v2/health/ready")  # plain HTTP to the HTTPS port gets no answer
        address = f"127.0.0.1:{state.grpc_port}"
        client = tritonclient_grpc.InferenceServerClient(address, ssl=True, root_certificates=str(ca))
        try:
            inputs = [tritonclient_grpc.InferInput("masked_kspace", list(kspace.shape), "FP32"),
                      tritonclient_grpc.InferInput("mask", list(mask.shape), "FP32")]
            inputs[0].set_data_from_numpy(kspace)
            inputs[1].set_data_from_numpy(mask)
            np.testing.assert_array_equal(client.infer("recon", inputs).as_numpy("image"), expected)
        finally:
            client.close()
        with pytest.raises(grpc.RpcError) as caught:  # a plain channel cannot talk to the TLS port
            grpc_call(address, "ServerLive", MESSAGES["ServerLiveRequest"](), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_accepts_only_clients_with_a_certificate_from_the_ca(repository, direct, tls_files):
    cert, key, ca = tls_files
    folder = cert.parent
    kspace, mask = sample()
    expected = direct.run(["image"], {"masked_kspace": kspace, "mask": mask})[0]

    def https_ready(url: str, client: str | None) -> int:
        host, port = url.split(":")
        context = ssl.create_default_context(cafile=str(ca))
        if client is not None:
            context.load_cert_chain(folder / f"{client}.pem", folder / f"{client}.key")
        conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
        try:
            conn.request("GET", "/v2/health/ready")
            return conn.getresponse().status
        finally:
            conn.close()

    def grpc_infer(address: str, client: str | None) -> np.ndarray:
        credentials = {} if client is None else {"private_key": str(folder / f"{client}.key"),
                                                 "certificate_chain": str(folder / f"{client}.pem")}
        triton = tritonclient_grpc.InferenceServerClient(address, ssl=True, root_certificates=str(ca), **credentials)
        try:
            inputs = [tritonclient_grpc.InferInput("masked_kspace", list(kspace.shape), "FP32"),
                      tritonclient_grpc.InferInput("mask", list(mask.shape), "FP32")]
            inputs[0].set_data_from_numpy(kspace)
            inputs[1].set_data_from_numpy(mask)
            return triton.infer("recon", inputs, client_timeout=10).as_numpy("image")
        finally:
            triton.close()

    with running_server(repository, grpc_address="127.0.0.1:0", tls_cert=cert, tls_key=key,
                        tls_client_ca=ca) as (url, state):
        address = f"127.0.0.1:{state.grpc_port}"
        assert https_ready(url, "client") == 200
        np.testing.assert_array_equal(grpc_infer(address, "client"), expected)
        for client in (None, "stranger"):  # no certificate, or one from another CA: the handshake fails
            with pytest.raises((ssl.SSLError, ConnectionError)):
                https_ready(url, client)
            with pytest.raises(InferenceServerException):
                grpc_infer(address, client)
        assert https_ready(url, "client") == 200  # and the server carries on


def test_bad_tls_files_are_clear_errors_before_models_load(repository, tls_files, tmp_path):
    cert, key, _ = tls_files
    (tmp_path / "junk.pem").write_text("not a certificate")
    # a passphrase-protected key: OpenSSL prompted for it on the terminal, or without one raised a bare OSError
    encrypted = serialization.load_pem_private_key(key.read_bytes(), None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pass"))
    (tmp_path / "encrypted.key").write_bytes(encrypted)
    cases = [({"tls_cert": cert}, "TLS needs both a certificate"),
             ({"tls_cert": cert, "tls_key": tmp_path / "encrypted.key"}, "encrypted.key: the private key is encrypted"),
             ({"tls_cert": cert, "tls_key": tmp_path / "missing.key"}, "missing.key: cannot read TLS file"),
             ({"tls_cert": tmp_path / "junk.pem", "tls_key": key}, "not a PEM certificate chain and its private key"),
             ({"tls_client_ca": cert.parent / "ca.pem"}, "mutual TLS .* needs the server's own certificate"),
             ({"tls_cert": cert, "tls_key": key, "tls_client_ca": tmp_path / "junk.pem"},
              "junk.pem: not a PEM CA certificate"),
             ({"tls_cert": cert, "tls_key": key, "tls_client_ca": tmp_path / "none.pem"},
              "none.pem: cannot read TLS file")]
    for tls, message in cases:
        with pytest.raises(ReconkitError, match=message):
            build_server(ServerConfig(repository, **tls), "127.0.0.1", free_port())
