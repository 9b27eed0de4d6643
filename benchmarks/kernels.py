"""Fused Triton kernels (reconkit.ops.triton_kernels) against reconkit's torch path and fastmri's ops.

On a CUDA machine, side by side in one run (the three implementations interleaved, in a new random order each
repeat; medians over repeats):

* per op (sens_expand, sens_reduce, data_consistency), forward and forward+backward: time in ms, achieved
  bandwidth (the op's compulsory traffic: inputs read once, output written once, divided by the time) as GB/s and
  as a fraction of the peak (``--peak-gbps``, else a measured device-to-device copy), speed-up vs our torch path
  and vs fastmri;
* one full VarNet training step (forward, L1 loss, backward) with RECONKIT_OPS_BACKEND=triton vs torch.

On a machine without CUDA it says so, measures nothing, and runs the correctness checks under Triton's
interpreter (``TRITON_INTERPRET=1``, in a child process) on small shapes: maximum errors of the kernels against
the torch path and fastmri, forward and backward.

    .venv/bin/python benchmarks/kernels.py                                   # GPU: 15 coils x 640 x 368, fp32
    .venv/bin/python benchmarks/kernels.py --coils 8 --height 320 --width 320 --cascades 4
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable

import torch
from _timing import (  # benchmarks/_timing.py (the script's folder is on sys.path)
    add_problem_options,
    interleaved_medians,
)
from fastmri.models.varnet import VarNetBlock

from reconkit.models import VarNet
from reconkit.ops import data_consistency, sens_expand, sens_reduce, triton_available

Step = Callable[[], object]
IMPLS = ("triton", "torch", "fastmri")


def fastmri_dc(kspace: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fastmri's soft data consistency, as written in ``fastmri.models.varnet.VarNetBlock.forward``."""
    return kspace - torch.where(mask, kspace - ref, torch.zeros_like(kspace)) * weight


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (read + write) in GB/s: the attainable peak for streaming ops."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = interleaved_medians({"copy": lambda: dst.copy_(src)}, 20, 3, torch.cuda.synchronize)["copy"]
    return 2 * nbytes / seconds / 1e9


def op_cases(batch: int, coils: int, height: int, width: int, device: torch.device):
    """``{op: (forward step per implementation, (compulsory bytes forward, forward + backward))}``.

    Compulsory bytes: every input read once and every output written once; the backward reads the output
    gradient and the saved inputs and writes the gradients of the inputs that need one (image, sens_maps, kspace
    and the DC weight here; ref_kspace and mask need none).
    """
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (batch, coils, height, width, 2)
    kspace = torch.randn(shape, generator=gen, device=device, requires_grad=True)
    ref = torch.randn(shape, generator=gen, device=device)
    sens_maps = torch.randn(shape, generator=gen, device=device, requires_grad=True)
    image = torch.randn((batch, 1, height, width, 2), generator=gen, device=device, requires_grad=True)
    mask = torch.rand((batch, 1, 1, width, 1), generator=gen, device=device) > 0.7
    weight = torch.tensor(0.5, device=device, requires_grad=True)
    block = VarNetBlock(torch.nn.Identity())
    coil_bytes, image_bytes = kspace.numel() * 4, image.numel() * 4
    return {
        "sens_expand": (
            {
                "triton": lambda: sens_expand(image, sens_maps, backend="triton"),
                "torch": lambda: sens_expand(image, sens_maps, backend="torch"),
                "fastmri": lambda: block.sens_expand(image, sens_maps),
            },
            (image_bytes + 2 * coil_bytes, 3 * image_bytes + 5 * coil_bytes),
        ),
        "sens_reduce": (
            {
                "triton": lambda: sens_reduce(kspace, sens_maps, backend="triton"),
                "torch": lambda: sens_reduce(kspace, sens_maps, backend="torch"),
                "fastmri": lambda: block.sens_reduce(kspace, sens_maps),
            },
            (2 * coil_bytes + image_bytes, 6 * coil_bytes + 2 * image_bytes),
        ),
        "data_consistency": (
            {
                "triton": lambda: data_consistency(kspace, ref, mask, weight, backend="triton"),
                "torch": lambda: data_consistency(kspace, ref, mask, weight, backend="torch"),
                "fastmri": lambda: fastmri_dc(kspace, ref, mask, weight),
            },
            (3 * coil_bytes + mask.numel(), 7 * coil_bytes + 2 * mask.numel()),
        ),
    }


def with_backward(forward: Step) -> Step:
    def step() -> None:
        out = forward()
        out.backward(torch.ones_like(out))

    return step


def gpu_benchmark(args: argparse.Namespace, device: torch.device) -> None:
    peak = args.peak_gbps or copy_bandwidth_gbps(device)
    peak_source = "given" if args.peak_gbps else "measured device-to-device copy"
    print(
        f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, shape ({args.batch}, {args.coils}, "
        f"{args.height}, {args.width}, 2) float32, median of {args.repeats} interleaved repeats; "
        f"peak bandwidth {peak:.0f} GB/s ({peak_source})"
    )
    print()
    print("| op | pass | triton (ms) | torch (ms) | fastmri (ms) | triton GB/s (% of peak) | vs torch | vs fastmri |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, (steps, (fwd_bytes, fwd_bwd_bytes)) in op_cases(args.batch, args.coils, args.height, args.width, device).items():
        for label in ("forward", "fwd+bwd"):
            if label == "forward":
                with torch.no_grad():
                    med = interleaved_medians(steps, args.repeats, args.warmup, torch.cuda.synchronize)
                nbytes = fwd_bytes
            else:
                med = interleaved_medians(
                    {k: with_backward(v) for k, v in steps.items()}, args.repeats, args.warmup, torch.cuda.synchronize
                )
                nbytes = fwd_bwd_bytes
            gbps = nbytes / med["triton"] / 1e9
            print(
                f"| {name} | {label} | {med['triton'] * 1e3:.3f} | {med['torch'] * 1e3:.3f} | "
                f"{med['fastmri'] * 1e3:.3f} | {gbps:.0f} ({100 * gbps / peak:.0f}%) | "
                f"{med['torch'] / med['triton']:.2f}x | {med['fastmri'] / med['triton']:.2f}x |"
            )
    varnet_step_table(args, device)


def varnet_step_table(args: argparse.Namespace, device: torch.device) -> None:
    """One VarNet training step (forward, L1 loss, backward) with the ops backend forced to triton and to torch."""
    torch.manual_seed(0)
    net = VarNet(num_cascades=args.cascades).to(device)
    gen = torch.Generator(device=device).manual_seed(1)
    mask = torch.rand((args.batch, 1, 1, args.width, 1), generator=gen, device=device) > 0.75
    centre = args.width // 2
    mask[..., centre - args.width // 25: centre + args.width // 25, :] = True
    mask = mask.float()
    kspace = torch.randn((args.batch, args.coils, args.height, args.width, 2), generator=gen, device=device) * mask
    target = torch.rand((args.batch, args.height, args.width), generator=gen, device=device)

    def step_with(backend: str) -> Step:
        def step() -> None:
            os.environ["RECONKIT_OPS_BACKEND"] = backend
            net.zero_grad(set_to_none=True)
            torch.nn.functional.l1_loss(net(kspace, mask), target).backward()

        return step

    previous = os.environ.get("RECONKIT_OPS_BACKEND")
    try:
        med = interleaved_medians(
            {b: step_with(b) for b in ("triton", "torch")}, args.step_repeats, args.warmup, torch.cuda.synchronize
        )
    finally:
        os.environ.pop("RECONKIT_OPS_BACKEND", None)
        if previous is not None:
            os.environ["RECONKIT_OPS_BACKEND"] = previous
    print()
    print(f"VarNet ({args.cascades} cascades) training step, median of {args.step_repeats} interleaved repeats:")
    print()
    print("| RECONKIT_OPS_BACKEND=triton (ms) | RECONKIT_OPS_BACKEND=torch (ms) | speed-up |")
    print("|---:|---:|---:|")
    print(f"| {med['triton'] * 1e3:.1f} | {med['torch'] * 1e3:.1f} | {med['torch'] / med['triton']:.2f}x |")


# -------------------------------------------------------------------------------------- CPU correctness run


def max_errors(ours: torch.Tensor, expected: torch.Tensor) -> str:
    return f"{(ours - expected).abs().max().item():.1e}"


def correctness_checks() -> None:
    """Kernels (interpreted, CPU) against the torch path and fastmri on small shapes, forward and backward."""
    block = VarNetBlock(torch.nn.Identity())
    print("| shape (B, C, H, W) | sens_expand vs torch / fastmri | sens_reduce vs torch / fastmri "
          "| data_consistency vs torch / fastmri | gradients vs torch (max abs) |")
    print("|---|---|---|---|---|")
    for batch, coils, height, width in [(2, 1, 8, 6), (2, 3, 6, 10), (1, 8, 5, 7), (2, 3, 7, 4)]:
        gen = torch.Generator().manual_seed(height * width + coils)
        shape = (batch, coils, height, width, 2)
        image = torch.randn((batch, 1, height, width, 2), generator=gen)
        kspace, ref, sens_maps = (torch.randn(shape, generator=gen) for _ in range(3))
        mask = torch.rand((batch, 1, 1, width, 1), generator=gen) > 0.5
        weight = torch.tensor(0.3)
        expand = sens_expand(image, sens_maps, backend="triton")
        reduce = sens_reduce(kspace, sens_maps, backend="triton")
        dc = data_consistency(kspace, ref, mask, weight, backend="triton")
        grad_errors = []
        for op, inputs in (
            (lambda b, x, s: sens_expand(x, s, backend=b), (image, sens_maps)),
            (lambda b, k, s: sens_reduce(k, s, backend=b), (kspace, sens_maps)),
            (lambda b, k, k0, w, m=mask: data_consistency(k, k0, m, w, backend=b), (kspace, ref, weight)),
        ):
            grads = {}
            for backend in ("triton", "torch"):
                leaves = [t.clone().requires_grad_() for t in inputs]
                out = op(backend, *leaves)
                out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape))
                grads[backend] = [leaf.grad for leaf in leaves]
            grad_errors += [(a - b).abs().max().item() for a, b in zip(grads["triton"], grads["torch"])]
        print(
            f"| ({batch}, {coils}, {height}, {width}) "
            f"| {max_errors(expand, sens_expand(image, sens_maps, backend='torch'))} / "
            f"{max_errors(expand, block.sens_expand(image, sens_maps))} "
            f"| {max_errors(reduce, sens_reduce(kspace, sens_maps, backend='torch'))} / "
            f"{max_errors(reduce, block.sens_reduce(kspace, sens_maps))} "
            f"| {max_errors(dc, data_consistency(kspace, ref, mask, weight, backend='torch'))} / "
            f"{max_errors(dc, fastmri_dc(kspace, ref, mask, weight))} "
            f"| {max(grad_errors):.1e} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_problem_options(parser, repeats=50, warmup=5)
    parser.add_argument("--cascades", type=int, default=12, help="VarNet cascades for the training-step table")
    parser.add_argument("--step-repeats", type=int, default=10,
                        help="timed repeats of the training-step table (default: %(default)s)")
    parser.add_argument("--peak-gbps", type=float, default=None, help="device peak bandwidth (default: measured)")
    parser.add_argument("--check-only", action="store_true", help="only the correctness checks (interpreter)")
    args = parser.parse_args(argv)

    if not triton_available():
        print("Triton is not available on this machine: nothing to benchmark or check.")
        return 1
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if args.check_only and interpreted:
        correctness_checks()
        return 0
    if torch.cuda.is_available() and not args.check_only:
        gpu_benchmark(args, torch.device("cuda"))
        return 0
    if not args.check_only:
        print("No CUDA device on this machine: GPU timings NOT measured. Running the correctness checks only, with")
        print("the kernels on CPU under Triton's interpreter (TRITON_INTERPRET=1), maximum absolute errors:")
        print()
    # the interpreter must be switched on before Triton is imported: run the checks in a child process
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("RECONKIT_OPS_BACKEND", None)
    return subprocess.run([sys.executable, __file__, "--check-only"], env=env, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
