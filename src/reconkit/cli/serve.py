"""``reconkit serve``: serve ONNX models over the KServe V2 / Open Inference Protocol (REST, optionally gRPC)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from reconkit.errors import ConfigError, ReconkitError

_EXAMPLE = """example:
  reconkit export --checkpoint checkpoints/varnet_small.ckpt --output varnet.onnx --size 640 368 \\
      --triton-repository models --model-name varnet
  RECONKIT_SERVE_TOKEN=secret reconkit serve --model-repository models --host 0.0.0.0 --port 8000
  reconkit serve --model-repository models --port 8000 --grpc-port 8001     # REST and gRPC, as Triton
  reconkit serve --model-repository models --grpc-port 8001 --tls-cert server.pem --tls-key server.key   # TLS
  reconkit serve --model-repository models --tls-cert server.pem --tls-key server.key --tls-client-ca ca.pem  # mTLS

The repository uses Triton's layout (models/<name>/<version>/model.onnx, optional config.pbtxt whose
max_batch_size / dynamic_batching / instance_group override the batching options above). Send SIGTERM for a
graceful shutdown: accepted requests are answered before the process exits.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reconkit serve", epilog=_EXAMPLE,
                                description="Serve ONNX models on ONNX Runtime over the KServe V2 / Open Inference "
                                            "Protocol: REST, and gRPC with --grpc-port (tritonclient.http / "
                                            "tritonclient.grpc and KServe clients work unchanged), with Triton's "
                                            "model configuration and statistics extensions (perf_analyzer shows the "
                                            "server's queue / compute split).",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", type=Path, required=True, help="Triton-layout model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="REST port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=None,
                   help="also serve the protocol's gRPC API on this port, same host (Triton uses 8001; default: off)")
    p.add_argument("--grpc-max-concurrency", type=int, default=256,
                   help="gRPC calls handled at once, more are refused with RESOURCE_EXHAUSTED (default 256)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="ONNX Runtime execution provider: auto = CUDA when available (default auto)")
    p.add_argument("--max-batch-size", type=int, default=8, help="largest batch per run (default 8; 0 = no batching)")
    p.add_argument("--max-queue-delay-ms", type=float, default=0.0,
                   help="how long a request may wait for others to join its batch (default 0)")
    p.add_argument("--max-queue-size", type=int, default=64, help="queued requests per model before 503 (default 64)")
    p.add_argument("--instances", type=int, default=1, help="concurrent model executions per model (default 1)")
    p.add_argument("--request-timeout-s", type=float, default=30.0, help="per-request timeout, 504 after (default 30)")
    p.add_argument("--max-request-mb", type=float, default=512.0, help="largest request body, 413 above (default 512)")
    p.add_argument("--client-timeout-s", type=float, default=30.0,
                   help="REST: a client has this long to send a request's headers (after connecting or after the "
                        "previous response; else the connection is closed), and its body may pause no longer "
                        "nor average under 500 bytes/s beyond it (else 408), nor its response go unread (else the "
                        "connection is closed); gRPC: a connection has this long to "
                        "set up HTTP/2 and may go this long without a call (else it is closed), and a call's "
                        "request message must arrive within it (else DEADLINE_EXCEEDED) (default 30)")
    p.add_argument("--max-connections", type=int, default=1000,
                   help="connections open at once per endpoint, at most half the file-descriptor limit; above it "
                        "REST closes the one waiting longest for a request, gRPC the new one (default 1000)")
    p.add_argument("--intra-op-threads", type=int, default=0, help="ONNX Runtime threads per session (0 = default)")
    p.add_argument("--tls-cert", type=Path, default=None,
                   help="PEM certificate chain: serve REST over HTTPS and gRPC over TLS (with --tls-key; default: plain)")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", type=Path, default=None,
                   help="PEM CA certificate(s): mutual TLS, both endpoints accept only clients whose certificate it "
                        "signed (with --tls-cert / --tls-key; default: any client)")
    p.add_argument("--auth-token-env", default="RECONKIT_SERVE_TOKEN",
                   help="environment variable holding the bearer token; unset or empty = no auth "
                        "(default RECONKIT_SERVE_TOKEN)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="lowest level of the JSON log lines on stderr (default info)")
    return p


def _grpc_address(host: str, port: int | None) -> str | None:
    if port is None:
        return None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # IPv6 literals need brackets in gRPC


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from reconkit.serve import BatchingConfig, ServerConfig, serve
    from reconkit.serve.logs import configure_logging
    from reconkit.serve.state import bearer_token_problem

    configure_logging(args.log_level)
    # a port beyond 65535 was a bind() OverflowError traceback for --port, and for --grpc-port grpcio bound it
    # modulo 65536 without a word (--grpc-port 70000 served on 4464)
    if not all(0 <= port <= 65535 for port in (args.port, args.grpc_port) if port is not None):
        print("reconkit serve: --port and --grpc-port must be port numbers from 0 to 65535 (0: any free port)",
              file=sys.stderr)
        return 2
    if not (math.isfinite(args.max_request_mb) and args.max_request_mb > 0):  # int() below cannot take NaN or inf
        print(f"reconkit serve: --max-request-mb must be a finite number > 0, got {args.max_request_mb}",
              file=sys.stderr)
        return 2
    token = os.environ.get(args.auth_token_env) or None
    problem = token and bearer_token_problem(token)
    if problem:  # said here to name the variable; ServerConfig refuses the token too
        print(f"reconkit serve: environment variable {args.auth_token_env}: {problem}; no client could send it, so "
              "every request would be refused", file=sys.stderr)
        return 2
    try:  # the dataclasses check every value (ConfigError naming the field: --max-queue-delay-ms is in seconds there)
        batching = BatchingConfig(args.max_batch_size, args.max_batch_size > 0, args.max_queue_delay_ms / 1e3,
                                  args.max_queue_size, args.instances)
        config = ServerConfig(args.model_repository, batching, args.request_timeout_s,
                              int(args.max_request_mb * 2**20), token,
                              args.device, args.intra_op_threads,
                              _grpc_address(args.host, args.grpc_port), args.grpc_max_concurrency, args.tls_cert,
                              args.tls_key, args.tls_client_ca, client_timeout_s=args.client_timeout_s,
                              max_connections=args.max_connections)
    except ConfigError as exc:
        print(f"reconkit serve: {exc}", file=sys.stderr)
        return 2
    try:
        serve(config, args.host, args.port)
    except ReconkitError as exc:
        print(f"reconkit serve: {exc}", file=sys.stderr)
        return 1
    return 0
