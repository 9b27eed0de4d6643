"""Per-model inference statistics in the form of Triton's statistics extension.

REST ``GET /v2/models[/{name}[/versions/{v}]]/stats`` and gRPC ``ModelStatistics`` answer with these counters, the
ones ``perf_analyzer`` and ``model_analyzer`` read to split a request's latency into queueing and compute. All
durations are cumulative nanoseconds with a count:

* ``success`` / ``fail``: requests for the model, from the moment the server hands the decoded request to the model
  (validation against the model, queueing, the run and the output checks) until it has the answer or the error;
  decoding the body (names, datatypes, ranks, byte counts), before that, is not counted. ``fail`` counts the
  requests refused or failed from that point on (400 from the value checks: NaN / Inf, mask width, exported
  sizes, empty samples, batch size; 503 queue full; 504 timeout; 500 / 422 failed inference; a request cancelled
  because its client went away).
* ``queue``: from joining the model's queue until the batch it joined was taken for a run.
* ``compute_input`` / ``compute_infer`` / ``compute_output``: concatenating the requests' inputs into one batch,
  the ONNX Runtime call, slicing the outputs per request. As in Triton, each request of a batch is charged the
  batch's whole durations, so ``ns / count`` is the mean per request; ``batch_stats`` has them per run, by the
  number of samples in the run.

``queue`` and ``compute_*`` count every request that a successful run served, even one whose caller had given up
(timeout) or whose outputs then failed the checks. ``inference_count`` counts samples (a request of batch 4 is
4 inferences) of successful requests, ``execution_count`` successful ONNX Runtime runs.

Example:
    >>> stats = ModelStatistics()
    >>> stats.record_execution(Execution(batch_size=2, queue_ns=(1000, 400), input_ns=10, infer_ns=500, output_ns=5))
    >>> stats.record_request(samples=2, ns=2000, ok=True)
    >>> report = stats.as_json("varnet", "1")
    >>> report["execution_count"], report["inference_stats"]["queue"], report["batch_stats"][0]["batch_size"]
    (1, {'count': 2, 'ns': 1400}, 2)
"""

from __future__ import annotations

import dataclasses
import time

__all__ = ["Duration", "Execution", "ModelStatistics"]


@dataclasses.dataclass
class Duration:
    """A count of events and their cumulative duration in nanoseconds (the extension's ``StatisticDuration``)."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, int(ns))

    def as_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclasses.dataclass(frozen=True)
class Execution:
    """One ONNX Runtime run of a batch.

    batch_size: samples in the run (the requests' batch sizes summed); queue_ns: how long each request of the batch
    waited in the queue; input_ns / infer_ns / output_ns: building the batch's inputs, the session run, splitting
    the outputs per request.
    """

    batch_size: int
    queue_ns: tuple[int, ...]
    input_ns: int
    infer_ns: int
    output_ns: int


_PHASES = ("compute_input", "compute_infer", "compute_output")
_REQUEST_FIELDS = ("success", "fail", "queue", *_PHASES, "cache_hit", "cache_miss")  # no response cache: 0 always


class ModelStatistics:
    """The cumulative counters of one model version; update and read them from the server's event loop only."""

    def __init__(self) -> None:
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.requests = {name: Duration() for name in _REQUEST_FIELDS}
        self.batches: dict[int, dict[str, Duration]] = {}  # samples per run -> phase -> runs and their time

    def record_execution(self, execution: Execution) -> None:
        """Count one successful run and charge its queue and compute time to each request it served."""
        self.execution_count += 1
        phases = dict(zip(_PHASES, (execution.input_ns, execution.infer_ns, execution.output_ns)))
        per_size = self.batches.setdefault(execution.batch_size, {name: Duration() for name in _PHASES})
        for name, ns in phases.items():
            per_size[name].add(ns)
        for queue_ns in execution.queue_ns:
            self.requests["queue"].add(queue_ns)
            for name, ns in phases.items():
                self.requests[name].add(ns)

    def record_request(self, samples: int, ns: int, ok: bool) -> None:
        """Count one request that ended (``ok``: answered) after ``ns`` nanoseconds with the model."""
        self.requests["success" if ok else "fail"].add(ns)
        if ok:
            self.inference_count += samples
        self.last_inference_ms = int(time.time() * 1e3)

    def as_json(self, name: str, version: str) -> dict:
        """The extension's ``ModelStatistics`` object (REST JSON; the gRPC message has the same fields)."""
        return {
            "name": name, "version": version, "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count, "execution_count": self.execution_count,
            "inference_stats": {field: duration.as_json() for field, duration in self.requests.items()},
            "batch_stats": [{"batch_size": size, **{phase: d.as_json() for phase, d in phases.items()}}
                            for size, phases in sorted(self.batches.items())],
        }  # fmt: skip
