"""Dynamic batching: concurrent requests for one model are queued and run together on ONNX Runtime.

Requests join a bounded FIFO queue (full: 503 with ``Retry-After``). A worker takes the oldest request and every
queued request whose inputs have the same non-batch shapes, up to ``max_batch_size`` samples, waiting at most
``max_queue_delay_s`` after the oldest arrived for more to join; the batch is concatenated along axis 0, run in a
worker thread, and each request gets its slice of the outputs back. With ``max_queue_delay_s = 0`` nothing waits:
batches form from whatever queued up while the previous batch ran. Each successful run is reported to
``on_executed`` with its queue and compute times (:class:`reconkit.serve.statistics.Execution`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from reconkit.serve.model import OnnxModel
from reconkit.serve.protocol import InferRequest, RequestError
from reconkit.serve.repository import BatchingConfig
from reconkit.serve.statistics import Execution

__all__ = ["DynamicBatcher"]


@dataclasses.dataclass
class _Pending:
    request: InferRequest
    key: tuple  # (name, non-batch shape) of every input: only equal keys share a batch
    future: asyncio.Future
    enqueued: float


def _shape_key(request: InferRequest) -> tuple:
    return tuple(sorted((name, array.shape[1:]) for name, array in request.inputs.items()))


def _run_batch(model: OnnxModel, batch: list[_Pending]) -> tuple[list[dict[str, np.ndarray]], tuple[int, int, int]]:
    """Run ``batch`` as one ONNX Runtime call and split the outputs per request (runs in a worker thread).

    Returns the outputs per request and the nanoseconds spent building the inputs, running, splitting the outputs.
    """
    start = time.perf_counter_ns()
    names = list(dict.fromkeys(name for p in batch for name in p.request.outputs))
    inputs = [p.request.inputs for p in batch]
    feeds = inputs[0] if len(inputs) == 1 else {name: np.concatenate([i[name] for i in inputs]) for name in inputs[0]}
    fed = time.perf_counter_ns()
    outputs = model.run(feeds, names)
    ran = time.perf_counter_ns()
    bounds = itertools.pairwise(np.cumsum([0] + [p.request.batch_size for p in batch]))
    # views, no copies; each request gets only the outputs it asked for (the run computed the batch's union of them)
    results = [{name: outputs[name][a:b] for name in p.request.outputs} for p, (a, b) in zip(batch, bounds)]
    return results, (fed - start, ran - fed, time.perf_counter_ns() - ran)


class DynamicBatcher:
    """Queue and batch inference requests for one model; create and use it inside the server's event loop."""

    def __init__(self, name: str, model: OnnxModel, config: BatchingConfig,
                 on_queue_depth: Callable[[int], None] = lambda depth: None,
                 on_batch: Callable[[int], None] = lambda size: None,
                 on_executed: Callable[[Execution], None] = lambda execution: None):
        self.name, self.model, self.config = name, model, config
        self._on_queue_depth, self._on_batch, self._on_executed = on_queue_depth, on_batch, on_executed
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(config.instances, thread_name_prefix="reconkit-infer")
        self._running = 0
        self._closing = False  # no new requests; queued ones run without waiting for the delay
        self._stopped = False  # workers return once the queue is empty
        self._workers = [asyncio.ensure_future(self._work()) for _ in range(config.instances)]

    @property
    def queue_depth(self) -> int:
        return sum(not p.future.done() for p in self._queue)

    async def submit(self, request: InferRequest) -> dict[str, np.ndarray]:
        """Queue ``request`` and wait for its outputs; raises ``RequestError`` (503 when the queue is full)."""
        if self._closing:
            raise RequestError(503, "server is shutting down", {"Retry-After": "1"})
        self._drop_done()
        if len(self._queue) >= self.config.max_queue_size:
            raise RequestError(503, f"model '{self.name}': queue is full "
                                    f"({self.config.max_queue_size} requests waiting)", {"Retry-After": "1"})
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(request, _shape_key(request), future, time.monotonic()))
        self._changed()
        try:
            return await future
        finally:
            future.cancel()  # no-op when done; a cancelled waiter (timeout) leaves the queue on the next pass
            self._on_queue_depth(self.queue_depth)

    async def close(self) -> None:
        """Finish every queued and running request, then stop the workers."""
        self._closing = True
        self._wakeup.set()
        while self.queue_depth or self._running:
            await asyncio.sleep(0.01)
        self._stopped = True  # workers are told to return rather than cancelled: wait_for can swallow a cancel
        self._wakeup.set()
        await asyncio.gather(*self._workers)
        self._executor.shutdown(wait=True)

    def _changed(self) -> None:
        self._on_queue_depth(self.queue_depth)
        self._wakeup.set()

    def _drop_done(self) -> None:
        self._queue = deque(p for p in self._queue if not p.future.done())

    def _same_shape_batch(self, first: _Pending) -> tuple[list[_Pending], bool]:
        """Queued requests batchable with ``first`` (FIFO, within max_batch_size) and whether the batch is full."""
        limit = self.config.max_batch_size
        batch, total, full = [], 0, False
        for pending in self._queue:
            if pending.key != first.key:
                continue
            if total + pending.request.batch_size > limit and batch:
                full = True
                continue
            batch.append(pending)
            total += pending.request.batch_size
        return batch, full or total >= limit

    async def _take_batch(self) -> list[_Pending]:
        """The next batch to run, or an empty list once the batcher is stopped."""
        while True:
            self._drop_done()
            if not self._queue:
                if self._stopped:
                    return []
                await self._wait(None)
                continue
            first = self._queue[0]
            if not self.config.dynamic:
                batch = [first]
                break
            batch, full = self._same_shape_batch(first)
            remaining = first.enqueued + self.config.max_queue_delay_s - time.monotonic()
            if full or remaining <= 0 or self._closing:
                break
            await self._wait(remaining)
        taken = {id(p) for p in batch}
        self._queue = deque(p for p in self._queue if id(p) not in taken)
        self._on_queue_depth(self.queue_depth)
        return batch

    async def _wait(self, timeout: float | None) -> None:
        self._wakeup.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while batch := await self._take_batch():
            taken = time.monotonic()
            self._running += 1
            samples = sum(p.request.batch_size for p in batch)
            try:
                self._on_batch(samples)
                results, phases = await loop.run_in_executor(self._executor, _run_batch, self.model, batch)
            except Exception as exc:  # noqa: BLE001  (an ONNX Runtime failure fails this batch, never the server)
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(RequestError(500, f"inference failed: {exc}"))
            else:
                queue_ns = tuple(int((taken - p.enqueued) * 1e9) for p in batch)
                self._on_executed(Execution(samples, queue_ns, *phases))
                for pending, result in zip(batch, results):
                    if not pending.future.done():
                        pending.future.set_result(result)
            finally:
                self._running -= 1
