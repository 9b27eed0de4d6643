"""Training-step time and peak memory: reconkit VarNet vs fastmri.models.VarNet, identical hyper-parameters.

One step = forward + L1 loss + backward (no optimiser update), batch 1. Wall time and process CPU time
(``time.process_time``, all threads) are both reported: on a shared, overloaded machine the CPU time is the
steadier measure of work, the wall time what a user waits. Every configuration runs in its own
subprocess (one after the other, never in parallel), so each peak-memory figure belongs to that model alone:
on CPU the peak resident set size of the process (``ru_maxrss``, which includes the ~0.3 GB of Python + torch
measured before the model is built, printed as "base"), on CUDA ``torch.cuda.max_memory_allocated``. Both models
start from the same weights (ours loads fastmri's state_dict). Prints a Markdown table with medians over repeats
and ratios fastmri / ours for time (> 1: ours is faster) and ours / fastmri for memory (< 1: ours uses less).

    .venv/bin/python benchmarks/train.py            # 12 cascades, chans 18, sens_chans 8, 15 coils, 640 x 368
    .venv/bin/python benchmarks/train.py --small    # 4 cascades, 8 coils, 160 x 96: a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from _timing import check_device, machine  # benchmarks/_timing.py (the script's folder is on sys.path)

CONFIGS = {
    "fastmri": "fastmri.models.VarNet",
    "reconkit": "reconkit VarNet",
    "reconkit+ckpt": "reconkit VarNet, checkpoint_cascades=True",
}


def _inputs(coils: int, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 4× equispaced line mask with 8 % fully sampled centre, masked Gaussian k-space, (B=1)."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(1, 1, 1, width, 1)
    mask[..., ::4, :] = 1
    centre = round(0.08 * width)
    mask[..., (width - centre + 1) // 2 : (width - centre + 1) // 2 + centre, :] = 1
    kspace = torch.randn(1, coils, height, width, 2, generator=gen) * mask
    return kspace.to(device), mask.to(device)


def _build(config: str, hparams: dict, device: torch.device) -> torch.nn.Module:
    import fastmri.models

    torch.manual_seed(0)
    reference = fastmri.models.VarNet(**hparams)
    if config == "fastmri":
        return reference.to(device).train()
    from reconkit.models import VarNet

    model = VarNet(**hparams, checkpoint_cascades=config == "reconkit+ckpt")
    model.load_state_dict(reference.state_dict())
    return model.to(device).train()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(config: str, args: argparse.Namespace) -> dict:
    """Run warm-up + repeated steps of one configuration in this process; returns times and peak memory."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    hparams = {"num_cascades": args.cascades, "chans": args.chans, "sens_chans": args.sens_chans}
    model = _build(config, hparams, device)
    kspace, mask = _inputs(args.coils, args.height, args.width, device)
    model_mask = mask.bool() if config == "fastmri" else mask  # fastmri's VarNetBlock needs a bool mask
    target = torch.rand(1, args.height, args.width, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    times, cpu_times = [], []
    for step in range(args.warmup + args.repeats):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = torch.nn.functional.l1_loss(model(kspace, model_mask), target)
        loss.backward()
        _sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        model.zero_grad(set_to_none=True)
        del loss
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"config": config, "times": times, "cpu_times": cpu_times, "peak_bytes": peak, "base_bytes": base_rss,
            "threads": torch.get_num_threads()}


def _run_config(config: str, argv: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", config]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(results: list[dict], device: str) -> str:
    ref = next(r for r in results if r["config"] == "fastmri")
    ref_time, ref_peak = statistics.median(ref["times"]), ref["peak_bytes"]
    mem_label = "peak GPU memory (GB)" if device.startswith("cuda") else "peak RSS (GB)"
    ref_cpu = statistics.median(ref["cpu_times"])
    lines = [(f"| model | step median (s) | min–max (s) | speed-up vs fastmri | CPU time median (s) | CPU-time "
             f"speed-up | {mem_label} | memory vs fastmri |"), "|---|---|---|---|---|---|---|---|"]
    for r in results:
        med = statistics.median(r["times"])
        lines.append(f"| {CONFIGS[r['config']]} | {med:.2f} | {min(r['times']):.2f}–{max(r['times']):.2f} | "
                     f"{ref_time / med:.2f}× | {statistics.median(r['cpu_times']):.2f} | "
                     f"{ref_cpu / statistics.median(r['cpu_times']):.2f}× | {r['peak_bytes'] / 1e9:.2f} | "
                     f"{r['peak_bytes'] / ref_peak:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="4 cascades, 8 coils, 160 x 96 (quick check)")
    parser.add_argument("--cascades", type=int, default=12)
    parser.add_argument("--chans", type=int, default=18)
    parser.add_argument("--sens-chans", type=int, default=8)
    parser.add_argument("--coils", type=int, default=15)
    parser.add_argument("--height", type=int, default=640)
    parser.add_argument("--width", type=int, default=368)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    parser.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    if args.small:
        args.cascades, args.coils, args.height, args.width = 4, 8, 160, 96
        argv = [a for a in argv if a != "--small"] + ["--cascades", "4", "--coils", "8", "--height", "160",
                                                       "--width", "96"]
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0

    configs = args.configs.split(",")
    if "fastmri" not in configs:
        parser.error("--configs must include fastmri (the reference for the ratios)")
    load_before = _load()
    results = [_run_config(c, [a for a in argv if a not in ("--configs", args.configs)]) for c in configs]
    print(f"VarNet training step (forward + backward), {args.cascades} cascades, chans {args.chans}, sens_chans "
          f"{args.sens_chans}, {args.coils} coils, {args.height} × {args.width}, batch 1, device {args.device}, "
          f"{results[0]['threads']} threads, torch {torch.__version__}, {machine()}; "
          f"median of {args.repeats} steps after {args.warmup} warm-up; process base RSS "
          f"{results[0]['base_bytes'] / 1e9:.2f} GB; load average before / after: {load_before} / {_load()}")
    print()
    print(_table(results, args.device))
    return 0


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    raise SystemExit(main())
