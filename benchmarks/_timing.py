"""Side-by-side timing shared by the benchmark scripts: implementations run in turn, medians over repeats."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional


def interleaved_medians(
    steps: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    sync: Optional[Callable[[], object]] = None,
) -> dict[str, float]:
    """Median seconds per step. Within each repeat every step runs once, the starting one rotating (with two
    steps: alternating), so allocator state, caches and machine load hit all alike. ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before and after each timed call."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            if sync is not None:
                sync()
            start = time.perf_counter()
            steps[name]()
            if sync is not None:
                sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
