"""Prometheus metrics of the inference server, in a registry of its own (one per app)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric, UnknownMetricFamily

from reconkit.serve.statistics import ModelStatistics

__all__ = ["ServeMetrics", "TritonModelMetrics"]

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


# Triton's per-model metric name -> (help, value from a model's statistics); durations in whole microseconds
_TRITON_METRICS: dict[str, tuple[str, Callable[[ModelStatistics], int]]] = {
    "nv_inference_request_success": ("Number of successful inference requests, all batch sizes",
                                     lambda s: s.requests["success"].count),
    "nv_inference_request_failure": ("Number of failed inference requests, all batch sizes",
                                     lambda s: s.requests["fail"].count),
    "nv_inference_count": ("Number of inferences performed (samples)", lambda s: s.inference_count),
    "nv_inference_exec_count": ("Number of model executions performed", lambda s: s.execution_count),
    "nv_inference_request_duration_us": ("Cumulative inference request duration in microseconds (successful "
                                         "requests)", lambda s: s.requests["success"].ns // 1000),
    **{f"nv_inference_{phase}_duration_us": (f"Cumulative {phase.replace('_', ' ')} duration in microseconds",
                                             lambda s, phase=phase: s.requests[phase].ns // 1000)
       for phase in ("queue", "compute_input", "compute_infer", "compute_output")},
}


class TritonModelMetrics:
    """A Prometheus collector that exposes the per-model statistics (:mod:`reconkit.serve.statistics`) under NVIDIA
    Triton's metric names and labels (``model``, ``version``), so dashboards and alerts written for Triton read
    this server unchanged. Triton types its cumulative ones as counters without the ``_total`` suffix that
    ``prometheus_client`` adds to counters; to keep Triton's names they are exposed untyped.

    ``models()`` yields ``(name, version, statistics, queue depth)`` per model version at scrape time.
    """

    def __init__(self, models: Callable[[], Iterable[tuple[str, str, ModelStatistics, int]]]):
        self.models = models

    def collect(self) -> Iterator[Metric]:
        models = list(self.models())
        for name, (help_text, value) in _TRITON_METRICS.items():
            family = UnknownMetricFamily(name, help_text, labels=["model", "version"])
            for model, version, statistics, _ in models:
                family.add_metric([model, version], value(statistics))
            yield family
        pending = GaugeMetricFamily("nv_inference_pending_request_count", "Requests waiting in the model's queue",
                                    labels=["model", "version"])
        for model, version, _, depth in models:
            pending.add_metric([model, version], depth)
        yield pending
