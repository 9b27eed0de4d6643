"""DDP on 2 CPU processes (gloo), launched by Lightning and by torchrun: validation metrics are per volume and
equal the single-process run, although each volume's slices are split over the two ranks (and the distributed
sampler pads with a repeated slice)."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from reconkit.data.simulate import simulate_dataset

TINY_VARNET = {"num_cascades": 1, "chans": 4, "pools": 2, "sens_chans": 2, "sens_pools": 1}


def _validate(config: Path, root_dir: Path, devices: int, torchrun: bool = False) -> dict[str, float]:
    """``reconkit train validate`` of the seeded (seed_everything: 0) model in a fresh process (``torchrun``:
    started by torchrun, one process per device, as the README's multi-GPU command; else Lightning launches)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(devices)]
    command = [*(launcher if torchrun else [sys.executable]), "-m", "reconkit", "train", "validate", "--config",
               str(config), "--trainer.devices", str(devices), "--trainer.default_root_dir", str(root_dir)]
    if devices > 1:
        command += ["--trainer.strategy", "ddp"]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    (metrics,) = sorted(root_dir.glob("csv/version_*/metrics.csv"))
    with open(metrics) as f:
        (row,) = list(csv.DictReader(f))
    return {k: float(v) for k, v in row.items() if k.startswith("val_")}


def _write_config(tmp_path: Path) -> Path:
    """3 validation volumes of 3 slices and a seeded tiny VarNet; returns the YAML config."""
    simulate_dataset(tmp_path / "data", num_volumes=4, coils=4, slices=3, encoded_size=(48, 32), recon_size=(24, 20),
                     split=(0.25, 0.75, 0.0), seed=1, progress=False)
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu"},
        "model": {"class_path": "reconkit.training.VarNetModule", "init_args": TINY_VARNET},
        # batch_size 2: each rank's 5 slices are 2 full batches and a partial one
        "data": {"data_path": str(tmp_path / "data"), "center_fractions": [0.25], "accelerations": [2],
                 "batch_size": 2, "num_workers": 0},
    }))
    return config


def test_a_finished_ddp_run_destroys_its_process_group(tmp_path):
    # Lightning destroys only NCCL groups at exit; a gloo group left to interpreter finalisation can abort the
    # process (SIGABRT) after a successful run, so the CLI destroys it itself
    # (in a child process: Lightning's DDP setup also writes MASTER_PORT, LOCAL_RANK ... into os.environ)
    config = _write_config(tmp_path)
    args = ["validate", "--config", str(config), "--trainer.devices", "1", "--trainer.strategy", "ddp",
            "--trainer.default_root_dir", str(tmp_path / "out")]
    script = ("import sys, torch.distributed; from reconkit.training.cli import run_cli; run_cli(sys.argv[1:]); "
              "print('process group alive:', torch.distributed.is_initialized())")
    done = subprocess.run([sys.executable, "-c", script, *args], check=False, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process group alive: False" in done.stdout


def test_ddp_two_cpu_processes_give_the_single_process_metrics(tmp_path):
    # 3 validation volumes of 3 slices: 9 slices over 2 ranks, so every volume is split between the ranks and
    # the distributed sampler repeats one slice to give both ranks 5
    config = _write_config(tmp_path)
    assert len(list((tmp_path / "data" / "val").glob("*.h5"))) == 3
    single = _validate(config, tmp_path / "single", devices=1)
    ddp = _validate(config, tmp_path / "ddp", devices=2)
    torchrun = _validate(config, tmp_path / "torchrun", devices=2, torchrun=True)
    assert single["val_volumes"] == ddp["val_volumes"] == torchrun["val_volumes"] == 3
    for name in ("val_nmse", "val_psnr", "val_ssim"):
        assert ddp[name] == pytest.approx(single[name], rel=1e-5), name
        assert torchrun[name] == pytest.approx(single[name], rel=1e-5), name


def test_ddp_fit_on_mixed_coil_counts_with_batches_of_two(tmp_path):
    """3- and 4-coil training volumes, batch_size 2, two ranks: every batch holds one coil count and both ranks
    run the same number of steps (a rank with one batch more would wait for the other forever: the timeout would
    fail the test), so `reconkit train fit` under DDP finishes and writes its checkpoint. The training diagnostics
    run on rank 0 while rank 1 waits, and the validation band errors are summed over both ranks."""
    manifest = simulate_dataset(tmp_path / "data", num_volumes=5, coils=(3, 4), slices=3, encoded_size=(48, 32),
                                recon_size=(24, 20), split=(0.6, 0.4, 0.0), seed=0, progress=False)
    train_coils = sorted(v["params"]["coils"] for v in manifest["volumes"] if v["split"] == "train")
    assert train_coils == [3, 4, 4]  # 3 + 6 slices: 2 + 3 batches of 2, padded to 6 for two ranks
    config = tmp_path / "fit.yaml"
    config.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "devices": 2, "strategy": "ddp",
                    "default_root_dir": str(tmp_path / "out"), "enable_progress_bar": False},
        "model": {"class_path": "reconkit.training.VarNetModule", "init_args": TINY_VARNET},
        "data": {"data_path": str(tmp_path / "data"), "center_fractions": [0.25], "accelerations": [2],
                 "batch_size": 2, "num_workers": 0},
    }))
    done = subprocess.run([sys.executable, "-m", "reconkit", "train", "fit", "--config", str(config),
                           "--diagnostics.every_n_steps", "2", "--diagnostics.ntk_projections", "2"],
                          check=False, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "checkpoints" / "last.ckpt").is_file()
    history = json.loads((tmp_path / "out" / "diagnostics" / "diagnostics.json").read_text())["history"]
    assert [r["step"] for r in history if "weight_change" in r] == [0, 2, 3]
    (validation,) = [r for r in history if "val_band_nmse" in r]
    assert all(value > 0 for value in validation["val_band_nmse"])
    (metrics,) = sorted((tmp_path / "out").glob("csv/version_*/metrics.csv"))
    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    training_rows = [row for row in rows if not any(value and key.startswith("diagnostics/") for key, value in row.items())]
    assert max(int(row["step"]) for row in training_rows) == 2  # 3 optimizer steps per rank (steps 0, 1, 2)
    assert any(row.get("val_volumes") == "2.0" for row in rows)


FAKE_SRUN = """#!/bin/sh
# srun on one node: SLURM_NTASKS copies of the command, each with its own SLURM_PROCID and SLURM_LOCALID
while [ "${1#--}" != "$1" ]; do shift; done
pids=""
i=0
while [ "$i" -lt "$SLURM_NTASKS" ]; do
    SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
    pids="$pids $!"
    i=$((i + 1))
done
status=0
for pid in $pids; do wait "$pid" || status=1; done
exit $status
"""


def test_slurm_batch_script_trains_with_ddp_and_resubmission_resumes(tmp_path):
    """deploy/slurm/train_multinode.sbatch as SLURM would run it on one node with two tasks (srun replaced by a
    stand-in that starts the tasks with SLURM's variables, the CPU in place of GPUs): Lightning's SLURM environment
    forms the process group, fit writes last.ckpt, and the same job submitted again resumes from it (--ckpt_path
    last) instead of starting over."""
    root = Path(__file__).resolve().parents[1]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    simulate_dataset(tmp_path / "data", num_volumes=3, coils=4, slices=2, encoded_size=(48, 32), recon_size=(24, 20),
                     split=(0.67, 0.33, 0.0), seed=2, progress=False)
    config = tmp_path / "slurm.yaml"
    config.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "default_root_dir": str(tmp_path / "out"), "enable_progress_bar": False},
        "model": {"class_path": "reconkit.training.VarNetModule", "init_args": TINY_VARNET},
        "data": {"data_path": str(tmp_path / "data"), "center_fractions": [0.25], "accelerations": [2],
                 "batch_size": 1, "num_workers": 0},
    }))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(tmp_path),
           "CONFIG": str(config), "VENV": str(Path(sys.executable).parent.parent), "SLURM_JOB_NAME": "reconkit-varnet",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
           "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "1",
           "SLURM_NODELIST": "localhost", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    script = root / "deploy" / "slurm" / "train_multinode.sbatch"

    def submit(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(["bash", str(script), "--trainer.accelerator", "cpu", *args], env=env, cwd=tmp_path,
                              check=False, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done

    first = submit()
    last = tmp_path / "out" / "checkpoints" / "last.ckpt"
    assert last.is_file() and "Restoring states" not in first.stderr
    assert "SLURM auto-requeueing enabled" in first.stderr  # Lightning took the SLURM environment (and --signal)
    assert "distributed_backend=gloo" in first.stderr and "All distributed processes registered. Starting with 2 processes" in first.stderr
    second = submit("--trainer.max_epochs", "2")
    assert f"Restoring states from the checkpoint path at {last}" in second.stderr
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 1


def test_slurm_batch_script_gives_each_task_its_cpus(tmp_path):
    """Since Slurm 22.05 srun does not inherit sbatch's --cpus-per-task (nor reads SLURM_CPUS_PER_TASK): without
    asking for it again, each training task (and its 8 dataloader workers, OMP_NUM_THREADS threads) runs on 1 CPU."""
    root = Path(__file__).resolve().parents[1]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    (bin_dir / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(tmp_path),
           "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "6",
           "SRUN_ARGS": str(tmp_path / "srun_args")}
    done = subprocess.run(["bash", str(root / "deploy" / "slurm" / "train_multinode.sbatch")], env=env, cwd=tmp_path,
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "srun_args").read_text().split("\n")
    launched = args.index(".venv/bin/reconkit")
    assert "--cpus-per-task=6" in args[:launched]


def test_slurm_batch_script_requeues_itself_on_the_time_limit_signal(tmp_path):
    """The time-limit signal goes to the batch shell (--signal=B:...), which asks for the requeue, and not to the
    training tasks: there Lightning's handler saves an hpc checkpoint with a barrier inside the signal handler, which
    under DDP can deadlock against another rank's gradient all-reduce (Lightning-AI/pytorch-lightning#21406), and
    then the job is never requeued."""
    root = Path(__file__).resolve().parents[1]
    script = root / "deploy" / "slurm" / "train_multinode.sbatch"
    (directive,) = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH --signal")]
    assert directive.startswith("#SBATCH --signal=B:USR1@")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", 'echo started > "$LOG.srun"\nexec sleep 30\n'),
                       ("scontrol", 'echo "$@" > "$LOG.scontrol"\nkill "$(cat "$LOG.pid")"\n')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}")
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(tmp_path),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "8",
           "SLURM_CPUS_PER_TASK": "6", "LOG": str(log)}
    job = subprocess.Popen(["bash", str(script)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for _ in range(100):  # the training step is running
            if Path(f"{log}.srun").is_file():
                break
            time.sleep(0.05)
        srun = subprocess.run(["pgrep", "-s", str(job.pid), "sleep"], capture_output=True, text=True).stdout.split()
        Path(f"{log}.pid").write_text(srun[0])  # scontrol requeue: SLURM ends the step (here: the stand-in's sleep)
        os.kill(job.pid, signal.SIGUSR1)  # what --signal=B:USR1 sends to the batch shell
        job.wait(timeout=20)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert Path(f"{log}.scontrol").read_text().split() == ["requeue", "4242"]
