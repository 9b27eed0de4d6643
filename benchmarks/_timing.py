"""Side-by-side timing shared by the benchmark scripts: implementations run in turn, medians over repeats."""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def interleaved_medians(
    steps: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], object] | None = None,
    self_timed: bool = False,
) -> dict[str, float]:
    """Median seconds per step. Within each repeat every step runs once, so machine load hits all alike. With two
    steps they alternate; with more, each repeat takes them in a new random order (seeded), so that no step always
    runs right after the same one: a step timed after torch pays for what torch's run leaves behind (freed pages,
    evicted caches), 5–8 ms on a 30 ms ONNX Runtime FFT (2026-12-06, docs/benchmarks.md). ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before and after each timed call. With ``self_timed`` each step returns its own
    seconds (e.g. the model calls alone of a pass that also prepares data), taken instead of the wall time around it."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(0)
    for i in range(repeats):
        for name in names[i % 2:] + names[: i % 2] if len(names) == 2 else order.sample(names, len(names)):
            if sync is not None:
                sync()
            start = time.perf_counter()
            seconds = steps[name]()
            if sync is not None:
                sync()
            times[name].append(seconds if self_timed else time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The machine a table was measured on, as the benchmark scripts print it, e.g. ``AMD EPYC (family 25 model 17),
    x86_64, 2 CPUs``: the CPU's model name and its family / model numbers from ``cpuinfo`` where the file exists (a
    VM often names its CPU only "AMD EPYC", and ``platform.processor()`` gives only "x86_64" on Linux, so the
    numbers are what tells the kinds apart), the architecture and the CPU count."""
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip():  # the first CPU's block is enough
                break
    except OSError:  # not Linux
        pass
    name = fields.get("model name") or platform.processor() or "CPU"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return f"{name}, {platform.machine()}, {os.cpu_count()} CPUs"


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """Refuse ``--device`` in one line (argparse's exit code 2) when it names CUDA on a machine without it: the GPU
    timings are then not measured, and the script says so rather than failing with a traceback from inside torch
    (``benchmarks/ops.py``, ``benchmarks/train.py``; ``benchmarks/kernels.py`` runs its correctness checks instead)."""
    import torch  # here, not at the top: the timing helpers themselves need no torch

    try:
        is_cuda = torch.device(device).type == "cuda"
    except RuntimeError as error:  # e.g. "cuda0": "Expected one of cpu, cuda, ... device type"
        parser.error(f"--device {device}: {error}")
    if is_cuda and not torch.cuda.is_available():
        parser.error(f"--device {device}: no CUDA device on this machine, so no GPU timing is measured")


def add_problem_options(parser: argparse.ArgumentParser, repeats: int, warmup: int) -> None:
    """The options of the ops and kernel benchmarks: the k-space problem ``(batch, coils, H, W)`` and the loop."""
    parser.add_argument("--coils", type=int, default=15, help="receive coils (default: %(default)s)")
    parser.add_argument("--height", type=int, default=640, help="k-space height H (default: %(default)s)")
    parser.add_argument("--width", type=int, default=368, help="k-space width W (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="slices per call (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed repeats, medians (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed calls first (default: %(default)s)")
