"""reconkit.training on tiny simulated data: CLI fit, checkpoint contract, per-volume metrics vs fastmri.evaluate,
exact resume, U-Net and ViT modules and their shipped configs, data subsets and reproducible training masks,
clear errors."""

from __future__ import annotations

import copy
import csv
import math
import os
import pickle
import random
import signal
import time
import traceback
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from fastmri import evaluate
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.multiprocessing import ProcessRaisedException

from reconkit.cli.reconstruct import main as reconstruct_main
from reconkit.cli.train import main, one_line
from reconkit.data import SliceDataset
from reconkit.data.transforms import VarNetSample, center_crop
from reconkit.errors import ConfigError, DataError, ReconkitError, ReconkitWarning
from reconkit.inference import load_reconstructor
from reconkit.models import load_model
from reconkit.training import FastMriDataModule, TrainingDiagnostics, UnetModule, VarNetModule, VitModule
from reconkit.training.datamodule import EpochSampler, collate_slices, select_volumes, shape_grouped_batches

ROOT = Path(__file__).resolve().parents[1]
TINY_VARNET = {"num_cascades": 2, "chans": 4, "pools": 2, "sens_chans": 2, "sens_pools": 1}


def _datamodule(root: Path, **kwargs) -> FastMriDataModule:
    return FastMriDataModule(root, batch_size=1, num_workers=0, **kwargs)


def _trainer(root_dir: Path, max_epochs: int, callbacks=(), **kwargs) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, default_root_dir=root_dir, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks), **kwargs)


def _csv_rows(root_dir: Path) -> list[dict[str, str]]:
    (metrics,) = sorted(root_dir.glob("csv/version_*/metrics.csv"))
    with open(metrics) as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------- CLI and checkpoint


def test_cli_fit_writes_best_and_last_checkpoints_that_load_without_training_code(sim_root, tmp_path):
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_epochs": 2, "default_root_dir": str(tmp_path / "run"),
                    "log_every_n_steps": 1},
        "model": {"class_path": "reconkit.training.VarNetModule", "init_args": {**TINY_VARNET, "lr": 1e-3}},
        "data": {"data_path": "unused", "mask_type": "equispaced_fraction", "center_fractions": [0.25],
                 "accelerations": [2], "num_workers": 0},
    }
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(config_path), "--data.data_path", str(sim_root)]) == 0

    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()
    assert len(list(checkpoints.glob("best-epoch*-val_ssim*.ckpt"))) == 1
    rows = [r for r in _csv_rows(tmp_path / "run") if r.get("val_ssim")]
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert all(float(r["val_volumes"]) == 2 for r in rows)  # per-volume: the two validation files
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("val_ssim", "val_psnr", "val_nmse"))
    assert list((tmp_path / "run" / "tensorboard").glob("version_0/events.*"))

    checkpoint = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 1  # last.ckpt follows the latest epoch even when SSIM did not improve
    assert checkpoint["reconkit"] == {
        "model_type": "varnet",
        "model_kwargs": TINY_VARNET,
        "mask": {"mask_type": "equispaced_fraction", "center_fractions": [0.25], "accelerations": [2]},
        "normalization": "none",
    }
    module = VarNetModule.load_from_checkpoint(checkpoints / "last.ckpt", map_location="cpu").eval()
    model, _ = load_model(checkpoints / "last.ckpt")
    kspace, mask = torch.randn(1, 3, 48, 32, 2), torch.zeros(1, 1, 1, 32, 1)
    mask[..., 12:20, :] = 1
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(kspace * mask, mask), module.model(kspace * mask, mask))


def test_cli_predict_writes_submission_files_equal_to_reconstruct_and_keeps_stored_masks(
        sim_root, tmp_path, capsys, caplog, tiny_varnet_config):
    """``reconkit train predict`` writes one fastMRI submission file per test volume, the images ``reconkit
    reconstruct`` gives for the same checkpoint; a test-set file (stored ``mask``, no target) keeps its own mask."""
    config_path = tiny_varnet_config
    assert main(["fit", "--config", str(config_path)]) == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    # test: the per-volume metrics also go to a CSV next to the CSV logger's, in reconkit evaluate's columns
    assert main(["test", "--config", str(config_path), "--ckpt_path", str(checkpoint),
                 "--trainer.default_root_dir", str(tmp_path / "test")]) == 0
    (volumes_csv,) = (tmp_path / "test" / "csv").glob("version_*/test_volumes.csv")
    with open(volumes_csv) as handle:
        rows = list(csv.DictReader(handle))
    assert [r["volume"] for r in rows] == [p.name for p in sorted((sim_root / "test").glob("*.h5"))] + ["mean"]
    logged = _csv_rows(tmp_path / "test")[-1]
    assert float(rows[-1]["ssim"]) == pytest.approx(float(logged["test_ssim"]), rel=1e-6)

    scans = tmp_path / "scans" / "test"  # a fully sampled test file and its test-set form
    scans.mkdir(parents=True)
    (source,) = sorted((sim_root / "test").glob("*.h5"))
    (scans / source.name).write_bytes(source.read_bytes())
    columns = np.zeros(32, np.float32)
    columns[::3], columns[13:19] = 1, 1  # not the 2x equispaced mask the config would draw; it marks columns 0 and
    # 30, outside the header's acquired window [2, 30), which hold no data and count as not sampled (fastMRI)
    with h5py.File(source) as src, h5py.File(scans / "challenge.h5", "w") as dst:
        dst.create_dataset("kspace", data=src["kspace"][()] * columns)
        dst.create_dataset("mask", data=columns.astype(bool))
        dst.create_dataset("ismrmrd_header", data=src["ismrmrd_header"][()])
        dst.attrs.update({k: v for k, v in src.attrs.items() if k != "max"})
    capsys.readouterr()
    assert main(["predict", "--config", str(config_path), "--data.data_path", str(scans.parent),
                 "--ckpt_path", str(checkpoint), "--trainer.default_root_dir", str(tmp_path / "pred")]) == 0
    assert "wrote 2 volume(s)" in capsys.readouterr().out
    assert reconstruct_main([str(scans), "--model", str(checkpoint), "--output", str(tmp_path / "rec")]) == 0
    for name in (source.name, "challenge.h5"):
        with h5py.File(tmp_path / "pred" / "predictions" / name) as f, h5py.File(tmp_path / "rec" / "h5" / name) as g:
            assert f["reconstruction"].dtype == np.float32 and f["reconstruction"].shape == (3, 24, 20)
            np.testing.assert_allclose(f["reconstruction"][()], g["reconstruction"][()], rtol=1e-4, atol=1e-8)
    assert "slices were predicted" not in caplog.text
    assert main(["predict", "--config", str(config_path), "--data.data_path", str(scans.parent),
                 "--ckpt_path", str(checkpoint), "--trainer.default_root_dir", str(tmp_path / "part"),
                 "--trainer.limit_predict_batches", "1"]) == 0  # a pass cut short writes part of a volume: said
    assert "of the file's 3 slices were predicted" in caplog.text


def test_cli_checkpoint_of_another_model_class_is_a_clear_error_and_replaced_arguments_are_named(
        tmp_path, capsys, tiny_varnet_config):
    """LightningCLI takes the model's arguments from a ``--ckpt_path`` file: a checkpoint of another module class
    than ``--model`` is refused with one line, and ``--model.*`` values the checkpoint replaces are named."""
    assert main(["fit", "--config", str(tiny_varnet_config), "--trainer.limit_train_batches", "2",
                 "--trainer.limit_val_batches", "1"]) == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    code = main(["validate", "--config", str(tiny_varnet_config), "--ckpt_path", str(checkpoint),
                 "--model", "reconkit.training.UnetModule"])
    err = capsys.readouterr().err
    assert code == 1 and "holds a reconkit.training.VarNetModule" in err and "Traceback" not in err, err
    with pytest.warns(ReconkitWarning, match="final_dc_iters 3 -> 0"):
        assert main(["validate", "--config", str(tiny_varnet_config), "--ckpt_path", str(checkpoint),
                     "--model.final_dc_iters", "3", "--trainer.limit_val_batches", "1"]) == 0


def test_cli_last_checkpoint_follows_epochs_after_the_last_validation(tmp_path, tiny_varnet_config):
    """With ``check_val_every_n_epoch 2`` and 3 epochs, last.ckpt holds the third epoch, not the second."""
    assert main(["fit", "--config", str(tiny_varnet_config), "--trainer.max_epochs", "3",
                 "--trainer.check_val_every_n_epoch", "2", "--trainer.limit_train_batches", "1",
                 "--trainer.limit_val_batches", "1"]) == 0
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (2, 3)


def test_cli_run_from_the_saved_config_with_another_root_writes_there(tmp_path, tiny_varnet_config):
    """The config.yaml saved with the logs held the folders derived from the first run's default_root_dir, so a
    run from it with another --trainer.default_root_dir overwrote the first run's last.ckpt and logged into it."""
    limits = ["--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"]
    assert main(["fit", "--config", str(tiny_varnet_config), *limits]) == 0
    first = tmp_path / "run"
    saved = first / "tensorboard" / "version_0" / "config.yaml"
    last = (first / "checkpoints" / "last.ckpt").read_bytes()
    assert main(["fit", "--config", str(saved), "--trainer.default_root_dir", str(tmp_path / "second"), *limits]) == 0
    assert (first / "checkpoints" / "last.ckpt").read_bytes() == last
    assert not (first / "tensorboard" / "version_1").exists() and not (first / "csv" / "version_1").exists()
    assert (tmp_path / "second" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "second" / "tensorboard" / "version_0" / "config.yaml").is_file()


@pytest.mark.parametrize("ckpt_path", ["last", "file"])
def test_cli_truncated_checkpoint_is_a_one_line_error_naming_it(ckpt_path, tmp_path, tiny_varnet_config, capsys):
    """Was torch's 'OSError: [Errno 22] Invalid argument' traceback (a checkpoint whose copy was cut short)."""
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, checkpoint)
    checkpoint.write_bytes(checkpoint.read_bytes()[:2000])
    subcommand = "fit" if ckpt_path == "last" else "test"
    code = main([subcommand, "--config", str(tiny_varnet_config), "--ckpt_path",
                 ckpt_path if ckpt_path == "last" else str(checkpoint)])
    err = capsys.readouterr().err
    assert code == 1 and f"reconkit train: {checkpoint}: not a readable PyTorch checkpoint" in err, err
    assert "Traceback" not in err


def test_cli_checkpoint_that_pickles_code_is_a_one_line_refusal(tmp_path, tiny_varnet_config, capsys):
    """A ``--ckpt_path`` file that calls a function when unpickled (a crafted checkpoint from elsewhere): Lightning
    refuses it weights-only, with torch's UnpicklingError traceback; one line naming it and what it calls."""
    checkpoint = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "extra": _RunsCode()}, checkpoint)
    code = main(["test", "--config", str(tiny_varnet_config), "--ckpt_path", str(checkpoint)])
    err = capsys.readouterr().err
    assert code == 1 and f"reconkit train: {checkpoint}: cannot be read as weights and plain data only" in err, err
    assert f"GLOBAL {os.name}.getcwd" in err and "Traceback" not in err


class _RunsCode:
    def __reduce__(self):
        return os.getcwd, ()


def test_cli_ckpt_path_best_is_a_one_line_error_naming_the_checkpoints(tmp_path, tiny_varnet_config, capsys):
    """Was Lightning's traceback saying ModelCheckpoint is 'not configured to save the best model' (it is, but only
    the process that ran the fit knows which file is best)."""
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "best-epoch001-val_ssim0.5000.ckpt").write_bytes(b"")
    (folder / "last.ckpt").write_bytes(b"")
    code = main(["test", "--config", str(tiny_varnet_config), "--ckpt_path", "best"])
    err = capsys.readouterr().err
    assert code == 1 and "--ckpt_path best" in err and f"({folder / 'best-epoch001-val_ssim0.5000.ckpt'})" in err, err
    assert "Traceback" not in err


def test_cli_last_checkpoint_of_another_model_size_is_a_one_line_error(tmp_path, tiny_varnet_config, capsys):
    """``--ckpt_path last`` builds the model from the configuration; other sizes were torch's traceback listing every
    size mismatch."""
    limits = ["--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"]
    assert main(["fit", "--config", str(tiny_varnet_config), *limits]) == 0
    capsys.readouterr()
    code = main(["validate", "--config", str(tiny_varnet_config), "--ckpt_path", "last", "--model.chans", "6", *limits])
    err = capsys.readouterr().err
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert code == 1 and f"reconkit train: --ckpt_path {last}: its weights do not fit the configured VarNetModule" in err
    assert "differ in shape" in err and "Traceback" not in err, err


def test_cli_reports_missing_split_folder_in_one_line(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    code = main(["fit", "--data.data_path", str(tmp_path), "--model", "reconkit.training.VarNetModule",
                 "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "run"),
                 "--data.num_workers", "0"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"{tmp_path / 'val'}: missing the 'val' folder" in err


@pytest.mark.parametrize("option,value,message", [
    ("--data.center_fractions", "[1.5]", "data mask options: center fractions must lie in [0, 1)"),
    ("--data.accelerations", "[0]", "data mask options: accelerations must be at least 1"),
    ("--data.mask_type", "spiral", "data mask options: spiral not supported"),
    ("--model.lr", "-0.001", "lr and lr_gamma must be positive"),
    ("--data.sample_rate", "-0.5", "sample_rate must be in (0, 1], got -0.5"),
    ("--model.num_cascades", "0", "VarNetModule: num_cascades, chans, pools, sens_chans and sens_pools must be >= 1"),
])
def test_cli_bad_option_values_are_one_line_errors_before_training(sim_root, tmp_path, capsys, option, value, message):
    code = main(["fit", "--data.data_path", str(sim_root), "--model", "reconkit.training.VarNetModule",
                 "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "run"),
                 "--data.num_workers", "0", option, value])
    err = capsys.readouterr().err
    assert code == 1 and f"reconkit train: {message}" in err, err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("options", [{"weight_decay": math.nan}, {"weight_decay": math.inf}, {"lr": math.inf},
                                     {"lr_gamma": math.nan}])
def test_module_refuses_nan_or_infinite_optimiser_settings(options):
    """NaN and inf passed the comparisons: an infinite weight_decay or lr made every weight NaN or infinite after the
    first optimiser step, a NaN lr_gamma the learning rate NaN at the first decay, and a NaN weight_decay was Adam's
    ValueError traceback when fit started (after the data scan)."""
    with pytest.raises(ConfigError, match=r"lr and lr_gamma must be positive, weight_decay >= 0 and lr_step_size "
                                          r">= 1 \(finite numbers\)"):
        VarNetModule(**TINY_VARNET, **options)


@pytest.mark.parametrize("accelerator,message", [
    pytest.param("cuda", "`CUDAAccelerator` can not run on your system",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    ("bogus", "You selected an invalid accelerator name"),
])
def test_cli_accelerator_this_machine_lacks_is_a_one_line_error(accelerator, message, sim_root, tmp_path, capsys):
    """Was Lightning's MisconfigurationException / ValueError traceback from inside the Trainer's constructor."""
    code = main(["fit", "--data.data_path", str(sim_root), "--model", "reconkit.training.VarNetModule",
                 "--trainer.accelerator", accelerator, "--trainer.default_root_dir", str(tmp_path / "run"),
                 "--data.num_workers", "0"])
    err = capsys.readouterr().err
    assert code == 1 and f"reconkit train: --trainer options (accelerator {accelerator!r}, devices" in err, err
    assert message in err and "Traceback" not in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("model_type", ["cg_sense", "zero_filled"])
def test_cli_fit_of_a_model_without_weights_is_a_one_line_error(model_type, sim_root, tmp_path, capsys):
    """Was Adam's 'optimizer got an empty parameter list' traceback."""
    code = main(["fit", "--data.data_path", str(sim_root), "--model", "reconkit.training.KspaceModule",
                 "--model.model_type", model_type, "--trainer.accelerator", "cpu", "--trainer.max_steps", "1",
                 "--trainer.default_root_dir", str(tmp_path / "run"), "--data.num_workers", "0"])
    err = capsys.readouterr().err
    assert code == 1 and f"the {model_type} model has no trainable weights" in err and "train validate" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_cli_fit_of_a_kspace_model_in_true_half_precision_is_a_one_line_error(precision, sim_root, tmp_path, capsys):
    """Was 'expected scalar type Float but found BFloat16' from inside the first cascade."""
    code = main(["fit", "--data.data_path", str(sim_root), "--model", "reconkit.training.VarNetModule",
                 "--model.num_cascades", "1", "--model.chans", "4", "--model.sens_chans", "2",
                 "--trainer.accelerator", "cpu", "--trainer.max_steps", "1", "--trainer.precision", precision,
                 "--trainer.default_root_dir", str(tmp_path / "run"), "--data.num_workers", "0"])
    err = capsys.readouterr().err
    assert code == 1 and f"--trainer.precision {precision}" in err and "bf16-mixed" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("model", ["UnetModule", "VitModule"])
def test_cli_fit_of_an_image_model_behind_the_front_end_in_true_half_precision_is_a_one_line_error(
        model, sim_root, tmp_path, capsys):
    """Was 'Input type (float) and bias type (c10::BFloat16) should be the same' from the model's first layer: the
    zero-filled front end's FFTs give float32 images (data.transform varnet, the ViT config's default)."""
    code = main(["fit", "--data.data_path", str(sim_root), "--model", f"reconkit.training.{model}",
                 "--data.transform", "varnet", "--trainer.accelerator", "cpu", "--trainer.max_steps", "1",
                 "--trainer.precision", "bf16-true", "--trainer.default_root_dir", str(tmp_path / "run"),
                 "--data.num_workers", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "--trainer.precision bf16-true" in err and "data.transform unet" in err, err
    assert "Traceback" not in err


def test_cli_fit_with_checkpointing_off_writes_no_checkpoint(sim_root, tmp_path, capsys):
    """Was Lightning's 'enable_checkpointing=False but found ModelCheckpoint' traceback."""
    code = main(["fit", "--data.data_path", str(sim_root), "--model", "reconkit.training.VarNetModule",
                 "--model.num_cascades", "1", "--model.chans", "4", "--model.sens_chans", "2",
                 "--trainer.accelerator", "cpu", "--trainer.max_steps", "1", "--trainer.enable_checkpointing", "false",
                 "--trainer.default_root_dir", str(tmp_path / "run"), "--data.num_workers", "0"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert (tmp_path / "run").is_dir() and not list((tmp_path / "run").rglob("*.ckpt"))


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda path: path.name)
def test_shipped_configs_parse(config, capsys):
    """Every option in the shipped YAML files is one the CLI knows (``--print_config`` parses without running)."""
    assert main(["fit", "--config", str(config), "--print_config"]) == 0
    assert "model:" in capsys.readouterr().out


def test_cli_help_shows_examples(capsys):
    assert main(["--help"]) == 0
    assert "reconkit train fit --config configs/varnet_sim_small.yaml" in capsys.readouterr().out


@pytest.mark.parametrize("name, option", [("AugmentedVarNetTransform", "--data.train_transform.config"),
                                          ("SsduVarNetTransform", "--data.train_transform.rho")])
def test_cli_help_of_a_training_transform_lists_its_options(name, option, capsys):
    """``--data.train_transform.help CLASS`` prints that transform's options (it was a parse error)."""
    assert main(["fit", "--data.train_transform.help", name]) == 0
    assert option in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- metrics oracle


def test_validation_metrics_are_per_volume_and_equal_fastmri_evaluate(sim_root, tmp_path):
    seed_everything(0)
    module = VarNetModule(**TINY_VARNET)
    datamodule = _datamodule(sim_root, test_split="val")
    trainer = _trainer(tmp_path, 1)
    (logged,) = trainer.validate(module, datamodule=datamodule)
    predictions = trainer.predict(module, datamodule=datamodule)

    outputs: dict[str, dict[int, np.ndarray]] = {}
    for batch in predictions:
        for fname, slice_num, image in zip(batch["fname"], batch["slice_num"], batch["output"]):
            outputs.setdefault(fname, {})[int(slice_num)] = image.numpy()
    expected = []
    for fname, slices in outputs.items():
        with h5py.File(sim_root / "val" / fname) as f:
            target, maxval = f["reconstruction_rss"][()], float(f.attrs["max"])
        output = np.stack([slices[i] for i in sorted(slices)])
        assert output.shape == target.shape  # cropped to the recon size
        mine = module.last_volume_metrics[fname]
        assert mine["nmse"] == pytest.approx(evaluate.nmse(target, output), rel=1e-4)
        assert mine["psnr"] == pytest.approx(evaluate.psnr(target, output, maxval=maxval), rel=1e-4)
        assert mine["ssim"] == pytest.approx(evaluate.ssim(target, output, maxval=maxval), rel=1e-4, abs=1e-6)
        expected.append(evaluate.ssim(target, output, maxval=maxval))
    assert len(outputs) == 2
    assert logged["val_ssim"] == pytest.approx(np.mean(expected), rel=1e-4, abs=1e-6)


# ----------------------------------------------------------------------------------------------- resume


class _StopAfterFirstEpoch(Callback):
    """Simulates a job killed after epoch 0 (its checkpoint written) with the same config as the full run."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def _resumable_run(root_dir: Path, sim_root: Path, interrupt: bool, num_workers: int, ckpt_path=None,
                   max_epochs: int = 2) -> VarNetModule:
    seed_everything(0)
    module = VarNetModule(**TINY_VARNET, lr=3e-3, lr_scheduler="cosine")
    callbacks = [ModelCheckpoint(dirpath=root_dir, filename="last", save_top_k=1, enable_version_counter=False)]
    if interrupt:
        callbacks.append(_StopAfterFirstEpoch())
    # a random mask family: masks must come out the same after resume and with or without a worker process
    datamodule = FastMriDataModule(sim_root, mask_type="random", center_fractions=[0.25], accelerations=[3],
                                   batch_size=1, num_workers=num_workers, seed=5)
    trainer = _trainer(root_dir, max_epochs, callbacks, deterministic=True, limit_train_batches=4)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module


def test_resume_from_last_checkpoint_is_exact(sim_root, tmp_path):
    straight = _resumable_run(tmp_path / "straight", sim_root, interrupt=False, num_workers=0)
    _resumable_run(tmp_path / "resumed", sim_root, interrupt=True, num_workers=1)
    interrupted = torch.load(tmp_path / "resumed" / "last.ckpt", map_location="cpu", weights_only=False)
    assert interrupted["epoch"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReconkitWarning)  # the schedule spans the run: no warning
        resumed = _resumable_run(tmp_path / "resumed", sim_root, interrupt=False, num_workers=1, ckpt_path="last")
    assert resumed.global_step == straight.global_step == 8
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    for fname, metrics in straight.last_volume_metrics.items():
        assert resumed.last_volume_metrics[fname] == pytest.approx(metrics)
    # and training did change the weights (the comparison above is not trivially true)
    first_conv = "model.sens_net.norm_unet.unet.down_sample_layers.0.layers.0.weight"
    assert not torch.equal(interrupted["state_dict"][first_conv], resumed.state_dict()[first_conv])
    # a finished cosine run extended by an epoch keeps its 8-step schedule: said, not silent
    with pytest.warns(ReconkitWarning, match="spans 8 steps, but this run has 12"):
        _resumable_run(tmp_path / "straight", sim_root, interrupt=False, num_workers=0, ckpt_path="last", max_epochs=3)


# ----------------------------------------------------------------------------------------------- U-Net


IMAGE_MODULES = {  # tiny image-domain models: module class, its arguments, CLI overrides of the shipped config
    "unet": (UnetModule, {"chans": 4, "num_pool_layers": 2}),
    "vit": (VitModule, {"patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2}),
}


@pytest.mark.parametrize("transform", ["unet", "varnet"])
@pytest.mark.parametrize("model_type", sorted(IMAGE_MODULES))
def test_image_module_trains_and_writes_its_checkpoint_entry(model_type, transform, sim_root, tmp_path):
    module_class, kwargs = IMAGE_MODULES[model_type]
    seed_everything(0)
    module = module_class(**kwargs, loss="l1", lr=1e-3)
    untrained = copy.deepcopy(module.model)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename=model_type)
    trainer = _trainer(tmp_path, 1, [checkpoint], limit_train_batches=3)
    datamodule = _datamodule(sim_root, transform=transform)
    trainer.fit(module, datamodule=datamodule)
    assert set(module.last_volume_metrics) == {p.name for p in (sim_root / "val").glob("*.h5")}
    assert all(0 < v["ssim"] <= 1 and v["psnr"] > 0 for v in module.last_volume_metrics.values())
    entry = torch.load(tmp_path / f"{model_type}.ckpt", map_location="cpu", weights_only=False)["reconkit"]
    assert entry["model_type"] == model_type and entry["normalization"] == "instance"
    model, _ = load_model(tmp_path / f"{model_type}.ckpt")
    reloaded = module_class.load_from_checkpoint(tmp_path / f"{model_type}.ckpt", map_location="cpu")
    image = torch.randn(1, 1, 24, 20)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(image), module.model.eval()(image))
        torch.testing.assert_close(reloaded.model.eval()(image), module.model(image))
        assert not torch.allclose(untrained.eval()(image), module.model(image))  # the steps changed the model
    if transform == "varnet":  # trained through the deployed call: the CLI's runner gives the training's images
        batch = next(iter(datamodule.val_dataloader()))
        with torch.no_grad():
            trained = module.eval().images(batch).output
        run = load_reconstructor(str(tmp_path / f"{model_type}.ckpt")).run
        deployed = run(batch.masked_kspace.numpy(), batch.mask.float().numpy())
        torch.testing.assert_close(center_crop(torch.from_numpy(deployed), trained.shape[-2:]), trained)


@pytest.mark.parametrize("model_type", sorted(IMAGE_MODULES))
def test_shipped_image_model_configs_train_from_the_cli(model_type, sim_root, tmp_path):
    _, kwargs = IMAGE_MODULES[model_type]
    overrides = [f"--model.{name}={value}" for name, value in kwargs.items()]
    args = ["fit", "--config", str(ROOT / "configs" / f"{model_type}_multicoil.yaml"), "--data.data_path",
            str(sim_root), "--data.num_workers", "0", "--data.use_dataset_cache", "false", "--trainer.accelerator",
            "cpu", "--trainer.devices", "1", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
            "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false", *overrides]
    assert main(args) == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    _, info = load_model(checkpoint)
    assert info["model_type"] == model_type and info["model_kwargs"].items() >= kwargs.items()
    assert info["mask"] == {"mask_type": "random", "center_fractions": [0.08], "accelerations": [4]}
    # the checkpoint reconstructs scan files from the CLI (an image-domain model behind the zero-filled front end)
    out = tmp_path / "out"
    assert reconstruct_main([str(sim_root / "test"), "--model", str(checkpoint), "--output", str(out),
                             "--format", "h5"]) == 0
    (written,) = (out / "h5").glob("*.h5")
    with h5py.File(written) as f:
        assert f["reconstruction"].shape[1:] == (24, 20) and np.isfinite(f["reconstruction"][()]).all()


# ----------------------------------------------------------------------------------------------- data module


@pytest.fixture
def float64_default_dtype():
    """``torch.set_default_dtype(torch.float64)``, as a caller's script may set it, for one test."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def test_a_module_made_under_a_float64_default_dtype_trains_in_float64(sim_root, tmp_path, float64_default_dtype):
    """After a caller's ``torch.set_default_dtype(torch.float64)`` the module's weights were float64 and the first
    training step failed on the data's float32 tensors ("expected scalar type Float but found Double"), as did the
    diagnostics' probe (gapfix audit): batches now come in the weights' dtype, as with precision 64-true."""
    module = VarNetModule(**TINY_VARNET)
    diagnostics = TrainingDiagnostics(every_n_steps=1, probe_slices=1, ntk_projections=2, dirpath=str(tmp_path))
    trainer = _trainer(tmp_path, 1, [diagnostics], limit_train_batches=2, limit_val_batches=1,
                       enable_checkpointing=False)
    trainer.fit(module, _datamodule(sim_root, mask_type="equispaced_fraction", center_fractions=[0.25],
                                    accelerations=[2]))
    assert {p.dtype for p in module.parameters()} == {torch.float64}
    assert math.isfinite(float(trainer.callback_metrics["val_ssim"])) and diagnostics.history


def test_batches_of_mixed_coil_counts_fail_with_a_clear_error():
    def varnet_sample(coils: int, fname: str) -> VarNetSample:
        return VarNetSample(torch.zeros(coils, 8, 6, 2), torch.ones(1, 1, 6, 1, dtype=torch.bool), 2,
                            torch.zeros(4, 4), fname, 1, 1.0, (4, 4))

    batch = collate_slices([varnet_sample(4, "a.h5"), varnet_sample(4, "b.h5")])
    assert batch.masked_kspace.shape == (2, 4, 8, 6, 2) and list(batch.fname) == ["a.h5", "b.h5"]
    with pytest.raises(ReconkitError, match=r"cannot batch slices a\.h5\[1\] and c\.h5\[1\]: their masked_kspace "
                                            r"shapes differ \(\[4, 8, 6, 2\] vs \[8, 8, 6, 2\]\).*--data.batch_size 1"):
        collate_slices([varnet_sample(4, "a.h5"), varnet_sample(8, "c.h5")])
    # in a worker process: the loader re-raises with the worker's traceback in the message; the CLI prints one line
    loader = torch.utils.data.DataLoader([varnet_sample(4, "a.h5"), varnet_sample(8, "c.h5")], batch_size=2,
                                         num_workers=1, collate_fn=collate_slices)
    with pytest.raises(ReconkitError) as err:
        next(iter(loader))
    assert "Original Traceback" in str(err.value)
    assert one_line(err.value).startswith("cannot batch slices a.h5[1] and c.h5[1]: their masked_kspace shapes")


@pytest.mark.parametrize("batch_size,num_replicas", [(2, 1), (3, 2), (4, 3)])
def test_shape_grouped_batches_are_single_shape_cover_everything_and_split_evenly(batch_size, num_replicas):
    keys = [("12 coils", 640, 368)] * 7 + [("4 coils", 640, 320)] * 3 + [("16 coils", 768, 396)] * 1
    keys = [keys[i] for i in np.random.default_rng(0).permutation(len(keys))]
    seeded = torch.Generator().manual_seed(5)
    batches = shape_grouped_batches(keys, batch_size, num_replicas, seeded)
    assert all(len(b) == batch_size and len({keys[i] for i in b}) == 1 for b in batches)
    assert {i for b in batches for i in b} == set(range(len(keys)))
    assert len(batches) % num_replicas == 0
    full = sum(math.ceil(keys.count(k) / batch_size) for k in set(keys))
    assert full <= len(batches) < full + num_replicas  # padding: at most num_replicas - 1 repeated batches
    assert batches == shape_grouped_batches(keys, batch_size, num_replicas, torch.Generator().manual_seed(5))
    assert batches != shape_grouped_batches(keys, batch_size, num_replicas, torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match="batch_size"):
        shape_grouped_batches(keys, 0)


def test_epoch_sampler_gives_every_rank_as_many_single_shape_batches():
    keys = [(3, 48, 32)] * 5 + [(4, 48, 32)] * 4 + [(4, 64, 32)] * 2
    dataset = _TaggedShapes(keys)
    orders = []
    for rank in (0, 1):
        sampler = EpochSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0, batch_size=2)
        sampler.set_epoch(3)
        order = list(sampler)
        assert len(order) == len(sampler) and len(order) % 2 == 0
        per_epoch = dataset.batches_per_epoch
        assert per_epoch == len(sampler) // 2
        # tagged with the epoch and the batch: (epoch * batches per epoch + batch) * len + index
        assert [n // len(keys) for n in order] == [3 * per_epoch + position // 2 for position in range(len(order))]
        batches = [[n % len(keys) for n in order[i:i + 2]] for i in range(0, len(order), 2)]
        assert all(len({keys[i] for i in b}) == 1 for b in batches)
        orders.append(order)
    assert len(orders[0]) == len(orders[1])  # DDP ranks must run the same number of steps
    assert {n % len(keys) for order in orders for n in order} == set(range(len(keys)))
    uniform = EpochSampler(_TaggedShapes([(4, 48, 32)] * 5), num_replicas=1, rank=0, shuffle=False, batch_size=2)
    # one shape: DistributedSampler's order, no padding to full batches; batches 0, 1, 2 of epoch 0 (len 5)
    assert list(uniform) == [0, 1, 5 + 2, 5 + 3, 10 + 4]


class _TaggedShapes(torch.utils.data.Dataset):
    def __init__(self, keys: list):
        self.shape_keys = keys

    def __len__(self) -> int:
        return len(self.shape_keys)


def test_mixed_coil_counts_train_with_batches_of_two(sim_root, tmp_path):
    """sim_root mixes 3- and 4-coil volumes: batch_size 2 trains (every batch of one coil count) where default
    collation would fail; evaluation keeps 2 slices per batch on a single-shape split, one on a mixed one."""
    data = FastMriDataModule(sim_root, batch_size=2, num_workers=0, center_fractions=[0.25], accelerations=[2])
    data.trainer = None
    train = data.train_dataset()
    assert len(set(train.shape_keys)) == 2  # the fixture does mix coil counts
    seen = []

    class _Batches(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(tuple(batch.masked_kspace.shape))

    trainer = _trainer(tmp_path, max_epochs=1, callbacks=[_Batches()])
    trainer.fit(VarNetModule(**TINY_VARNET), datamodule=data)
    assert {shape[0] for shape in seen} == {2} and {shape[1] for shape in seen} == {3, 4}
    assert trainer.callback_metrics["val_volumes"] == 2
    val_shapes = {data.eval_dataset("val").shape_key(i) for i in range(len(data.eval_dataset("val")))}
    assert trainer.val_dataloaders.batch_size == (2 if len(val_shapes) == 1 else 1)
    mixed_split = FastMriDataModule(sim_root, batch_size=2, num_workers=0, test_split="train")
    assert mixed_split.test_dataloader().batch_size == 1


def test_predict_batches_only_files_of_one_recon_size(sim_root, tmp_path):
    """Without targets a batch is cropped to its first slice's recon size: val's two 4-coil files, one with another
    recon size in its header, must not share a batch (the other file was written cropped to the wrong size)."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(sim_root, root, ignore=shutil.ignore_patterns("*.pkl"))
    files = sorted((root / "val").glob("*.h5"))
    for path in files:
        with h5py.File(path, "r+") as f:
            del f["reconstruction_rss"]
    data = FastMriDataModule(root, batch_size=2, num_workers=0, test_split="val")
    assert data.predict_dataloader().batch_size == 2  # one k-space shape and recon size
    with h5py.File(files[0], "r+") as f:
        header = f["ismrmrd_header"][()].replace(b"<x>24</x><y>20</y>", b"<x>20</x><y>20</y>")
        del f["ismrmrd_header"]
        f["ismrmrd_header"] = header
    data = FastMriDataModule(root, batch_size=2, num_workers=0, test_split="val")
    assert data.predict_dataloader().batch_size == 1
    assert {tuple(int(n) for n in s.crop_size) for s in data.predict_dataloader()} == {(20, 20), (24, 20)}


class _UnreadableSlices(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int):
        raise DataError("/data/file1.h5", f"cannot read slice {i} (corrupt chunk)")


def test_data_error_in_a_dataloader_worker_stays_a_data_error():
    loader = torch.utils.data.DataLoader(_UnreadableSlices(), num_workers=1)
    with pytest.raises(DataError) as err:
        next(iter(loader))
    assert one_line(err.value) == "/data/file1.h5: cannot read slice 0 (corrupt chunk)"


def _raised_in_a_spawned_rank(error: Exception):
    """A ``run_cli`` stand-in raising what Lightning's ddp_spawn launcher raises when a rank failed with ``error``:
    torch.multiprocessing's ProcessRaisedException carrying the rank's traceback as text."""
    def run_cli(argv):
        try:
            raise error
        except Exception:  # noqa: BLE001 -- as torch.multiprocessing.spawn's _wrap does
            raise ProcessRaisedException(f"\n\n-- Process 1 terminated with the following error:\n"
                                         f"{traceback.format_exc()}", 1, 4242) from None
    return run_cli


def test_cli_error_of_a_ddp_spawn_rank_is_one_line(monkeypatch, capsys):
    """--trainer.strategy ddp_spawn runs the ranks in processes started by torch.multiprocessing.spawn, which hands an
    exception back as its traceback's text: a bad slice a rank read (NaN k-space in a validation file) ended the
    command with 80 lines of traceback instead of the CLI's one line (spawnaudit); other errors stay tracebacks."""
    problem = "slice 1: 'kspace' holds 4 NaN / inf values (first at index (0, 0, 0))"
    monkeypatch.setattr("reconkit.training.cli.run_cli", _raised_in_a_spawned_rank(DataError("val/a.h5", problem)))
    assert main(["validate"]) == 1
    assert capsys.readouterr().err == f"reconkit train: val/a.h5: {problem}\n"
    monkeypatch.setattr("reconkit.training.cli.run_cli", _raised_in_a_spawned_rank(RuntimeError("a: b")))
    with pytest.raises(ProcessRaisedException, match="RuntimeError: a: b"):
        main(["validate"])


def test_cli_warning_format_reaches_ddp_spawn_ranks(tiny_varnet_config, monkeypatch):
    """``--trainer.strategy ddp_spawn`` ranks are new interpreters that kept Python's warning format: a ReconkitWarning
    naming a file printed in two lines with its control characters raw (an ESC sequence the terminal obeyed).
    ``reconkit train``'s trainer carries a callback that installs the CLI's format where it is unpickled, as a rank
    unpickles the trainer (nbaudit)."""
    from reconkit.training.cli import CliWarningFormat, run_cli

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    python_format = warnings.formatwarning
    callbacks = run_cli(["--config", str(tiny_varnet_config)], run=False).trainer.callbacks
    assert warnings.formatwarning is python_format  # building it installs nothing in this process
    [callback] = [c for c in callbacks if isinstance(c, CliWarningFormat)]
    assert isinstance(pickle.loads(pickle.dumps(callback)), CliWarningFormat)  # what a spawned rank does
    text = warnings.formatwarning(ReconkitWarning("val/a\x1b[31mb.h5: no 'max' attr"), ReconkitWarning, "x.py", 1)
    assert text == "warning: val/a\\x1b[31mb.h5: no 'max' attr\n"


def test_run_cli_mutes_lightnings_args_warning_without_leaving_a_filter(tiny_varnet_config, monkeypatch):
    """``run_cli`` muted Lightning's warning about ``args`` given beside command-line arguments with a global
    ``warnings.filterwarnings`` that stayed: a notebook calling it kept the filter for the rest of the session
    (namefix audit). The warning is still muted, only while the arguments are parsed."""
    from reconkit.training.cli import run_cli

    monkeypatch.setattr("sys.argv", ["reconkit", "train", "fit", "--config", str(tiny_varnet_config)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        run_cli(["--config", str(tiny_varnet_config)], run=False)
        assert warnings.filters == filters
    assert not [w for w in caught if "args parameter" in str(w.message)]


def test_volume_subsets_are_reproducible_nested_and_sized():
    names = [f"file{i:02d}.h5" for i in range(20)]
    quarter, half = select_volumes(names, 0.25, None, seed=3), select_volumes(names, 0.5, None, seed=3)
    assert len(quarter) == 5 and len(half) == 10 and quarter < half
    assert select_volumes(names, 0.25, None, seed=3) == quarter
    assert select_volumes(names, 0.25, None, seed=4) != quarter
    assert len(select_volumes(names, None, 7, seed=0)) == 7
    assert select_volumes(names, None, None, seed=0) == set(names)
    with pytest.raises(ValueError, match="not both"):
        select_volumes(names, 0.5, 3, seed=0)
    with pytest.raises(ValueError, match="fraction"):
        select_volumes(names, 0.0, None, seed=0)


def test_datamodule_skip_bad_files(sim_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(sim_root, root, ignore=shutil.ignore_patterns("*.pkl"))
    (root / "train" / "broken.h5").write_bytes(b"")
    (root / "train" / "text.h5").write_text("not hdf5")
    with pytest.raises(DataError, match=r"broken\.h5: empty file .*and 1 more bad file\(s\): .*text\.h5: not an HDF5"):
        _datamodule(root).train_dataset()
    assert len(_datamodule(root, skip_bad_files=True).train_dataset()) == 9  # the 3 good volumes x 3 slices


def test_datamodule_refuses_empty_splits_and_takes_targets_without_max(sim_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(sim_root, root, ignore=shutil.ignore_patterns("*.pkl"))
    no_max = sorted((root / "train").glob("*.h5"))[0]
    with h5py.File(no_max, "r+") as f:
        del f.attrs["max"]
        volume_max = float(f["reconstruction_rss"][()].max())
    with pytest.warns(ReconkitWarning, match=rf"{no_max.name}: no 'max' attr; using the maximum of its "
                                             r"'reconstruction_rss' volume"):
        dataset = _datamodule(root).train_dataset()
    assert len(dataset) == 9  # 3 volumes x 3 slices: a file without 'max' is not a bad file
    with pytest.warns(ReconkitWarning, match="no 'max' attr"):
        raw = SliceDataset(root / "train", "multicoil", use_dataset_cache=False)
    index = [i for i, sample in enumerate(raw.raw_samples) if sample.fname == no_max]
    assert index and raw[index[0]][3]["max"] == pytest.approx(volume_max)  # fastmri.evaluate's maxval
    for item in (root / "train").glob("*.h5"):
        item.unlink()
    (root / "train" / "broken.h5").write_bytes(b"")
    with pytest.raises(DataError, match=r"train: no slices left in the 'train' split \(every file skipped"):
        _datamodule(root, skip_bad_files=True).train_dataset()
    (root / "val" / "garbage.h5").write_bytes(b"not hdf5")  # bad files in two splits: one error names both
    with pytest.raises(DataError, match=r"2 splits have problems: .*train.*broken\.h5.* \| .*val.*garbage\.h5"):
        _datamodule(root).setup("fit")
    shutil.rmtree(root / "val")
    (root / "val").mkdir()
    code = main(["fit", "--data.data_path", str(root), "--model", "reconkit.training.VarNetModule",
                 "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "run"),
                 "--data.num_workers", "0", "--data.skip_bad_files", "true"])
    assert code == 1 and "the 'val' folder holds no .h5 / .hdf5 files" in capsys.readouterr().err


def test_datamodule_refuses_files_without_targets_at_setup(sim_root, tmp_path):
    """A test (or val) file without ``reconstruction_rss`` is named at setup, before any work (it had failed at its
    first batch with 'the test split has no target images' though the other files have them); skip_bad_files
    leaves it out; predict still takes it."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(sim_root, root, ignore=shutil.ignore_patterns("*.pkl"))
    no_target = sorted((root / "train").glob("*.h5"))[0]
    with h5py.File(no_target, "r+") as f:
        del f["reconstruction_rss"]
    with pytest.raises(DataError, match=rf"{no_target.name}: no target \('reconstruction_rss'\) in the 'train' split"):
        _datamodule(root, test_split="train").setup("test")
    _datamodule(root, test_split="train").setup("predict")
    kept = _datamodule(root, skip_bad_files=True, test_split="train")
    names = {Path(s.fname).name for s in kept.eval_dataset("train", require_target=True).raw_samples}
    assert names and no_target.name not in names
    assert no_target.name in {Path(s.fname).name for s in kept.eval_dataset("train").raw_samples}


def test_fit_without_validation_needs_no_val_folder(sim_root, tmp_path):
    """``limit_val_batches=0`` (data_scripts/train_bundled_model.py's stages) never reads val: an empty val folder
    is no error then (the setup check had stopped that script before its first step)."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(sim_root, root, ignore=shutil.ignore_patterns("*.pkl"))
    shutil.rmtree(root / "val")
    (root / "val").mkdir()
    code = main(["fit", "--data.data_path", str(root), "--model", "reconkit.training.VarNetModule",
                 "--model.num_cascades", "1", "--model.chans", "2", "--model.pools", "1", "--model.sens_chans", "2",
                 "--model.sens_pools", "1", "--trainer.accelerator", "cpu", "--trainer.max_steps", "1",
                 "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(tmp_path / "run"),
                 "--data.num_workers", "0"])
    assert code == 0


def test_fit_without_validation_that_trains_on_val_checks_it_at_setup(sim_root, tmp_path):
    """With ``combine_train_val`` and ``limit_val_batches=0`` training still reads val: a bad val file is reported
    by setup with the other splits' problems (it surfaced only when the train loader was built, on every rank)."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(sim_root, root, ignore=shutil.ignore_patterns("*.pkl"))
    (root / "val" / "broken.h5").write_bytes(b"")
    datamodule = _datamodule(root, combine_train_val=True)
    datamodule.trainer = _trainer(tmp_path / "run", 1, limit_val_batches=0)
    with pytest.raises(DataError, match=r"broken\.h5: empty file"):
        datamodule.setup("fit")
    plain = _datamodule(root)
    plain.trainer = _trainer(tmp_path / "run", 1, limit_val_batches=0)
    plain.setup("fit")  # without combine_train_val, val is not read


def test_varnet_trains_on_single_coil_data_as_one_coil(sim_root, tmp_path):
    """fastMRI's single-coil layout (``kspace`` (slices, H, W), ``reconstruction_esc``): the VarNet runs it as one
    coil (it failed with a shape error in its first step)."""
    root = tmp_path / "singlecoil"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        for source in sorted((sim_root / split).glob("*.h5")):
            with h5py.File(source) as src, h5py.File(root / split / source.name, "w") as dst:
                kspace = src["kspace"][:, 0]  # coil 0 as the single coil
                image = np.abs(np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kspace, axes=(-2, -1)), norm="ortho"),
                                               axes=(-2, -1)))
                target = center_crop(torch.from_numpy(image), src["reconstruction_rss"].shape[-2:]).numpy()
                dst.create_dataset("kspace", data=kspace)
                dst.create_dataset("reconstruction_esc", data=target.astype(np.float32))
                dst.create_dataset("ismrmrd_header", data=src["ismrmrd_header"][()])
                dst.attrs.update({**src.attrs, "max": float(target.max())})
    seed_everything(0)
    module = VarNetModule(**TINY_VARNET, lr=1e-3)
    trainer = _trainer(tmp_path / "run", 1)
    trainer.fit(module, datamodule=_datamodule(root, challenge="singlecoil"))
    assert math.isfinite(float(trainer.callback_metrics["val_ssim"])) and float(trainer.callback_metrics["val_ssim"]) > 0


def test_datamodule_setup_check_and_the_datasets_read_each_header_once(sim_root, monkeypatch):
    from reconkit.data import slice_dataset

    reads = []
    read = slice_dataset.read_volume_info
    monkeypatch.setattr(slice_dataset, "read_volume_info", lambda path, *a, **k: reads.append(path) or read(path, *a, **k))
    datamodule = _datamodule(sim_root)  # no dataset cache file (the default)
    datamodule.setup("fit")
    datamodule.train_dataset()
    datamodule.eval_dataset("val")
    files = sorted((sim_root / "train").glob("*.h5")) + sorted((sim_root / "val").glob("*.h5"))
    assert sorted(reads) == sorted(files)


@pytest.mark.parametrize("options", [{}, {"sample_rate": 0.5}, {"volume_sample_rate": 0.7, "combine_train_val": True},
                                     {"fraction": 0.5}])
def test_datamodule_fit_builds_each_training_split_once_and_draws_the_same_samples(sim_root, monkeypatch, options):
    """setup("fit")'s check builds the training splits as train_dataset does and hands them over (each build had
    reloaded the dataset cache and listed the folder again: about 0.5 s at 4,500 files): one SliceDataset per split
    setup and the train loader read, and the samples, their order and the masks are those of a fresh build."""
    from reconkit.training import datamodule as datamodule_module

    fresh = _datamodule(sim_root, **options).train_dataloader().dataset
    built = []
    monkeypatch.setattr(datamodule_module, "SliceDataset",
                        lambda root, *a, **k: built.append(Path(root).name) or SliceDataset(root, *a, **k))
    datamodule = _datamodule(sim_root, **options)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    assert sorted(built) == ["train", "val"]  # val: checked for validation, or read by training with it
    first, reused = [fresh[i] for i in range(len(fresh))], [loader.dataset[i] for i in range(len(loader.dataset))]
    assert [(s.fname, s.slice_num) for s in reused] == [(s.fname, s.slice_num) for s in first] and first
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(first, reused))
    assert len(datamodule.train_dataloader().dataset) == len(fresh)  # a second loader builds its datasets again
    assert sorted(built) == ["train", "train", "val"] + (["val"] if options.get("combine_train_val") else [])


def test_datamodule_prepare_data_warms_the_dataset_cache_so_setup_reads_no_header(sim_root, tmp_path, monkeypatch):
    """Under DDP, Lightning runs prepare_data on local rank 0 alone before every rank's setup: it scans the splits
    into the dataset cache, so the other ranks (data modules of their own here) read no header (every rank had
    scanned every file at once). Bad files are cached as bad and still reported by setup; without prepare_data, or
    with the cache off, nothing changes."""
    import shutil

    from reconkit.data import slice_dataset

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    reads = []
    read = slice_dataset.read_volume_info
    monkeypatch.setattr(slice_dataset, "read_volume_info", lambda path, *a, **k: reads.append(path) or read(path, *a, **k))
    root = tmp_path / "data"
    shutil.copytree(sim_root, root, ignore=shutil.ignore_patterns("*.pkl"))
    files = {split: sorted((root / split).glob("*.h5")) for split in ("train", "val", "test")}

    _datamodule(root).prepare_data()  # cache off (the default): nothing to warm
    assert reads == [] and not (tmp_path / "cache").exists()
    _datamodule(root, use_dataset_cache=True).setup("fit")  # no prepare_data: setup scans as before
    assert sorted(reads) == files["train"] + files["val"]

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cold"))
    (root / "train" / "broken.h5").write_bytes(b"")
    reads.clear()
    _datamodule(root, use_dataset_cache=True).prepare_data()  # no trainer: every split; the bad file not raised
    assert sorted(reads) == sorted([*files["train"], root / "train" / "broken.h5", *files["val"], *files["test"]])
    reads.clear()
    other_rank = _datamodule(root, use_dataset_cache=True)
    with pytest.raises(DataError, match=r"broken\.h5: empty file"):  # as without prepare_data, from the cache
        other_rank.setup("fit")
    other_rank.setup("test")
    assert reads == []
    (root / "train" / "broken.h5").unlink()

    class Rank0(FastMriDataModule):  # the reads left when Lightning calls setup
        def setup(self, stage):
            reads.clear()
            super().setup(stage)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "trainer"))
    datamodule = Rank0(root, batch_size=1, num_workers=0, use_dataset_cache=True)
    _trainer(tmp_path / "run", 1, limit_val_batches=1).validate(VarNetModule(**TINY_VARNET), datamodule=datamodule)
    assert reads == [] and len(SliceDataset(root / "val", use_dataset_cache=True).raw_samples) == 6
    assert reads == [] and len(SliceDataset(root / "train", use_dataset_cache=True).raw_samples) == 9
    assert sorted(reads) == files["train"]  # validate's prepare_data scanned the val split alone


def test_datamodule_refuses_both_val_sample_rates_when_built(sim_root):
    with pytest.raises(ConfigError, match="either set val_sample_rate .* or val_volume_sample_rate"):
        _datamodule(sim_root, val_sample_rate=0.5, val_volume_sample_rate=0.5)


@pytest.mark.parametrize("options, problem", [
    ({"batch_size": 0}, r"batch_size must be an integer >= 1, got 0"),
    ({"batch_size": 2.5}, r"batch_size must be an integer >= 1, got 2.5"),
    ({"num_workers": -1}, r"num_workers must be an integer >= 0, got -1"),
    ({"challenge": "knee"}, r"challenge should be either \"singlecoil\" or \"multicoil\", got 'knee'"),
])
def test_datamodule_refuses_loader_settings_when_built(tmp_path, options, problem):
    """Each was found only after the data scan: batch_size 0 a ZeroDivisionError in the sampler (2.5 a TypeError),
    num_workers -1 the DataLoader's ValueError, an unknown challenge SliceDataset's ValueError at setup."""
    with pytest.raises(ConfigError, match=problem):
        FastMriDataModule(tmp_path, **{"num_workers": 0, **options})


def test_sample_rate_draws_follow_the_data_seed_not_the_global_random_state(sim_root):
    """DDP ranks (or runs) whose Python random differs must train and validate on the same slices."""

    def drawn(seed: int, global_seed: int) -> list:
        random.seed(global_seed)
        state = random.getstate()
        data = _datamodule(sim_root, sample_rate=0.5, val_sample_rate=0.5, seed=seed)
        data.trainer = None
        slices = [(s.fname.name, s.slice_ind) for s in data.train_dataset().dataset.raw_samples]
        slices += [(s.fname.name, s.slice_ind) for s in data.eval_dataset("val").raw_samples]
        assert random.getstate() == state  # the global stream is left as it was
        return slices

    assert drawn(seed=0, global_seed=1) == drawn(seed=0, global_seed=2)
    assert drawn(seed=0, global_seed=1) != drawn(seed=3, global_seed=1)


def test_datamodule_num_volumes_keeps_whole_volumes(sim_root):
    full = _datamodule(sim_root).train_dataset()
    subset = _datamodule(sim_root, num_volumes=1, seed=1).train_dataset()
    assert len(full) == 9 and len(subset) == 3  # 3 volumes x 3 slices; one whole volume kept
    assert len({subset[i].fname for i in range(len(subset))}) == 1


def test_datamodule_fraction_subset_is_training_volumes_in_dataset_order(sim_root):
    """train_dataset's fraction subset keeps exactly training_volumes()' slices, in the SliceDataset's order (both
    select by _slice_fnames' per-slice file names)."""
    data = _datamodule(sim_root, fraction=0.5, seed=2)
    subset = data.train_dataset().dataset
    kept = data.training_volumes()
    every = [(s.fname.name, s.slice_ind) for s in data.slice_dataset("train", None, None, None).raw_samples]
    assert len(kept) == 2 and subset.indices == [i for i, (name, _) in enumerate(every) if name in kept]
    assert [(subset[i].fname, subset[i].slice_num) for i in range(len(subset))] == [
        every[i] for i in subset.indices]


def test_training_masks_change_with_epoch_but_repeat_for_the_same_epoch(sim_root):
    dataset = _datamodule(sim_root, mask_type="random", center_fractions=[0.1], accelerations=[4]).train_dataset()
    n = len(dataset)
    first = dataset[0].mask.clone()
    assert torch.equal(dataset[0].mask, first)  # same epoch, same sample: same mask (any worker, any rank)
    assert not torch.equal(dataset[n].mask, first)  # index n = sample 0 of epoch 1
    assert dataset[n].fname == dataset[0].fname and dataset[n].slice_num == dataset[0].slice_num
    assert torch.equal(dataset[0].mask, first)


def test_varnet_module_passes_the_sense_step_to_the_model_and_checkpoint():
    module = VarNetModule(num_cascades=1, chans=2, pools=1, sens_chans=2, sens_pools=1, final_dc_iters=3,
                          final_dc_prior=0.1)
    assert (module.model.final_dc_iters, module.model.final_dc_prior) == (3, 0.1)
    assert module.model_kwargs["final_dc_iters"] == 3 and module.hparams.final_dc_iters == 3  # checkpoint entry
    plain = VarNetModule(num_cascades=1, chans=2, pools=1, sens_chans=2, sens_pools=1)
    assert plain.model.final_dc_iters == 0 and "final_dc_iters" not in plain.model_kwargs
    assert module.model.state_dict().keys() == plain.model.state_dict().keys()  # the step has no weights


def test_prediction_writer_writes_each_volume_when_its_slices_are_done(tmp_path):
    """``train predict`` held every predicted slice of the split until the end of the pass (twice: Lightning's
    returned predictions too), so its memory grew with the whole test set; a volume is now written, and dropped,
    as soon as its last slice arrives, and the CLI asks Lightning not to keep the outputs."""
    from types import SimpleNamespace

    from reconkit.training.cli import ReconLightningCLI
    from reconkit.training.predictions import PredictionWriter

    writer = PredictionWriter(str(tmp_path))
    dataset = SimpleNamespace(num_slices={Path("data/a.h5"): 3, Path("data/b.h5"): 2})
    trainer = SimpleNamespace(predict_dataloaders=SimpleNamespace(dataset=dataset), world_size=1, is_global_zero=True)
    writer.on_predict_epoch_start(trainer, None)
    batches = [(["a.h5", "a.h5"], [0, 1]), (["a.h5", "b.h5"], [2, 0]), (["b.h5"], [1])]
    for index, (fnames, slice_nums) in enumerate(batches):
        outputs = {"fname": fnames, "slice_num": torch.tensor(slice_nums),
                   "output": torch.stack([torch.full((4, 3), float(10 * (f == "b.h5") + s)) for f, s in
                                          zip(fnames, slice_nums)])}  # fmt: skip
        writer.on_predict_batch_end(trainer, None, outputs, None, index)
        assert (tmp_path / "a.h5").exists() == (index >= 1) and (tmp_path / "b.h5").exists() == (index == 2)
        assert set(writer._slices) == [{"a.h5"}, {"b.h5"}, set()][index]  # written volumes are not kept
    writer.on_predict_epoch_end(trainer, None)
    for name, offset in (("a.h5", 0), ("b.h5", 10)):
        with h5py.File(tmp_path / name) as f:
            volume = f["reconstruction"][()]
        np.testing.assert_array_equal(volume[:, 0, 0], offset + np.arange(len(volume)))
    assert [p.name for p in writer.written] == ["a.h5", "b.h5"]

    cli = ReconLightningCLI.__new__(ReconLightningCLI)  # the predict default, without building a trainer
    cli.subcommand, cli.trainer_defaults = "predict", {"callbacks": []}
    config = SimpleNamespace(trainer=SimpleNamespace(enable_progress_bar=None, default_root_dir=str(tmp_path),
                                                     check_val_every_n_epoch=1, logger=False),
                             checkpoint=SimpleNamespace(dirpath="c"),
                             last_checkpoint=SimpleNamespace(dirpath="c", filename="last", save_on_train_epoch_end=None),
                             diagnostics=SimpleNamespace(dirpath="d"), predictions=SimpleNamespace(dirpath="p"),
                             return_predictions=None)  # fmt: skip
    config.get = lambda key, default=None: getattr(config, key, default)
    cli.config = {"predict": config}
    cli.before_instantiate_classes()
    assert config.return_predictions is False


def test_dataloader_workers_leave_the_slurm_requeue_signal_to_the_training_process(sim_root, tmp_path):
    # SLURM's --signal reaches every process of the job step, dataloader workers too; a forked worker inherits
    # Lightning's SIGUSR1 handler, which would save a stale hpc_ckpt_N.ckpt and request the requeue once more
    marks = tmp_path / "handled"

    def handler(signum, frame):
        with open(marks, "a") as f:
            f.write(f"{os.getpid()}\n")

    previous = signal.signal(signal.SIGUSR1, handler)  # stands in for Lightning's SLURM handler
    try:
        loader = FastMriDataModule(sim_root, center_fractions=[0.25], accelerations=[2],
                                   num_workers=1).train_dataloader()
        iterator = iter(loader)
        next(iterator)
        (worker,) = iterator._workers
        os.kill(worker.pid, signal.SIGUSR1)
        time.sleep(0.5)
        for _ in iterator:  # the worker runs Python code again: a handler it had would have run by now
            pass
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert not marks.exists(), f"a dataloader worker ran the requeue handler: {marks.read_text()}"
