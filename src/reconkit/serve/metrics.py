"""Prometheus metrics of the inference server, in a registry of its own (one per app)."""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["ServeMetrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclasses.dataclass
class ServeMetrics:
    """requests: every HTTP request by endpoint and status code; errors: the ones answered with status >= 400;
    latency: seconds from request received to response ready, per endpoint; queue_depth: requests waiting per
    model version; batch_size: samples per ONNX Runtime call per model version."""

    registry: CollectorRegistry
    requests: Counter
    errors: Counter
    latency: Histogram
    queue_depth: Gauge
    batch_size: Histogram

    @classmethod
    def create(cls) -> ServeMetrics:
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            requests=Counter("reconkit_serve_requests", "HTTP requests by endpoint and status code",
                             ["endpoint", "code"], registry=registry),
            errors=Counter("reconkit_serve_errors", "HTTP requests answered with an error, by status code",
                           ["endpoint", "code"], registry=registry),
            latency=Histogram("reconkit_serve_request_latency_seconds", "time to answer a request",
                              ["endpoint"], buckets=_LATENCY_BUCKETS, registry=registry),
            queue_depth=Gauge("reconkit_serve_queue_depth", "inference requests waiting for a batch",
                              ["model", "version"], registry=registry),
            batch_size=Histogram("reconkit_serve_batch_size", "samples per ONNX Runtime call", ["model", "version"],
                                 buckets=_BATCH_BUCKETS, registry=registry),
        )

    def observe_request(self, endpoint: str, code: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(code)).inc()
        if code >= 400:
            self.errors.labels(endpoint, str(code)).inc()
        self.latency.labels(endpoint).observe(seconds)
