"""Training diagnostics: k-space band errors (against fastmri's NMSE and Parseval), the lazy / feature-learning
measures (against closed forms and torch.func's exact JVP), and the callback in a real fit (files, loggers, resume,
and that measuring leaves training bit-identical)."""

from __future__ import annotations

import csv
import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from fastmri import evaluate
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from reconkit.cli.train import main
from reconkit.metrics.spectral import band_energies, band_index, band_nmse
from reconkit.training import FastMriDataModule, UnetModule, VarNetModule, VitModule
from reconkit.training.base import Images
from reconkit.training.diagnostics import TrainingDiagnostics, plot_diagnostics, regime_label
from reconkit.training.regime import (
    empirical_ntk,
    kernel_distance,
    linearization_error,
    parameters_set_to,
    relative_weight_change,
    snapshot,
)

TINY_VARNET = {"num_cascades": 2, "chans": 4, "pools": 2, "sens_chans": 2, "sens_pools": 1}


# ------------------------------------------------------------------------------------------------ k-space bands


@pytest.mark.parametrize("shape", [(32, 24), (33, 17), (1, 8)])
def test_bands_partition_the_spectrum_symmetrically(shape):
    bands = band_index(shape, 5)
    assert bands.shape == shape and bands.min() >= 0 and bands.max() <= 4
    assert bands[0, 0] == 0  # DC
    # |k| is even in k, so a real image's band-limited part stays real: band(k) == band(-k)
    mirrored = torch.roll(torch.flip(bands, (0, 1)), shifts=(1, 1), dims=(0, 1))
    assert torch.equal(bands, mirrored)


def test_one_band_is_fastmris_nmse_and_band_errors_add_up_to_the_squared_error():
    rng = np.random.default_rng(0)
    target = rng.random((3, 40, 28)).astype(np.float32)
    output = target + 0.1 * rng.standard_normal(target.shape).astype(np.float32)
    (value,) = band_nmse(torch.from_numpy(output), torch.from_numpy(target), num_bands=1).tolist()
    assert value == pytest.approx(evaluate.nmse(target, output), rel=1e-6)  # fastmri sums in float32
    error, energy = band_energies(torch.from_numpy(output), torch.from_numpy(target), num_bands=6)
    assert float(error.sum()) == pytest.approx(float(np.sum((output.astype(np.float64) - target) ** 2)), rel=1e-9)
    assert float(energy.sum()) == pytest.approx(float(np.sum(target.astype(np.float64) ** 2)), rel=1e-9)


@pytest.mark.parametrize("band", [0, 3, 7])
def test_an_error_confined_to_one_band_shows_only_in_that_band(band):
    generator = torch.Generator().manual_seed(band)
    target = torch.rand(2, 48, 36, generator=generator, dtype=torch.float64) + 1
    in_band = band_index((48, 36), 8) == band
    spectrum = torch.randn(2, 48, 36, generator=generator, dtype=torch.complex128) * in_band
    perturbation = torch.fft.ifft2(spectrum, norm="ortho").real  # real: the band is symmetric
    values = band_nmse(target + perturbation, target, num_bands=8)
    assert values[band] > 1e-6
    others = torch.cat([values[:band], values[band + 1:]])
    assert float(others.abs().max()) < 1e-20


def test_bands_where_the_target_has_no_energy_are_nan_not_round_off_ratios():
    """A float32 sinusoid's spectrum sits in one band; the others hold only round-off (their ratio read e.g. 0.84)."""
    x = torch.arange(36, dtype=torch.float64)
    target = (1 + torch.cos(2 * math.pi * 3 * x / 36)).float().expand(2, 48, 36)  # DC and 3 cycles along W
    output = target + 1e-3 * torch.randn(2, 48, 36, generator=torch.Generator().manual_seed(0))
    values = band_nmse(output, target, num_bands=8)
    filled = {int(b) for b in band_index((48, 36), 8)[torch.fft.fft2(target[0]).abs() > 1e-3]}
    assert filled == {0, 1}
    assert torch.isfinite(values[[0, 1]]).all() and torch.isnan(values[2:]).all()
    assert torch.isnan(band_nmse(output, torch.zeros_like(output))).all()  # no energy at all


def test_band_nmse_rejects_mismatched_or_flat_inputs():
    with pytest.raises(ValueError, match="differ"):
        band_nmse(torch.zeros(2, 8, 8), torch.zeros(2, 8, 9))
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        band_nmse(torch.zeros(8), torch.zeros(8))
    with pytest.raises(ValueError, match="num_bands"):
        band_nmse(torch.zeros(8, 8), torch.zeros(8, 8), num_bands=0)


# ------------------------------------------------------------------------------------------------ regime measures


def test_kernel_distance_ignores_scale_and_reaches_one_for_orthogonal_kernels():
    kernel = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    assert kernel_distance(kernel, 7 * kernel) == pytest.approx(0.0, abs=1e-12)
    assert kernel_distance(torch.diag(torch.tensor([1.0, 0.0])), torch.diag(torch.tensor([0.0, 1.0]))) == 1.0
    with pytest.raises(ValueError, match="all zeros"):
        kernel_distance(torch.zeros(2, 2), kernel)


def test_empirical_ntk_of_a_linear_layer_is_the_closed_form():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    x = torch.randn(4, 5)
    projections = torch.randn(6, 12)
    kernel = empirical_ntk(layer, lambda: layer(x).flatten(), projections)
    # f[n, o] = W[o] · x[n] + b[o]; s_i = Σ v_i[n, o] f[n, o]: ∂s_i/∂W[o] = Σ_n v_i[n, o] x[n], ∂s_i/∂b[o] = Σ_n v_i[n, o]
    v = projections.double().view(6, 4, 3)
    grad_w = torch.einsum("ino,nd->iod", v, x.double()).reshape(6, -1)
    grad_b = v.sum(1)
    expected = grad_w @ grad_w.T + grad_b @ grad_b.T
    torch.testing.assert_close(kernel, expected, rtol=1e-5, atol=1e-6)


def test_linearization_error_is_zero_for_a_model_linear_in_its_weights():
    torch.manual_seed(1)
    layer = nn.Linear(5, 3)
    x = torch.randn(4, 5)
    initial = snapshot(layer)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    moved = snapshot(layer)
    for method in ("jvp", "finite difference"):
        error, used = linearization_error(layer, lambda: layer(x).flatten(), initial, method=method)
        assert error < 1e-5 and used == method
    for name, value in snapshot(layer).items():  # the weights are back where they were
        assert torch.equal(value, moved[name])


def test_linearization_error_equals_the_exact_jvp_for_a_smooth_network():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    initial = snapshot(net)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.3).add_(0.2 * torch.randn_like(p))
    current = snapshot(net)
    delta = {name: current[name] - initial[name] for name in current}

    def f(params):
        return torch.func.functional_call(net, params, (x,)).flatten()

    start, jvp = torch.func.jvp(f, (initial,), (delta,))
    exact = float(torch.linalg.vector_norm(f(current) - start - jvp) / torch.linalg.vector_norm(f(current) - start))
    assert exact > 0.05  # a real nonlinearity, not the trivial case
    assert linearization_error(net, lambda: net(x).flatten(), initial) == (pytest.approx(exact, rel=1e-12), "jvp")
    error, _ = linearization_error(net, lambda: net(x).flatten(), initial, method="finite difference")
    assert error == pytest.approx(exact, rel=1e-4)  # smooth network: the fallback agrees
    with torch.no_grad():
        now = net(x).flatten()
    given = linearization_error(net, lambda: net(x).flatten(), initial, current_output=now)  # one forward fewer
    assert given == (pytest.approx(exact, rel=1e-12), "jvp")
    stale = linearization_error(net, lambda: net(x).flatten(), initial, current_output=now + 1)
    assert stale.error != pytest.approx(exact, rel=1e-3)  # it is the given output that counts


class _NoForwardMode(torch.autograd.Function):
    """An old-style autograd function (no setup_context / jvp): torch.func cannot run it."""

    @staticmethod
    def forward(ctx, x):
        return x.tanh()

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError


def test_linearization_error_falls_back_to_finite_differences():
    torch.manual_seed(3)
    layer = nn.Linear(4, 4).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    initial = snapshot(layer)
    with torch.no_grad():
        layer.weight.add_(0.3)
    error, method = linearization_error(layer, lambda: _NoForwardMode.apply(layer(x)).flatten(), initial)
    assert method == "finite difference" and 0 < error < 1
    with pytest.raises(RuntimeError, match="functorch"):
        linearization_error(layer, lambda: _NoForwardMode.apply(layer(x)).flatten(), initial, method="jvp")


def test_relative_weight_change_and_temporary_parameters():
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0]]))
    initial = snapshot(layer)
    with torch.no_grad():
        layer.weight.add_(torch.tensor([[0.0, 0.5]]))
    assert relative_weight_change(layer, initial) == pytest.approx(0.1)
    with pytest.raises(RuntimeError, match="boom"), parameters_set_to(layer, initial):
        assert torch.equal(layer.weight, initial["weight"])
        raise RuntimeError("boom")
    assert torch.equal(layer.weight, torch.tensor([[3.0, 4.5]]))  # restored even after an error
    with pytest.raises(ValueError, match="prefix"):
        relative_weight_change(layer, initial, prefix="cascades.")
    assert math.isnan(relative_weight_change(layer, {"weight": torch.zeros(1, 2)}))  # a zero-initialised head


class _NtkNet(nn.Module):
    """Two-layer tanh network in the NTK parameterisation, ``f(x) = W₂ tanh(W₁ x / √d) / √width``."""

    def __init__(self, inputs: int, width: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(width, inputs, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.randn(1, width, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w1.T / self.w1.shape[1] ** 0.5) @ self.w2.T / self.w1.shape[0] ** 0.5


def _regime_after_gradient_descent(width: int) -> tuple[float, float, float]:
    torch.manual_seed(0)
    x = torch.randn(20, 5, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True))
    net, probe = _NtkNet(5, width), torch.randn(6, 5, dtype=torch.float64)

    def outputs():
        return net(probe).flatten()

    projections = torch.eye(6, dtype=torch.float64)
    initial, initial_kernel = snapshot(net), empirical_ntk(net, outputs, projections)
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    for _ in range(200):
        optimizer.zero_grad()
        loss = (net(x) - y).square().mean()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.03  # both widths fit the data equally well
    return (relative_weight_change(net, initial), kernel_distance(initial_kernel, empirical_ntk(net, outputs, projections)),
            linearization_error(net, outputs, initial).error)


def test_the_measures_find_the_lazy_regime_of_a_wide_network_and_feature_learning_in_a_narrow_one():
    """NTK theory (Jacot et al. 2018; Lee et al. 2019): with width w, the weights move O(1/√w), the kernel O(1/w)
    and the network stays within O(1/√w) of its linearisation. Same data, steps and learning rate."""
    narrow, wide = _regime_after_gradient_descent(16), _regime_after_gradient_descent(4096)
    assert regime_label(*narrow[1:]) == "feature learning" and narrow[2] > 0.2
    assert regime_label(*wide[1:]) == "lazy" and wide[1] < 1e-4 and wide[2] < 0.02
    assert narrow[0] / wide[0] > 8  # √256 = 16 in the limit
    assert narrow[1] / wide[1] > 1000  # 256 in the limit; measured 9e3


def test_regime_label_and_callback_arguments():
    assert regime_label(0.02, 0.05) == "lazy"
    assert regime_label(0.02, 0.5) == "feature learning"
    assert regime_label(0.4, 0.05) == "feature learning"
    with pytest.raises(ValueError, match="probe_split"):
        TrainingDiagnostics(every_n_steps=5, probe_split="test")
    with pytest.raises(ValueError, match="every_n_steps"):
        TrainingDiagnostics(every_n_steps=-1)
    with pytest.raises(ValueError, match="ntk_projections >= 2"):
        TrainingDiagnostics(every_n_steps=5, ntk_projections=1)


# ------------------------------------------------------------------------------------------------ the callback


def test_validation_band_nmse_counts_a_slice_the_ddp_sampler_repeats_once():
    """Under DDP the validation sampler evens the ranks out by repeating slices; the split's band NMSE must be
    that of its slices, each once (it summed the repeats in)."""
    torch.manual_seed(0)
    output, target = torch.rand(2, 12, 10), torch.rand(2, 12, 10)
    images = [Images(output[i:i + 1], target[i:i + 1], torch.ones(1), [f"{i}.h5"], torch.tensor([0])) for i in (0, 1)]
    logged = {}
    module = types.SimpleNamespace(log=lambda name, value: logged.__setitem__(name, value), device=torch.device("cpu"))
    single_process = types.SimpleNamespace(reduce=lambda tensor, reduce_op: tensor)
    trainer = types.SimpleNamespace(sanity_checking=False, is_global_zero=False, strategy=single_process)
    diagnostics = TrainingDiagnostics(every_n_steps=1, num_bands=3)
    diagnostics._active = True
    diagnostics.on_validation_epoch_start(trainer, module)
    for batch_idx, batch in enumerate([images[0], images[1], images[0]]):  # the last: a padding repeat
        diagnostics.on_validation_batch_end(trainer, module, batch, None, batch_idx)
    diagnostics.on_validation_epoch_end(trainer, module)
    assert [logged[f"val_band_nmse/b{b}"] for b in range(3)] == pytest.approx(band_nmse(output, target, 3).tolist())


def _fit(sim_root: Path, root_dir: Path, diagnostics: TrainingDiagnostics | None, module=None,
         max_epochs: int = 2) -> VarNetModule:
    torch.manual_seed(0)
    module = module or VarNetModule(**TINY_VARNET, lr=3e-3, lr_scheduler="none")
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, default_root_dir=root_dir, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
                      logger=CSVLogger(root_dir, name="csv"), callbacks=[] if diagnostics is None else [diagnostics])
    datamodule = FastMriDataModule(sim_root, batch_size=1, num_workers=0, mask_type="equispaced_fraction",
                                   center_fractions=[0.25], accelerations=[2])
    trainer.fit(module, datamodule=datamodule)
    return module


def test_diagnostics_record_bands_and_regime_and_leave_training_unchanged(sim_root, tmp_path):
    diagnostics = TrainingDiagnostics(every_n_steps=4, num_bands=6, ntk_projections=4, dirpath=str(tmp_path / "diag"))
    measured = _fit(sim_root, tmp_path / "with", diagnostics)
    plain = _fit(sim_root, tmp_path / "without", None)
    for name, value in plain.state_dict().items():  # measuring does not perturb the weights, RNG or optimiser
        assert torch.equal(measured.state_dict()[name], value), name

    document = json.loads((tmp_path / "diag" / "diagnostics.json").read_text())
    assert document["num_bands"] == 6 and document["probe_split"] == "val"
    probe = document["probe"]  # the default 2 slices, named
    assert len(probe) == 2 and all(p["fname"].endswith(".h5") and p["slice"] >= 0 for p in probe)
    records = [r for r in document["history"] if "weight_change" in r]
    assert [r["step"] for r in records] == [0, 4, 8, 12, 16, 18]  # 9 slices x 2 epochs, plus the final step
    first, last = records[0], records[-1]
    assert first["weight_change"] == 0 and first["ntk_distance"] == pytest.approx(0, abs=1e-9)
    assert first["linearization_error"] is None and first["regime"] is None  # undefined before any change
    assert all(r["linearization_method"] == "jvp" for r in records)  # the VarNet runs in forward mode
    assert last["weight_change"] > 0 and 0 < last["ntk_distance"] <= 1 and last["linearization_error"] > 0
    assert set(last["weight_change_by_block"]) == {"model.sens_net", "model.cascades.0", "model.cascades.1"}
    assert last["regime"] == regime_label(last["ntk_distance"], last["linearization_error"])
    assert len(last["band_nmse"]) == 6 and all(v > 0 for v in last["band_nmse"])
    assert sum(last["band_nmse"][:2]) < sum(first["band_nmse"][:2])  # it learned the low bands
    validations = [r for r in document["history"] if "val_band_nmse" in r]
    assert [r["step"] for r in validations] == [9, 18] and all(len(r["val_band_nmse"]) == 6 for r in validations)
    assert (tmp_path / "diag" / "diagnostics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    (metrics,) = (tmp_path / "with" / "csv").glob("version_*/metrics.csv")
    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    logged = {key for row in rows for key, value in row.items() if value}
    assert {"diagnostics/weight_change", "diagnostics/ntk_distance", "diagnostics/linearization_error",
            "diagnostics/band_nmse/b0", "val_band_nmse/b5"} <= logged


def test_diagnostics_leave_a_model_with_dropout_unchanged(sim_root, tmp_path):
    """The probe's first pass (which sizes the NTK projections) runs in eval mode: in training mode its dropout
    drew from the global RNG and the run with diagnostics trained on other dropout masks."""
    def unet() -> UnetModule:
        torch.manual_seed(0)
        return UnetModule(chans=4, num_pool_layers=1, drop_prob=0.3, lr=3e-3, lr_scheduler="none")

    diagnostics = TrainingDiagnostics(every_n_steps=100, ntk_projections=2, dirpath=str(tmp_path / "diag"))
    measured = _fit(sim_root, tmp_path / "with", diagnostics, module=unet(), max_epochs=1)
    plain = _fit(sim_root, tmp_path / "without", None, module=unet(), max_epochs=1)
    for name, value in plain.state_dict().items():
        assert torch.equal(measured.state_dict()[name], value), name


def test_a_training_probe_comes_from_the_volumes_training_reads(sim_root, tmp_path):
    """``probe_split="train"`` with a training subset (``fraction`` / ``num_volumes``) probes the subset: the
    volumes left out are held-out data, which the probe on "train" is meant not to be."""
    datamodule = FastMriDataModule(sim_root, batch_size=1, num_workers=0, mask_type="equispaced_fraction",
                                   center_fractions=[0.25], accelerations=[2], num_volumes=1)
    (trained,) = datamodule.training_volumes()
    diagnostics = TrainingDiagnostics(every_n_steps=100, probe_split="train", probe_slices=3, ntk_projections=2,
                                      dirpath=str(tmp_path / "diag"))
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                      logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=tmp_path, callbacks=[diagnostics])
    trainer.fit(VarNetModule(**TINY_VARNET), datamodule=datamodule)
    probe = json.loads((tmp_path / "diag" / "diagnostics.json").read_text())["probe"]
    assert len(probe) == 3 and {p["fname"] for p in probe} == {trained}  # 3 slices, all of the one trained volume


def test_cli_diagnostics_resume_from_the_same_start(sim_root, tmp_path, tiny_varnet_config, capsys):
    config_path = tiny_varnet_config
    args = ["fit", "--config", str(config_path), "--diagnostics.every_n_steps", "5",
            "--diagnostics.ntk_projections", "2"]
    assert main(args) == 0
    folder = tmp_path / "run" / "diagnostics"
    first_run = json.loads((folder / "diagnostics.json").read_text())["history"]
    assert main([*args, "--trainer.max_epochs", "2", "--ckpt_path", "last"]) == 0
    history = json.loads((folder / "diagnostics.json").read_text())["history"]
    # the records up to the last checkpoint come from it; the end-of-run one (step 9, written after that checkpoint)
    # is measured again at the resume, from the same weights: the same numbers
    def numbers(record):
        return {key: value for key, value in record.items() if key not in ("epoch", "seconds")}

    assert [numbers(r) for r in history[: len(first_run)]] == [numbers(r) for r in first_run]
    # a resume with other diagnostics settings is refused before it trains (it would mix two series)
    before = (folder / "diagnostics.json").read_text()
    assert main([*args, "--diagnostics.num_bands", "4", "--trainer.max_epochs", "3", "--ckpt_path", "last"]) == 1
    assert "--diagnostics.num_bands 4 (the checkpoint's run: 8)" in capsys.readouterr().err
    assert (folder / "diagnostics.json").read_text() == before
    steps = [r["step"] for r in history if "weight_change" in r]
    assert steps == [0, 5, 9, 10, 15, 18]  # measured from the first run's θ₀, not restarted at the resume
    assert (folder / "diagnostics_init.pt").is_file() and (folder / "diagnostics.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (tmp_path / "run" / "tensorboard").glob("version_1")  # the resumed run's TensorBoard log
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert [image.step for image in accumulator.Images("diagnostics")] == [18, 18]  # validation end, training end
    assert "diagnostics/ntk_distance" in accumulator.Tags()["scalars"]


def test_diagnostics_are_off_by_default(sim_root, tmp_path):
    diagnostics = TrainingDiagnostics(dirpath=str(tmp_path / "diag"))
    _fit(sim_root, tmp_path / "run", diagnostics)
    assert not (tmp_path / "diag").exists() and diagnostics.history == []


def test_diagnostics_on_the_vit_run_in_forward_mode_and_skip_its_zero_head(sim_root, tmp_path):
    """The ViT's attention runs in forward mode through PyTorch's math kernel (the fused CPU kernel has no rule), and
    its output head starts at zero (no relative change to report): the measurement says so instead of failing."""
    diagnostics = TrainingDiagnostics(every_n_steps=4, ntk_projections=2, dirpath=str(tmp_path / "diag"))
    _fit(sim_root, tmp_path / "run", diagnostics, module=VitModule(embed_dim=16, depth=1, num_heads=2), max_epochs=1)
    last = diagnostics.history[-1]
    assert last["step"] == 9 and last["linearization_method"] == "jvp" and last["linearization_error"] > 0
    assert last["weight_change_by_block"]["model.head"] is None and last["weight_change"] > 0


def test_diagnostics_without_the_data_module_say_what_they_need(sim_root, tmp_path):
    """Plain dataloaders give the callback no split to draw its probe from: a clear error, before any training."""
    from reconkit.errors import ReconkitError

    loader = FastMriDataModule(sim_root, batch_size=1, num_workers=0, mask_type="equispaced_fraction",
                               center_fractions=[0.25], accelerations=[2]).train_dataloader()
    module = VarNetModule(**TINY_VARNET)
    before = {name: value.clone() for name, value in module.state_dict().items()}
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                      callbacks=[TrainingDiagnostics(every_n_steps=2, dirpath=str(tmp_path / "diag"))])
    with pytest.raises(ReconkitError, match="FastMriDataModule"):
        trainer.fit(module, train_dataloaders=loader)
    assert all(torch.equal(module.state_dict()[name], value) for name, value in before.items())  # not trained
    assert not (tmp_path / "diag").exists()


def test_training_volumes_are_the_volumes_of_the_training_dataset(sim_root):
    """``training_volumes`` (the probe's volumes for ``probe_split="train"``) left out ``volume_sample_rate``, so with
    it set the probe could come from volumes training never reads."""
    datamodule = FastMriDataModule(sim_root, batch_size=1, num_workers=0, mask_type="equispaced_fraction",
                                   center_fractions=[0.25], accelerations=[2], volume_sample_rate=0.5)
    trained = {Path(fname).name for fname in FastMriDataModule._slice_fnames(datamodule.train_dataset().dataset)}
    assert datamodule.training_volumes() == trained


def test_plotting_diagnostics_leaves_pyplot_alone(tmp_path):
    """``plot_diagnostics`` called ``matplotlib.use("Agg")``: in a Jupyter notebook (inline backend) a
    TrainingDiagnostics callback switched the whole process's pyplot to Agg (matplotlib.get_backend() "Agg"), and
    later ``plt.show()`` displayed nothing (nbaudit). It now draws on its own Agg canvas."""
    import matplotlib
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    plt.switch_backend("svg")  # a backend other than Agg, as the notebook's inline one
    try:
        figure = plt.figure()
        record = {"step": 1, "band_nmse": [0.1, 0.2], "weight_change": 0.01, "ntk_distance": 0.02,
                  "linearization_error": 0.03, "regime": "lazy"}
        document = {"num_bands": 2, "probe_split": "train", "history": [record, {"step": 1, "val_band_nmse": [0.1, 0.3]}]}
        plot_diagnostics(document, tmp_path / "diagnostics.png")
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == [figure.number]
        assert (tmp_path / "diagnostics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        plt.close("all")
        plt.switch_backend(backend)
