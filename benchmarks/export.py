"""ONNX export benchmark: ONNX Runtime (CPU EP) vs torch eager, and the in-graph MatMul FFT vs ORT's DFT vs torch.fft.

Both sides of every comparison run alternately inside one loop (which goes first alternates too), so machine load
hits them alike. Prints Markdown tables: medians over repeats in milliseconds, ratios, and errors of the ONNX
result against torch eager (max |diff| / max |ref| and relative L2).

    .venv/bin/python benchmarks/export.py            # VarNet 12 cascades, chans 18, 15 coils; fastMRI sizes
    .venv/bin/python benchmarks/export.py --small    # tiny VarNet, 4 coils, small sizes: a quick check
    .venv/bin/python benchmarks/export.py --skip-varnet --stage-costs   # the FFT tables, and the floor of the 2D one
    .venv/bin/python benchmarks/export.py --skip-varnet --stacked-plans # and the model's W radices vs other splits
    .venv/bin/python benchmarks/export.py --skip-varnet --skip-fft --image-models   # U-Net and ViT baselines
    .venv/bin/python benchmarks/export.py --skip-varnet --skip-fft --front-end      # their zero-filled front end
    .venv/bin/python benchmarks/export.py --skip-varnet --skip-fft --session-open checkpoints/varnet_small.onnx
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from _timing import interleaved_medians, machine  # benchmarks/_timing.py (the script's folder is on sys.path)
from onnx import TensorProto, helper

from reconkit.export import export_onnx, load_onnx_metadata, read_onnx, single_size_model
from reconkit.models import VarNet, build_model, contract_model
from reconkit.models.classical import zero_filled
from reconkit.ops import centering_signs, fft2c, fft_impl, fftc, pair_factor
from reconkit.ops.dft_matmul import (
    MAX_RADIX,
    STAGE_PASS_COST,
    centred_fft_matmul_planar,
    stacked_fft_w,
    stacked_frequencies,
    stacked_radices,
    to_stacked_kspace,
)
from reconkit.ops.dft_matmul import radices as axis_radices

FASTMRI_SIZES = [(640, 368), (640, 372), (640, 320), (768, 396), (640, 272)]
SMALL_SIZES = [(64, 46), (72, 66)]


def interleaved(first: Callable[[], object], second: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds of two callables timed alternately (after one warm-up call each)."""
    med = interleaved_medians({"first": first, "second": second}, repeats, warmup=1)
    return med["first"], med["second"]


def errors(result: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(max |diff| / max |ref|, ||diff|| / ||ref||)."""
    diff = result - reference
    return float(np.abs(diff).max() / np.abs(reference).max()), float(np.linalg.norm(diff) / np.linalg.norm(reference))


def session(model: bytes | str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # ORT's idle worker threads spin by default and would steal the CPU from the torch run timed right after
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class _StackedFFT(torch.nn.Module):
    """The exported VarNet cascades' form: stacked W-major ``(2, W, *rest)`` in, ``(P, 2, f_m, *rest)`` out;
    ``factors`` another split of W than the model's."""

    def __init__(self, factors: tuple[int, ...] | None = None):
        super().__init__()
        self.factors = factors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stacked_fft_w(x, self.factors)


class _PlanarFFT2(torch.nn.Module):
    """The planar four-step 2D transform (the coil operators' form; until 2026-12-07 also ``fft2c``'s) on
    interleaved data: one split of the parts in, one stack out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        re, im = centred_fft_matmul_planar(x[..., 0], x[..., 1], False)
        return torch.stack((re, im), dim=-1)


class _FFT(torch.nn.Module):
    def __init__(self, dims: tuple[int, ...] = (-2, -1)):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fftc(x, self.dims)


def traced_graph(module: torch.nn.Module, shape: tuple[int, ...]) -> onnx.ModelProto:
    """``module`` traced on one ``shape`` input ``x`` (output ``y``), opset 17, under ``fft_impl("matmul")``."""
    with tempfile.TemporaryDirectory() as tmp, fft_impl("matmul"):
        path = Path(tmp) / "fft.onnx"
        torch.onnx.export(module, (torch.zeros(shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
        return onnx.load(str(path))


def matmul_fft_graph(shape: tuple[int, ...], dims: tuple[int, ...] = (-2, -1)) -> bytes:
    """ONNX graph of reconkit's in-graph FFT (``fftc`` along ``dims`` traced under ``fft_impl("matmul")``).

    The 2D transform's graph ends in a Reshape that only merges axes of data already in natural order; it is
    dropped (output ``y``: the last Transpose's result, the same bytes), as in :func:`stacked_fft_graph`: on a graph
    output ONNX Runtime copies the whole tensor there (≈ 3–4 ms at 15 × 640 × 368), which a model never pays."""
    model = traced_graph(_FFT(dims), shape)
    if dims == (-2, -1):
        model = _without_output_reshape(model)
    return model.SerializeToString()


def _without_output_reshape(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its final Reshape to ``y`` (and the Constant holding its target shape) removed: the graph's
    output is then the Reshape's input, of the same bytes in the same order."""
    model = onnx.shape_inference.infer_shapes(model)
    reshape = model.graph.node[-1]
    if reshape.op_type != "Reshape" or reshape.output[0] != "y":
        raise RuntimeError(f"expected the graph to end in a Reshape to 'y'; got {reshape.op_type}")
    (inner,) = [info for info in model.graph.value_info if info.name == reshape.input[0]]
    for node in [n for n in model.graph.node if n is reshape or list(n.output) == [reshape.input[1]]]:
        model.graph.node.remove(node)
    model.graph.output[0].CopyFrom(inner)
    onnx.checker.check_model(model)
    return model


def stacked_fft_graph(shape: tuple[int, ...], factors: tuple[int, ...] | None = None) -> bytes:
    """ONNX graph of the stacked W-major MatMul FFT on one ``shape`` ``(2, W, *rest)`` input ``x``.

    Its output ``y`` is the last MatMul's ``(P, 2·f_m, prod(rest))`` result: the stacked k-space's bytes in its
    order. The trailing Reshape to ``(f₁, 2, f₂, *rest)`` is dropped (:func:`_without_output_reshape`): inside the
    exported VarNet ONNX Runtime runs it as a view, but on a graph output it copies the whole tensor (≈ 5 ms at
    15 × 640 × 368), which the model never pays."""
    return _without_output_reshape(traced_graph(_StackedFFT(factors), shape)).SerializeToString()


def ort_dft_graph(shape: tuple[int, ...]) -> bytes:
    """Centred 2D FFT from two ONNX ``DFT`` nodes (opset 20) with the checkerboard sign modulation (even H, W)."""
    height, width = shape[-3], shape[-2]
    pre = centering_signs(height, width).numpy()
    post = pre * (-1.0) ** (height // 2 + width // 2)
    inits = [
        helper.make_tensor("pre", TensorProto.FLOAT, [height, width, 1], pre.ravel()),
        helper.make_tensor("post", TensorProto.FLOAT, [height, width, 1], post.ravel()),
        helper.make_tensor("axis_h", TensorProto.INT64, [], [len(shape) - 3]),
        helper.make_tensor("axis_w", TensorProto.INT64, [], [len(shape) - 2]),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "pre"], ["xm"]),
        helper.make_node("DFT", ["xm", "", "axis_h"], ["fh"]),
        helper.make_node("DFT", ["fh", "", "axis_w"], ["fhw"]),
        helper.make_node("Mul", ["fhw", "post"], ["fs"]),
        helper.make_node("Mul", ["fs", "scale"], ["y"]),
    ]
    inits.append(helper.make_tensor("scale", TensorProto.FLOAT, [], [1.0 / np.sqrt(height * width)]))
    graph = helper.make_graph(nodes, "ort_dft", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def bench_fft(coils: int, height: int, width: int, repeats: int, threads: int) -> list[str]:
    shape = (1, coils, height, width, 2)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    xn = x.numpy()
    reference = fft2c(x).numpy()
    ours = session(matmul_fft_graph(shape), threads)
    dft = session(ort_dft_graph(shape), threads)
    t_ours, t_torch = interleaved(lambda: ours.run(None, {"x": xn}), lambda: fft2c(x), repeats)
    planar = session(traced_graph(_PlanarFFT2(), shape).SerializeToString(), threads)
    t_planar, t_torch_p = interleaved(lambda: planar.run(None, {"x": xn}), lambda: fft2c(x), repeats)
    med = interleaved_medians({"ours": lambda: ours.run(None, {"x": xn}), "dft": lambda: dft.run(None, {"x": xn}),
                               "torch": lambda: fft2c(x)}, repeats, warmup=1)
    t_ours2, t_dft, t_torch_d = med["ours"], med["dft"], med["torch"]
    e_ours = errors(ours.run(None, {"x": xn})[0].reshape(reference.shape), reference)
    e_dft = errors(dft.run(None, {"x": xn})[0], reference)
    # the 1D transform along W that VarNet's hybrid-space cascades use (line masks)
    ours_w = session(matmul_fft_graph(shape, (-1,)), threads)
    t_ours_w, t_torch_w = interleaved(lambda: ours_w.run(None, {"x": xn}), lambda: fftc(x, (-1,)), repeats)
    e_ours_w = errors(ours_w.run(None, {"x": xn})[0], fftc(x, (-1,)).numpy())
    # the same transform in the stacked W-major layout the exported VarNet's cascades hold their data in
    stacked_x = x.permute(4, 3, 0, 1, 2).contiguous()  # (2, W, 1, C, H)
    stacked = session(stacked_fft_graph(tuple(stacked_x.shape)), threads)
    feeds = {"x": stacked_x.numpy()}
    t_stacked, t_torch_w2 = interleaved(lambda: stacked.run(None, feeds), lambda: fftc(x, (-1,)), repeats)
    expected = to_stacked_kspace(fftc(x, (-1,)).permute(4, 0, 1, 2, 3)).numpy()
    e_stacked = errors(stacked.run(None, feeds)[0].reshape(expected.shape), expected)
    size = f"{coils}×{height}×{width}"
    return [
        f"| {size} | torch.fft (eager) | {t_torch * 1e3:.1f} | 1.00 | – | – |",
        (f"| {size} | ORT, reconkit MatMul FFT | {t_ours * 1e3:.1f} | {t_ours / t_torch:.2f} | {e_ours[0]:.1e} | "
         f"{e_ours[1]:.1e} |"),
        f"| {size} | torch.fft (eager), same loop as the next row | {t_torch_p * 1e3:.1f} | 1.00 | – | – |",
        f"| {size} | ORT, planar four-step form (before 2026-12-07) | {t_planar * 1e3:.1f} | {t_planar / t_torch_p:.2f} | "
        "| |",
        f"| {size} | torch.fft (eager), same loop as the next two rows | {t_torch_d * 1e3:.1f} | 1.00 | – | – |",
        f"| {size} | ORT, ONNX DFT op | {t_dft * 1e3:.1f} | {t_dft / t_torch_d:.2f} | {e_dft[0]:.1e} | {e_dft[1]:.1e} |",
        f"| {size} | → DFT / MatMul FFT (same loop) | | **{t_dft / t_ours2:.1f}×** | | |",
        f"| {size}, 1D along W | torch.fft (eager) | {t_torch_w * 1e3:.1f} | 1.00 | – | – |",
        (f"| {size}, 1D along W | ORT, reconkit MatMul FFT | {t_ours_w * 1e3:.1f} | {t_ours_w / t_torch_w:.2f} | "
         f"{e_ours_w[0]:.1e} | {e_ours_w[1]:.1e} |"),
        f"| {size}, 1D along W | torch.fft (eager), same loop as the next row | {t_torch_w2 * 1e3:.1f} | 1.00 | – | – |",
        (f"| {size}, 1D along W | ORT, reconkit MatMul FFT, stacked W-major as in the exported VarNet | "
         f"{t_stacked * 1e3:.1f} | {t_stacked / t_torch_w2:.2f} | {e_stacked[0]:.1e} | {e_stacked[1]:.1e} |"),
    ]


def bench_stacked_plans(coils: int, sizes: list[tuple[int, int]], repeats: int, threads: int) -> list[str]:
    """The stacked W transform with the model's radices (:func:`reconkit.ops.dft_matmul.stacked_radices`) against
    the planar transform's radices (the model's until 2026-12-06; two for the fastMRI widths) and the model's radices
    in the reverse order, with torch.fft along W in the same loop, per size: what ``STAGE_PASS_COST`` trades."""
    rows = []
    for height, width in sizes:
        x = torch.randn(1, coils, height, width, 2, generator=torch.Generator().manual_seed(width))
        stacked_x = x.permute(4, 3, 0, 1, 2).contiguous()  # (2, W, 1, C, H)
        reference = fftc(x, (-1,)).permute(4, 3, 0, 1, 2).numpy()  # (2, W, 1, C, H), natural k
        plans = {"model": stacked_radices(width),
                 "planar plan (the model's until 2026-12-06)": tuple(axis_radices(width)),
                 "model, reversed": stacked_radices(width)[::-1]}
        plans = {name: plan for i, (name, plan) in enumerate(plans.items()) if plan not in list(plans.values())[:i]}
        steps: dict[str, Callable[[], object]] = {"torch": lambda x=x: fftc(x, (-1,))}
        errs = {}
        for name, plan in plans.items():
            sess, feeds = session(stacked_fft_graph(tuple(stacked_x.shape), plan), threads), {"x": stacked_x.numpy()}
            steps[name] = lambda sess=sess, feeds=feeds: sess.run(None, feeds)
            out = sess.run(None, feeds)[0].reshape((-1, 2, plan[-1]) + reference.shape[2:])
            errs[name] = errors(out, reference[:, stacked_frequencies(plan)].transpose(1, 0, 2, 3, 4, 5))
        med = interleaved_medians(steps, repeats, warmup=1)
        size = f"{coils}×{height}×{width}"
        rows.append(f"| {size} | torch.fft (eager) | – | – | {med['torch'] * 1e3:.1f} | 1.00 | – |")
        for name, plan in plans.items():
            cost = sum(f + STAGE_PASS_COST for f in plan)
            rows.append(f"| {size} | {name} | {'·'.join(map(str, plan))} | {cost:.1f} | {med[name] * 1e3:.1f} | "
                        f"{med[name] / med['torch']:.2f} | {errs[name][1]:.1e} |")
    return rows


def stage_graph(radix: int, points: int) -> bytes:
    """One real-form FFT stage on ``points`` complex values: ``(points / radix, 2·radix) @ (2·radix, 2·radix)``, the
    GEMM every MatMul FFT stage of that radix costs at least (the right-multiplication, MLAS's faster form)."""
    k = 2 * radix
    rng = np.random.default_rng(radix)
    weight = helper.make_tensor("m", TensorProto.FLOAT, [k, k], rng.standard_normal(k * k).astype(np.float32))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "m"], ["y"])], "stage",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [points // radix, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [points // radix, k])],
                              initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def cheapest_plan(length: int, cost: dict[int, float]) -> tuple[float, list[int]]:
    """Radices (each with a measured ``cost``) whose product is ``length`` and whose summed cost is least."""
    if length == 1:
        return 0.0, []
    best = (float("inf"), [])
    for radix, seconds in cost.items():
        if length % radix == 0:
            rest, plan = cheapest_plan(length // radix, cost)
            best = min(best, (seconds + rest, [radix] + plan))
    return best


def bench_stage_costs(coils: int, height: int, width: int, repeats: int, threads: int) -> list[str]:
    """What the GEMM stages of any MatMul 2D FFT cost at least, next to torch.fft in the same loop: each radix
    (2..64, and any larger dense stage of reconkit's plan) dividing H or W timed as one real-form stage over all the
    points, the cheapest plan per axis summed. Layout moves (de-interleaving, transposes between the axes) come on
    top."""
    points = coils * height * width
    # every radix up to 64 that divides H or W, plus the dense stage reconkit's own plan takes for a larger factor
    radices = sorted({r for n in (height, width) for r in range(2, MAX_RADIX + 1) if n % r == 0}
                     | {f for n in (height, width) for f in axis_radices(n) if f > MAX_RADIX})
    x = torch.randn(1, coils, height, width, 2, generator=torch.Generator().manual_seed(0))
    steps: dict[str, Callable[[], object]] = {"torch": lambda: fft2c(x)}
    for radix in radices:
        sess = session(stage_graph(radix, points), threads)
        feeds = {"x": np.random.default_rng(radix).standard_normal((points // radix, 2 * radix), dtype=np.float32)}
        steps[str(radix)] = lambda sess=sess, feeds=feeds: sess.run(None, feeds)
    med = interleaved_medians(steps, repeats, warmup=1)
    cost = {radix: med[str(radix)] for radix in radices}
    rows = [f"| radix {radix} | {cost[radix] * 1e3:.1f} | |" for radix in radices]
    (h_cost, h_plan), (w_cost, w_plan) = cheapest_plan(height, cost), cheapest_plan(width, cost)
    bound = h_cost + w_cost
    plans = f"H {'·'.join(map(str, h_plan))} + W {'·'.join(map(str, w_plan))}"
    rows += [f"| torch.fft 2D (same loop) | {med['torch'] * 1e3:.1f} | 1.00 |",
             f"| cheapest stages, {plans} | {bound * 1e3:.1f} | **{bound / med['torch']:.2f}** |"]
    return rows


MODEL_TABLE_HEADER = ("| size | coils | torch eager ms | ORT ms | speed-up (torch / ORT) | max err | rel L2 err | "
                      "export s |\n|---|---|---|---|---|---|---|---|")  # the rows of bench_model


def line_mask(width: int, random_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """``(1, 1, 1, W, 1)`` line mask: the central 8 % of the lines and each other line with ``random_fraction``."""
    mask = (torch.rand(width, generator=generator) < random_fraction).float()
    low = round(0.08 * width)
    mask[width // 2 - low // 2 : width // 2 - low // 2 + low] = 1
    return mask.reshape(1, 1, 1, width, 1)


def bench_model(model: torch.nn.Module, coils: int, height: int, width: int, repeats: int, threads: int) -> str:
    """One table row: ``model`` (contract call ``(masked_kspace, mask) -> image``) in ORT vs torch eager."""
    generator = torch.Generator().manual_seed(height + width)
    mask = line_mask(width, 0.2, generator)
    kspace = torch.randn(1, coils, height, width, 2, generator=generator) * mask
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = export_onnx(model, Path(tmp) / "model.onnx", (coils, height, width))
        export_s = time.perf_counter() - start
        sess = session(str(path), threads)
    feeds = {"masked_kspace": kspace.numpy(), "mask": mask.numpy()}

    def eager() -> torch.Tensor:
        with torch.inference_mode():
            return model(kspace, mask)

    t_ort, t_torch = interleaved(lambda: sess.run(None, feeds), eager, repeats)
    err = errors(sess.run(None, feeds)[0], eager().numpy())
    return (f"| {height}×{width} | {coils} | {t_torch * 1e3:.0f} | {t_ort * 1e3:.0f} | **{t_torch / t_ort:.2f}×** | "
            f"{err[0]:.1e} | {err[1]:.1e} | {export_s:.0f} |")


class _ZeroFilled(torch.nn.Module):
    """The image models' zero-filled RSS image: from the sampled lines (what the front end exports) or, with
    ``full``, from the full 2D transform of the masked k-space (what it exported before)."""

    def __init__(self, full: bool = False):
        super().__init__()
        self.full = full

    def forward(self, masked_kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.full:
            return zero_filled(masked_kspace * pair_factor(mask))
        return zero_filled(masked_kspace, mask)


FRONT_END_ACCELERATIONS = (8, 4, 2, 1)


def bench_front_end(coils: int, height: int, width: int, repeats: int, threads: int) -> list[str]:
    """Rows for each acceleration: the zero-filled RSS image in torch eager, ORT from the sampled lines and ORT
    from the full 2D MatMul transform; one exported graph of each (traced on another mask) serves every mask."""
    generator = torch.Generator().manual_seed(height * width)
    example = (torch.randn(1, 2, height, width, 2), line_mask(width, 0.3, generator))
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp, fft_impl("matmul"), torch.no_grad():
        for name, full in (("lines", False), ("full", True)):
            path = Path(tmp) / f"{name}.onnx"
            torch.onnx.export(_ZeroFilled(full), example, str(path), dynamo=False, opset_version=17,
                              input_names=["masked_kspace", "mask"], output_names=["image"],
                              dynamic_axes={"masked_kspace": {0: "batch", 1: "coils"}, "mask": {0: "batch"}})
            sessions[name] = session(str(path), threads)
    rows = []
    for acceleration in FRONT_END_ACCELERATIONS:
        mask = line_mask(width, max(0.0, (1 / acceleration - 0.08) / 0.92), generator)
        kspace = torch.randn(1, coils, height, width, 2, generator=generator) * mask
        feeds = {"masked_kspace": kspace.numpy(), "mask": mask.numpy()}

        def eager(kspace=kspace, mask=mask) -> torch.Tensor:
            with torch.inference_mode():
                return zero_filled(kspace, mask)

        steps = {"torch": eager, **{name: (lambda s=s, f=feeds: s.run(None, f)) for name, s in sessions.items()}}
        med = interleaved_medians(steps, repeats, warmup=1)
        err = errors(sessions["lines"].run(None, feeds)[0], eager().numpy())
        rows.append(f"| {height}×{width} | {acceleration}× | {int(mask.sum())} | {med['torch'] * 1e3:.1f} | "
                    f"{med['lines'] * 1e3:.1f} | **{med['torch'] / med['lines']:.2f}×** | {med['full'] * 1e3:.1f} | "
                    f"{err[1]:.1e} |")
    return rows


IMAGE_MODELS = {  # the shipped configs' models: configs/unet_multicoil.yaml, configs/vit_multicoil.yaml
    "U-Net": ("unet", {"in_chans": 1, "out_chans": 1, "chans": 32, "num_pool_layers": 4}),
    "ViT": ("vit", {"patch_size": 10, "embed_dim": 128, "depth": 6, "num_heads": 8}),
}

CONV_CHAIN = 4  # convolutions per timed chain: ORT's NCHWc layout reorders at its ends are shared, as in a U-Net


def conv_graph(batch: int, chans: int, height: int, width: int, weights: list[np.ndarray]) -> bytes:
    """A chain of 3×3 ``Conv`` nodes (padding 1, ``chans`` → ``chans``), one per weight, as in VarNet's U-Nets."""
    names = ["x"] + [f"y{i}" for i in range(len(weights))]
    nodes = [helper.make_node("Conv", [names[i], f"w{i}"], [names[i + 1]], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
             for i in range(len(weights))]
    shape = [batch, chans, height, width]
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, shape)],
                              initializer=[helper.make_tensor(f"w{i}", TensorProto.FLOAT, w.shape, w.ravel())
                                           for i, w in enumerate(weights)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def bench_conv_layers(kwargs: dict, coils: int, height: int, width: int, repeats: int, threads: int) -> list[str]:
    """The 3×3 convolutions of each U-Net level, ORT (MLAS) vs torch eager (oneDNN, channels-last as
    :class:`reconkit.models.Unet` runs on the CPU), per convolution of a chain of :data:`CONV_CHAIN`: the cascade
    U-Net (batch 1, ``chans·2^level`` channels) and the sensitivity U-Net (batch = coils), at the padded image
    size."""

    def pad(n: int) -> int:  # NormUnet pads H and W to multiples of 16
        return (n + 15) // 16 * 16

    rows = []
    for net, batch, chans, pools in (("cascade", 1, kwargs["chans"], kwargs["pools"]),
                                     ("sensitivity", coils, kwargs["sens_chans"], kwargs["sens_pools"])):
        for level in range(pools + 1):
            c, h, w = chans * 2**level, pad(height) >> level, pad(width) >> level
            rng = np.random.default_rng(level)
            weights = [rng.standard_normal((c, c, 3, 3), dtype=np.float32) / (3 * c**0.5) for _ in range(CONV_CHAIN)]
            x = torch.randn(batch, c, h, w)
            sess, xn = session(conv_graph(batch, c, h, w, weights), threads), x.numpy()
            x = x.contiguous(memory_format=torch.channels_last)  # as reconkit's eager U-Net runs on the CPU

            def eager(x: torch.Tensor = x, wts: tuple = tuple(torch.from_numpy(w) for w in weights)) -> torch.Tensor:
                with torch.inference_mode():
                    for wt in wts:
                        x = torch.nn.functional.conv2d(x, wt, padding=1)
                    return x

            t_ort, t_torch = interleaved(lambda sess=sess, xn=xn: sess.run(None, {"x": xn}), eager, repeats)
            rows.append(f"| {net} | {level} | {batch}×{c}×{h}×{w} | {t_torch / CONV_CHAIN * 1e3:.1f} | "
                        f"{t_ort / CONV_CHAIN * 1e3:.1f} | **{t_torch / t_ort:.2f}×** |")
    return rows


def bench_eager_forms(model: VarNet, coils: int, height: int, width: int, repeats: int) -> str:
    """Eager VarNet with a line mask (hybrid-space cascades) vs the same mask broadcast to 2D (k-space cascades)."""
    generator = torch.Generator().manual_seed(height + width)
    mask = (torch.rand(1, 1, 1, width, 1, generator=generator) < 0.25).float()
    kspace = torch.randn(1, coils, height, width, 2, generator=generator) * mask
    full_mask = mask.expand(1, 1, height, width, 1).contiguous()

    def run(m: torch.Tensor) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with torch.inference_mode():
                return model(kspace, m)

        return call

    med = interleaved_medians({"hybrid": run(mask), "kspace": run(full_mask)}, repeats, warmup=1)
    err = errors(run(mask)().numpy(), run(full_mask)().numpy())
    return (f"| {height}×{width} | {coils} | {med['kspace'] * 1e3:.0f} | {med['hybrid'] * 1e3:.0f} | "
            f"**{med['kspace'] / med['hybrid']:.2f}×** | {err[1]:.1e} |")


def bench_session_open(path: Path, repeats: int, threads: int) -> list[str]:
    """Seconds to open an ONNX Runtime session on a multi-size file against one on each size's branch alone
    (``single_size_model``, what ``reconkit reconstruct`` opens), and the peak of the two outputs' difference."""
    proto = read_onnx(path)
    whole = session(str(path), threads)  # for the outputs; the timed loop opens and drops its own
    rows = []
    for height, width in load_onnx_metadata(path)["reconkit.spatial_sizes"]:
        branch = single_size_model(proto, height, width).SerializeToString()
        t_whole, t_branch = interleaved(lambda: session(str(path), threads), lambda b=branch: session(b, threads),
                                        repeats)
        generator = torch.Generator().manual_seed(height + width)
        mask = line_mask(width, 0.2, generator)
        kspace = torch.randn(1, 4, height, width, 2, generator=generator) * mask
        feeds = {"masked_kspace": kspace.numpy(), "mask": mask.numpy()}
        e_max, e_rel = errors(session(branch, threads).run(None, feeds)[0], whole.run(None, feeds)[0])
        rows.append(f"| {height}×{width} | {t_whole:.2f} | {t_branch:.2f} | {t_whole / t_branch:.1f}× | "
                    f"{e_max:.1e} | {e_rel:.1e} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny VarNet, 4 coils, small sizes (quick check)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for torch and ORT")
    parser.add_argument("--sizes", nargs="+", metavar="HxW", help="spatial sizes (default: the fastMRI sizes)")
    parser.add_argument("--cascades", type=int, help="override the VarNet cascade count (e.g. a quicker parity pass)")
    parser.add_argument("--chans", type=int, help="override the VarNet cascade U-Net channels")
    parser.add_argument("--skip-varnet", action="store_true", help="only the FFT comparison")
    parser.add_argument("--skip-fft", action="store_true", help="only the VarNet comparison")
    parser.add_argument("--image-models", action="store_true",
                        help="also the image-domain baselines (fastMRI's U-Net, the ViT) behind the zero-filled "
                             "front end")
    parser.add_argument("--front-end", action="store_true",
                        help="also the image models' zero-filled RSS image alone, by acceleration: ORT from the "
                             "sampled lines (exported) and from the full 2D transform vs torch eager, every size")
    parser.add_argument("--conv-layers", action="store_true",
                        help="also time each U-Net level's 3x3 convolutions in torch and ORT (first size)")
    parser.add_argument("--stage-costs", action="store_true",
                        help="also time one real-form MatMul FFT stage per radix and the cheapest 2D plan's stages "
                             "against torch.fft (first size): the floor of any MatMul 2D FFT")
    parser.add_argument("--stacked-plans", action="store_true",
                        help="also time the stacked W transform with the model's radices against other splits of W, "
                             "every size (what STAGE_PASS_COST trades)")
    parser.add_argument("--eager-forms", action="store_true",
                        help="also time eager VarNet in hybrid space (line mask) vs k-space (the mask broadcast to 2D)")
    parser.add_argument("--session-open", metavar="MODEL.onnx", type=Path,
                        help="also time opening an ONNX Runtime session on this multi-size file vs on one size's "
                             "branch alone, for each size it serves")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    coils = 4 if args.small else 15
    sizes = SMALL_SIZES if args.small else FASTMRI_SIZES
    if args.sizes:
        sizes = [tuple(int(v) for v in size.lower().split("x")) for size in args.sizes]
    repeats = args.repeats or (5 if args.small else 3)
    kwargs = ({"num_cascades": 2, "chans": 4, "pools": 2, "sens_chans": 2, "sens_pools": 2} if args.small
              else {"num_cascades": 12, "chans": 18, "pools": 4, "sens_chans": 8, "sens_pools": 4})
    if args.cascades:
        kwargs["num_cascades"] = args.cascades
    if args.chans:
        kwargs["chans"] = args.chans

    print(f"machine: {machine()}, {args.threads} threads; torch {torch.__version__}, "
          f"onnxruntime {ort.__version__} (CPUExecutionProvider), onnx {onnx.__version__}\n")
    if not args.skip_fft:
        fft_h, fft_w = sizes[0]
        print(f"FFT alone (centred 2D FFT, fp32), median of {max(repeats, 7)} interleaved repeats:\n")
        print("| input | implementation | ms | / torch.fft | max err | rel L2 err |\n|---|---|---|---|---|---|")
        for height, width in sizes:
            for line in bench_fft(coils, height, width, max(repeats, 7), args.threads):
                print(line, flush=True)
        if args.stage_costs:
            print(f"\nMatMul FFT stages alone, {coils}×{fft_h}×{fft_w} points, ms per stage (one real GEMM each), "
                  f"median of {max(repeats, 7)} interleaved repeats:\n")
            print("| stage | ms | / torch.fft |\n|---|---|---|")
            for line in bench_stage_costs(coils, fft_h, fft_w, max(repeats, 7), args.threads):
                print(line, flush=True)
        if args.stacked_plans:
            print(f"\nStacked W transform (the exported VarNet's cascades), {coils} coils, by split of W, median of "
                  f"{max(repeats, 7)} interleaved repeats; cost = Σ (radix + {STAGE_PASS_COST}):\n")
            print("| input | plan | radices | cost | ms | / torch.fft | rel L2 err |\n|---|---|---|---|---|---|---|")
            for line in bench_stacked_plans(coils, sizes, max(repeats, 7), args.threads):
                print(line, flush=True)
    if args.front_end:
        print(f"\nZero-filled RSS image (the image models' front end), {coils} coils, median of {max(repeats, 7)} "
              "interleaved repeats; ORT graphs traced once on another mask:\n")
        print("| size | acceleration | lines | torch eager ms | ORT, sampled lines ms | torch / ORT | "
              "ORT, full 2D transform ms | rel L2 err |\n|---|---|---|---|---|---|---|---|")
        for height, width in sizes:
            for line in bench_front_end(coils, height, width, max(repeats, 7), args.threads):
                print(line, flush=True)
    if args.session_open:
        print(f"\nOpening {args.session_open}: ONNX Runtime session on the whole file vs on one size's branch, "
              f"median of {repeats} interleaved repeats; output error of the branch against the whole file "
              "(batch 1, 4 coils, random k-space):\n")
        print("| size | whole file s | this size's branch s | ratio | max err | rel L2 err |\n|---|---|---|---|---|---|")
        for line in bench_session_open(args.session_open, repeats, args.threads):
            print(line, flush=True)
    if args.image_models:
        print(f"\nImage-domain models behind the zero-filled front end, random weights, batch 1; median of {repeats} "
              "interleaved repeats:\n")
        for name, (model_type, image_kwargs) in IMAGE_MODELS.items():
            torch.manual_seed(0)
            image_model = contract_model(build_model(model_type, **image_kwargs)).eval()
            if model_type == "vit":  # a trained-like head: the fresh residual ViT returns its input
                torch.nn.init.normal_(image_model.model.head.weight, std=0.02)
            print(f"{name} {image_kwargs}:\n")
            print(MODEL_TABLE_HEADER)
            for height, width in sizes:
                print(bench_model(image_model, coils, height, width, repeats, args.threads), flush=True)
            print()
    if args.skip_varnet:
        return
    torch.manual_seed(0)
    model = VarNet(**kwargs).eval()
    print(f"\nVarNet {kwargs}, random weights, batch 1; median of {repeats} interleaved repeats:\n")
    print(MODEL_TABLE_HEADER)
    for height, width in sizes:
        print(bench_model(model, coils, height, width, repeats, args.threads), flush=True)
    if args.conv_layers:
        height, width = sizes[0]
        print(f"\n3×3 convolutions of each U-Net level (chains of {CONV_CHAIN}, ms per convolution), {height}×{width} "
              f"padded to multiples of 16, median of {max(repeats, 9)}:\n")
        print("| U-Net | level | input | torch eager ms | ORT ms | speed-up (torch / ORT) |\n|---|---|---|---|---|---|")
        for line in bench_conv_layers(kwargs, coils, height, width, max(repeats, 9), args.threads):
            print(line, flush=True)
    if args.eager_forms:
        print(f"\nEager VarNet, hybrid-space vs k-space cascades (same weights and data), median of {repeats}:\n")
        print("| size | coils | k-space ms | hybrid ms | speed-up | rel L2 difference |\n|---|---|---|---|---|---|")
        for height, width in sizes:
            print(bench_eager_forms(model, coils, height, width, repeats), flush=True)


if __name__ == "__main__":
    main()
