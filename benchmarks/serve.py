"""Serving benchmark: KServe V2 server (`reconkit serve`, REST and gRPC) vs calling the ONNX Runtime session directly.

Bounded load on 127.0.0.1 only. A contract-shaped model is exported with ``reconkit.export.export_onnx`` (MatMul FFT
in the graph), written to a Triton repository, and served by ``reconkit serve`` in a subprocess (REST and gRPC endpoints). Clients are
threads with one keep-alive HTTP connection (binary-tensor requests) or one gRPC channel (raw_input_contents)
each, sending pre-built requests (client-side serialisation is not timed). For every concurrency level: p50 / p99 latency, throughput, errors and the mean batch
size the server ran (from /metrics); medians over ``--repeats``. The direct baseline is ``session.run`` on the
same inputs, batch 1 (and batch max_batch_size, the ceiling for batching), with the server's ONNX Runtime session
options, in this process.

    python benchmarks/serve.py                       # zero-filled model, 8 coils, 320 x 320, 200 requests
    python benchmarks/serve.py --model varnet --requests 60 --concurrency 1 4
    python benchmarks/serve.py --protocol grpc        # gRPC clients only (default: REST and gRPC, one server)

Prints a Markdown table; figures are ratios measured side by side in one run (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import torch
from _timing import machine  # benchmarks/_timing.py (the script's folder is on sys.path)

from reconkit.export import export_onnx
from reconkit.export.triton_repository import write_triton_repository
from reconkit.ops import ifft2c, rss_complex
from reconkit.serve.grpc_schema import MESSAGES, SERVICE
from reconkit.serve.model import OnnxModel


class ZeroFilled(torch.nn.Module):
    """Zero-filled reconstruction: RSS over coils of the centred inverse FFT of the masked k-space."""

    def forward(self, masked_kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return rss_complex(ifft2c(masked_kspace * mask), dim=1)


def build_model(kind: str) -> torch.nn.Module:
    if kind == "zero-filled":
        return ZeroFilled()
    from reconkit.models import build_model as build  # small random-weight VarNet: compute shape, not quality

    torch.manual_seed(0)
    return build("varnet", num_cascades=4, sens_chans=4, sens_pools=3, chans=8, pools=3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_body(kspace: np.ndarray, mask: np.ndarray) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({
        "inputs": [
            {"name": "masked_kspace", "datatype": "FP32", "shape": list(kspace.shape),
             "parameters": {"binary_data_size": kspace.nbytes}},
            {"name": "mask", "datatype": "FP32", "shape": list(mask.shape), "parameters": {"binary_data_size": mask.nbytes}},
        ],
        "outputs": [{"name": "image", "parameters": {"binary_data": True}}],
    }).encode()
    return header + kspace.tobytes() + mask.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                                        "Content-Type": "application/octet-stream"}


def batch_stats(url: str) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram."""
    conn = http.client.HTTPConnection(url, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    total = re.search(r"^reconkit_serve_batch_size_sum\{[^}]*\} (\S+)$", text, re.MULTILINE)
    count = re.search(r"^reconkit_serve_batch_size_count\{[^}]*\} (\S+)$", text, re.MULTILINE)
    return (float(total.group(1)), float(count.group(1))) if total and count else (0.0, 0.0)


class HttpClient:
    """One keep-alive REST connection sending the pre-built binary-tensor request; ``infer`` returns the image."""

    def __init__(self, url: str, body: bytes, headers: dict, shape: tuple[int, ...]):
        self.url, self.body, self.headers, self.shape = url, body, headers, shape
        self.conn = http.client.HTTPConnection(url, timeout=120)

    def infer(self) -> np.ndarray | None:
        try:
            self.conn.request("POST", "/v2/models/bench/infer", body=self.body, headers=self.headers)
            response = self.conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection(self.url, timeout=120)
            return None
        if response.status != 200:
            return None
        length = int(response.getheader("Inference-Header-Content-Length"))
        return np.frombuffer(raw[length:], np.float32).reshape(self.shape)

    def close(self) -> None:
        self.conn.close()


class GrpcClient:
    """One gRPC channel sending the pre-serialised ModelInferRequest (raw_input_contents, as tritonclient.grpc)."""

    def __init__(self, address: str, payload: bytes, shape: tuple[int, ...]):
        self.payload, self.shape = payload, shape
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)])
        self.call = self.channel.unary_unary(f"/{SERVICE}/ModelInfer", request_serializer=None,
                                             response_deserializer=MESSAGES["ModelInferResponse"].FromString)

    def infer(self) -> np.ndarray | None:
        try:
            response = self.call(self.payload, timeout=120)
        except grpc.RpcError:
            return None
        return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(self.shape)

    def close(self) -> None:
        self.channel.close()


def grpc_payload(kspace: np.ndarray, mask: np.ndarray) -> bytes:
    request = MESSAGES["ModelInferRequest"](model_name="bench")
    for name, array in (("masked_kspace", kspace), ("mask", mask)):
        request.inputs.add(name=name, datatype="FP32", shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())
    request.outputs.add(name="image")
    return request.SerializeToString()


def load(url: str, make_client, expected: np.ndarray, requests: int, concurrency: int) -> dict:
    """Send ``requests`` requests from ``concurrency`` threads, one client each; latencies in seconds, errors
    (failed calls and wrong images) counted. ``url``: the REST address, for the server's batch metrics."""
    per_thread = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]

    def worker(count: int) -> tuple[list[float], int]:
        client = make_client()
        latencies, errors = [], 0
        for _ in range(count):
            start = time.perf_counter()
            image = client.infer()
            latencies.append(time.perf_counter() - start)
            errors += image is None or not np.allclose(image, expected, rtol=1e-5, atol=1e-6)
        client.close()
        return latencies, errors

    before = batch_stats(url)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(worker, per_thread))
    wall = time.perf_counter() - start
    after = batch_stats(url)
    latencies = np.array([t for lat, _ in results for t in lat])
    runs = after[1] - before[1]
    return {"p50": float(np.median(latencies)), "p99": float(np.percentile(latencies, 99)),
            "throughput": requests / wall, "errors": sum(e for _, e in results),
            "mean_batch": (after[0] - before[0]) / runs if runs else float("nan")}


def direct_latencies(session: ort.InferenceSession, feeds: dict, repeats: int) -> np.ndarray:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(["image"], feeds)
        times.append(time.perf_counter() - start)
    return np.array(times)


@contextlib.contextmanager
def serve_subprocess(repository: Path, args: argparse.Namespace):
    """Yields (REST address, gRPC address) of a ``reconkit serve`` subprocess with both endpoints."""
    port, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "reconkit", "serve", "--model-repository", str(repository), "--port", str(port),
           "--grpc-port", str(grpc_port), "--device", "cpu", "--log-level", "warning",
           "--intra-op-threads", str(args.threads), "--max-queue-size", "256"]
    process = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    url = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {process.stderr.read().decode()[-2000:]}")
            with contextlib.suppress(OSError):
                conn = http.client.HTTPConnection(url, timeout=5)
                conn.request("GET", "/v2/health/ready")
                if conn.getresponse().status == 200:
                    break
            time.sleep(0.2)
        yield url, f"127.0.0.1:{grpc_port}"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("zero-filled", "varnet"), default="zero-filled")
    p.add_argument("--coils", type=int, default=8)
    p.add_argument("--height", type=int, default=320)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--protocol", choices=("http", "grpc"), nargs="+", default=["http", "grpc"],
                   help="client protocols to load the server with (default both, same server, interleaved)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-queue-delay-us", type=int, default=0, help="written into config.pbtxt")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads, server and direct (0 = default)")
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    kspace = rng.standard_normal((1, args.coils, args.height, args.width, 2)).astype(np.float32)
    mask = np.zeros((1, 1, 1, args.width, 1), np.float32)
    mask[..., ::4, :] = 1
    mask[..., args.width // 2 - args.width // 25: args.width // 2 + args.width // 25, :] = 1
    with tempfile.TemporaryDirectory(prefix="reconkit-bench-serve-") as tmp:
        onnx_path = export_onnx(build_model(args.model), Path(tmp) / "model.onnx",
                                example_shape=(args.coils, args.height, args.width))
        model_dir = write_triton_repository(onnx_path, Path(tmp) / "models", "bench", max_batch_size=args.max_batch_size)
        config = model_dir / "config.pbtxt"
        config.write_text(config.read_text().replace("max_queue_delay_microseconds: 0",
                                                     f"max_queue_delay_microseconds: {args.max_queue_delay_us}"))
        served = OnnxModel(onnx_path, ["CPUExecutionProvider"], args.threads)  # the server's options
        (session,) = served._sessions.values()  # one exported size: the one session the server runs
        feeds = {"masked_kspace": kspace, "mask": mask}
        batched = {name: np.concatenate([a] * args.max_batch_size) for name, a in feeds.items()}
        expected = session.run(["image"], feeds)[0]
        body, headers = request_body(kspace, mask)
        payload = grpc_payload(kspace, mask)
        rows = {(proto, c): [] for proto in args.protocol for c in args.concurrency}
        direct, direct_batched = [], []
        with serve_subprocess(Path(tmp) / "models", args) as (url, grpc_address):
            clients = {"http": lambda: HttpClient(url, body, headers, expected.shape),
                       "grpc": lambda: GrpcClient(grpc_address, payload, expected.shape)}
            for proto in args.protocol:
                load(url, clients[proto], expected, 10, 1)  # warm-up
            direct_latencies(session, feeds, 5)
            for _ in range(args.repeats):
                # direct and served measured back to back in every repeat, so machine noise hits both alike
                direct.append(float(np.median(direct_latencies(session, feeds, max(20, args.requests // 4)))))
                direct_batched.append(float(np.median(direct_latencies(session, batched, 5))))
                for (proto, c), runs in rows.items():
                    runs.append(load(url, clients[proto], expected, args.requests, c))

    direct_p50 = float(np.median(direct))
    print(f"\nmodel {args.model}, input {args.coils}x{args.height}x{args.width} ({kspace.nbytes / 2**20:.1f} MiB / "
          f"request), {args.requests} requests per level, median of {args.repeats} repeats, max_batch_size "
          f"{args.max_batch_size}, max_queue_delay {args.max_queue_delay_us} us; {machine()}, "
          f"load average {os.getloadavg()[0]:.1f} at the end, onnxruntime {ort.__version__} "
          f"CPU EP, intra-op threads {args.threads or 'default'}\n")
    batched_s = float(np.median(direct_batched))
    print(f"direct session.run, batch 1: p50 {direct_p50 * 1e3:.2f} ms, {1 / direct_p50:.1f} req/s; "
          f"batch {args.max_batch_size}: {batched_s * 1e3:.2f} ms, {args.max_batch_size / batched_s:.1f} samples/s "
          f"(the ceiling for batched serving)\n")
    print("| protocol | concurrency | p50 ms | p99 ms | throughput req/s | mean batch | errors | p50 / direct p50 | "
          "throughput / direct |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (proto, c), runs in rows.items():
        med = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
        errors = sum(r["errors"] for r in runs)
        print(f"| {proto} | {c} | {med['p50'] * 1e3:.2f} | {med['p99'] * 1e3:.2f} | {med['throughput']:.1f} | "
              f"{med['mean_batch']:.2f} | {errors} | {med['p50'] / direct_p50:.2f}x | {med['throughput'] * direct_p50:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
