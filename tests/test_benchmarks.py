"""The benchmark scripts still run: export.py reports parity (errors only: never a timed assertion), diagnostics.py
its tables, serve.py a load table without errors, kernels.py --check-only its interpreter checks."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tables(text: str) -> list[tuple[str, list[list[str]]]]:
    """Markdown tables of ``text`` in order: (header line, rows split into stripped cells)."""
    tables: list[tuple[str, list[list[str]]]] = []
    in_table = False
    for line in text.splitlines():
        if not line.startswith("|"):
            in_table = False
        elif not in_table:
            tables.append((line, []))
            in_table = True
        elif not set(line) <= set("|-: "):  # not the separator row
            tables[-1][1].append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return tables


def _benchmark_module(name: str):
    """``benchmarks/<name>.py`` imported as a module (the folder is not a package; its scripts import ``_timing``
    from their own folder)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_interleaved_medians_of_self_timed_steps_are_the_seconds_they_report() -> None:
    """benchmarks/reconstruct.py times each method's pass by its model calls alone and runs the passes interleaved:
    every repeat runs each method once (they ran one method's repeats after another's before)."""
    timing = _benchmark_module("_timing")
    reported = {"a": iter([3.0, 1.0, 2.0]), "b": iter([10.0, 30.0, 20.0]), "c": iter([5.0, 4.0, 6.0])}
    calls: list[str] = []

    def step(name: str):
        def run() -> float:
            calls.append(name)
            return next(reported[name])

        return run

    medians = timing.interleaved_medians({name: step(name) for name in reported}, 3, warmup=0, self_timed=True)
    assert medians == {"a": 2.0, "b": 20.0, "c": 5.0}
    assert [sorted(calls[i:i + 3]) for i in (0, 3, 6)] == [["a", "b", "c"]] * 3


def test_export_fft_table_divides_the_dft_time_by_torch_timed_in_its_own_loop(monkeypatch) -> None:
    """The ONNX DFT row's "/ torch.fft" came from torch.fft's median of another loop (the MatMul FFT's), and
    torch.fft's time moves by up to 6x between loops of one run (docs/benchmarks.md): fake medians, one torch.fft
    time per loop, show which loop the ratio took."""
    import torch

    export = _benchmark_module("export")
    dft_graphs: list[bytes] = []
    dft_runs: list[int] = []
    loops: list[set[str]] = []
    real_dft_graph, real_session = export.ort_dft_graph, export.session

    class CountedSession:
        def __init__(self, inner):
            self.inner = inner

        def run(self, *args):
            dft_runs.append(1)
            return self.inner.run(*args)

    def dft_graph(shape):
        dft_graphs.append(real_dft_graph(shape))
        return dft_graphs[-1]

    def session(model, threads):
        opened = real_session(model, threads)
        return CountedSession(opened) if dft_graphs and model == dft_graphs[-1] else opened

    def medians(steps, repeats, warmup=1, sync=None):
        kinds = {}
        for name, step in steps.items():
            before = len(dft_runs)
            out = step()
            kinds[name] = "dft" if len(dft_runs) > before else "torch" if isinstance(out, torch.Tensor) else "ort"
        loops.append(set(kinds.values()))
        return {name: {"dft": 1.0, "ort": 0.5, "torch": 0.001 * len(loops)}[kind] for name, kind in kinds.items()}

    monkeypatch.setattr(export, "ort_dft_graph", dft_graph)
    monkeypatch.setattr(export, "session", session)
    monkeypatch.setattr(export, "interleaved_medians", medians)
    rows = export.bench_fft(2, 8, 6, 1, 1)
    (loop,) = [i for i, kinds in enumerate(loops, 1) if "dft" in kinds]
    assert "torch" in loops[loop - 1], loops
    (dft_row,) = [row for row in rows if "ONNX DFT op" in row]
    assert dft_row.split("|")[4].strip() == f"{1.0 / (0.001 * loop):.2f}", dft_row


def test_export_benchmark_small_run_reports_parity(tmp_path) -> None:
    from reconkit.export import export_onnx
    from reconkit.models import build_model

    two_sizes = export_onnx(build_model("varnet", num_cascades=1, chans=2, pools=1, sens_chans=2, sens_pools=1),
                            tmp_path / "two_sizes.onnx", [(32, 24), (40, 30)])
    run = subprocess.run(
        [sys.executable, "benchmarks/export.py", "--small", "--repeats", "1", "--threads", "1", "--front-end",
         "--image-models", "--session-open", str(two_sizes)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    tables = _tables(run.stdout)
    model_rows = [rows for header, rows in tables if header.startswith("| size | coils |")]
    assert [len(rows) for rows in model_rows] == [2, 2, 2]  # U-Net, ViT, VarNet at the two small sizes
    for rows in model_rows:
        assert [(row[0], row[1]) for row in rows] == [("64×46", "4"), ("72×66", "4")]
        for row in rows:
            assert float(row[6]) <= 1e-4, row  # relative L2 error, ORT vs torch eager

    front_end = next(rows for header, rows in tables if header.startswith("| size | acceleration |"))
    assert len(front_end) == 8  # two sizes × 8×, 4×, 2×, 1×
    for size in ("64×46", "72×66"):
        rows = [row for row in front_end if row[0] == size]
        lines = [int(row[2]) for row in rows]
        assert lines == sorted(lines) and lines[-1] == int(size.split("×")[1])  # full sampling: every line
        assert all(float(row[7]) <= 1e-6 for row in rows), rows

    fft = next(rows for header, rows in tables if header.startswith("| input | implementation |"))
    matmul = [row for row in fft if row[1].startswith("ORT, reconkit MatMul FFT")]
    assert len(matmul) == 6 and all(float(row[5]) <= 1e-6 for row in matmul), matmul  # (2D, 1D W, stacked W) × 2
    planar = [row for row in fft if row[1].startswith("ORT, planar four-step form")]
    assert [row[0] for row in planar] == ["4×64×46", "4×72×66"]  # the graph of before, same loop as torch

    opening = next(rows for header, rows in tables if header.startswith("| size | whole file s |"))
    assert [row[0] for row in opening] == ["32×24", "40×30"]
    assert all(float(row[5]) <= 1e-5 for row in opening), opening  # a size's branch alone gives the file's output


def test_diagnostics_table_takes_val_ssim_from_the_newest_csv_log(tmp_path) -> None:
    """A rerun of benchmarks/diagnostics.py into the same run folder adds csv/version_N; the table printed the
    val SSIM of version_9 next to version_10's diagnostics (text order)."""
    diagnostics = _benchmark_module("diagnostics")
    for version, ssim in ((2, 0.5), (9, 0.6), (10, 0.9)):
        log = tmp_path / "csv" / f"version_{version}"
        log.mkdir(parents=True)
        (log / "metrics.csv").write_text(f"epoch,val_ssim\n0,{ssim}\n")
    assert diagnostics.last_val_ssim(tmp_path) == 0.9


def test_diagnostics_benchmark_small_run_prints_its_tables(tmp_path) -> None:
    run = subprocess.run(
        [sys.executable, "benchmarks/diagnostics.py", "--small", "--output", str(tmp_path / "runs"), "--plot",
         str(tmp_path / "runs.png")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    tables = _tables(run.stdout)
    (bands,) = [rows for header, rows in tables if header.startswith("| run (val SSIM at the end) |")]
    assert len(bands) == 9 and all(len(row) == 10 for row in bands)  # 3 runs × (first, last, halved-by) × 8 bands
    assert [row[1] for row in bands[:3]] == ["step 0", "step 8", "halved by step"]
    (regime,) = [rows for header, rows in tables if header.startswith("| run | step | weight change |")]
    assert {row[0] for row in regime} == {"init_scale 0.1", "init_scale 1.0", "lr 1e-4"}
    for row in regime:
        assert float(row[2]) > 0 and 0 < float(row[3]) <= 1 and row[5] == "jvp"
    # the same seed and data: the smaller learning rate moves the weights less
    change = {row[0]: float(row[2]) for row in regime if row[1] == "8"}
    assert change["lr 1e-4"] < change["init_scale 0.1"] / 3
    assert (tmp_path / "runs.png").read_bytes()[:4] == b"\x89PNG"


def test_serve_benchmark_small_run_reports_no_errors() -> None:
    run = subprocess.run(
        [sys.executable, "benchmarks/serve.py", "--coils", "2", "--height", "32", "--width", "24", "--requests", "4",
         "--concurrency", "1", "--repeats", "1", "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = next(rows for header, rows in _tables(run.stdout) if header.startswith("| protocol | concurrency |"))
    assert sorted(row[0] for row in rows) == ["grpc", "http"]
    assert all(row[6] == "0" for row in rows), rows  # no failed requests


def test_kernels_benchmark_check_only_runs_the_interpreter_itself() -> None:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "benchmarks/kernels.py", "--check-only"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env=env)
    if "Triton is not available" in run.stdout:  # a skip pytest reports, not a pass that checked nothing
        pytest.skip("Triton is not installed: benchmarks/kernels.py has nothing to check")
    assert run.returncode == 0, run.stderr[-2000:]
    rows = next(rows for header, rows in _tables(run.stdout) if header.startswith("| shape (B, C, H, W) |"))
    assert len(rows) == 4, rows


@pytest.mark.parametrize("name", ["ops", "train"])
def test_gpu_benchmark_on_a_machine_without_cuda_says_no_gpu_timing_is_measured(name, monkeypatch, capsys) -> None:
    """docs/benchmarks.md says the GPU benchmark scripts say so when run on a CPU-only machine; ``--device cuda``
    there ended ops.py in torch's "Found no NVIDIA driver" traceback and train.py in a RuntimeError quoting its
    worker's (numaudit). Now one line, exit code 2, before any work."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    module = _benchmark_module(name)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--device", "cuda"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA device on this machine, so no GPU timing is measured" in err, err


def test_data_efficiency_target_without_the_full_data_run_is_not_measured_rather_than_no_gap() -> None:
    """A run without the 100 % fraction (its help's smoke run, ``--fractions 0.05``) printed "n/a (no gap: the
    low-data model is not worse)" for the augmentation target, a finding nothing had measured (numaudit)."""
    data_efficiency = _benchmark_module("data_efficiency")
    low_data = [{"method": "supervised", "fraction": 0.05, "ssim": 0.70},
                {"method": "augmented", "fraction": 0.05, "ssim": 0.78}]
    assert data_efficiency.gap_verdict(low_data, 0.05) == "not measured (no supervised at 100% run)"
    full = {"method": "supervised", "fraction": 1.0, "ssim": 0.86}
    assert data_efficiency.gap_verdict([*low_data, full], 0.05) == "50% of the gap recovered: met"
    assert data_efficiency.gap_verdict([*low_data, {**full, "ssim": 0.69}], 0.05).startswith("n/a (no gap")


def test_data_efficiency_section_records_the_machine_it_ran_on() -> None:
    """The results section said "on a 2-core machine shared with other jobs" (and its caveat "what 2 shared CPU
    cores allowed") whatever machine ran it; it now records the CPU count and load average measured (numaudit)."""
    import argparse
    import os

    data_efficiency = _benchmark_module("data_efficiency")
    rows = [{"method": "supervised", "fraction": 0.05, "ssim": 0.70, "psnr": 24.0},
            {"method": "cg_sense", "fraction": 1.0, "ssim": 0.75, "psnr": 25.0}]
    extra = {"date": "2026-12-08", "commit": "abc1234", "platform": data_efficiency.machine_and_load(), "cg_l2": 0.05,
             "zero_filled": {"ssim": 0.69, "psnr": 23.0}, "seconds": {("supervised", 0.05): 5.0},
             "slices": {0.05: 4}, "caveat": "Caveat."}
    section = data_efficiency.markdown(rows, extra, argparse.Namespace(threads=1, lr=1e-3, steps=5, seed=0))
    assert "2-core" not in section and f"{os.cpu_count()} CPUs" in section, section


def test_reconstruct_benchmark_table_names_the_machine_and_versions() -> None:
    """benchmarks/reconstruct.py printed its table under the scans and thread count only, unlike the other benchmark
    scripts: the machine, library versions and repeats of its seconds per slice were left to be written by hand
    (numaudit)."""
    import argparse
    import platform

    import onnxruntime
    import torch

    reconstruct = _benchmark_module("reconstruct")
    args = argparse.Namespace(volumes=2, repeats=3, threads=1)
    header = reconstruct.table_header(args, reconstruct.SCAN)
    for expected in (platform.machine(), f"{os.cpu_count()} CPUs", torch.__version__,
                     onnxruntime.__version__, "median of 3 interleaved passes", "1 thread(s)"):
        assert expected in header, (expected, header)


def test_machine_names_the_cpu_model_and_its_family_and_model_numbers(tmp_path) -> None:
    """The benchmark scripts printed ``platform.processor()`` as the machine: "x86_64" on Linux, which tells no VM kind
    from another (docs/benchmarks.md's family / model numbers were written down by hand) (numaudit)."""
    import platform

    timing = _benchmark_module("_timing")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n\n"
                       "processor\t: 1\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n")
    assert timing.machine(cpuinfo) == f"AMD EPYC (family 25 model 17), {platform.machine()}, {os.cpu_count()} CPUs"
    assert timing.machine(tmp_path / "none").endswith(f"{platform.machine()}, {os.cpu_count()} CPUs")
