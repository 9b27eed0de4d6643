"""SSDU self-supervision: Θ/Λ splits (reconkit.data.ssdu), the k-space loss and the Lightning module
(reconkit.training.self_supervised), and the YAML config end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from reconkit.data.simulate import simulate_dataset
from reconkit.data.ssdu import SsduSample, SsduVarNetTransform, acs_region, ssdu_split
from reconkit.data.transforms import to_tensor
from reconkit.errors import ConfigError
from reconkit.models import VarNet
from reconkit.training import VarNetModule
from reconkit.training.cli import run_cli
from reconkit.training.self_supervised import SsduVarNetModule, normalized_l1_l2_loss, ssdu_loss

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"num_cascades": 1, "chans": 2, "pools": 1, "sens_chans": 2, "sens_pools": 1}


def line_mask(width: int, acs: int, every: int) -> tuple[np.ndarray, np.ndarray]:
    lines = np.zeros(width, dtype=bool)
    lines[::every] = True
    start = (width - acs + 1) // 2
    lines[start:start + acs] = True
    return lines, acs_region(lines[None], acs)[0]


@pytest.mark.parametrize("selection", ["uniform", "gaussian"])
@pytest.mark.parametrize("shape,rho", [((32, 24), 0.4), ((33, 27), 0.25), ((20, 15), 0.3)])
def test_split_is_a_disjoint_cover_with_acs_in_theta_and_the_asked_ratio(selection, shape, rho):
    lines, acs = line_mask(shape[1], acs=4, every=3)
    acquired = np.broadcast_to(lines, shape)
    theta, lam = ssdu_split(acquired, acs, rho, selection, np.random.default_rng(0))
    assert theta.shape == lam.shape == shape
    assert not (theta & lam).any()
    assert np.array_equal(theta | lam, acquired)
    assert theta[:, acs].all() and not lam[:, acs].any()
    assert lam.sum() == math.ceil(rho * acquired.sum())
    assert lam.any(axis=0).sum() > 1  # points from several lines, not whole lines


def test_gaussian_selection_prefers_the_centre_and_splits_are_seeded():
    lines, acs = line_mask(64, acs=4, every=2)
    acquired = np.broadcast_to(lines, (64, 64))
    counts = {}
    for selection in ("uniform", "gaussian"):
        _, lam = ssdu_split(acquired, acs, 0.4, selection, np.random.default_rng(1))
        rows = np.abs(np.arange(64) - 32)
        counts[selection] = lam[rows < 16].sum() / lam.sum()
    assert counts["gaussian"] > counts["uniform"] + 0.1
    a = ssdu_split(acquired, acs, 0.4, "gaussian", np.random.default_rng(5))
    b = ssdu_split(acquired, acs, 0.4, "gaussian", np.random.default_rng(5))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_ratio_capped_by_the_points_outside_the_acs_and_bad_arguments():
    lines, acs = line_mask(8, acs=6, every=8)  # 7 acquired lines, 6 of them ACS
    theta, lam = ssdu_split(np.broadcast_to(lines, (4, 8)), acs, 0.9, "uniform", np.random.default_rng(0))
    assert lam.sum() == 4 and theta[:, acs].all()
    with pytest.raises(ValueError, match="rho"):
        ssdu_split(np.ones((4, 4), bool), np.zeros(4, bool), rho=1.0)
    with pytest.raises(ValueError, match="selection"):
        ssdu_split(np.ones((4, 4), bool), np.zeros(4, bool), selection="poisson")
    with pytest.raises(ValueError, match="num_splits"):
        SsduVarNetTransform(num_splits=0)
    # a Gaussian std_scale of 0 was a ZeroDivisionError at the first sample, NaN numpy's "probabilities contain NaN"
    for std_scale in (0.0, math.nan, -4.0):
        with pytest.raises(ValueError, match=rf"SSDU std_scale must be a finite number > 0, got {std_scale}"):
            SsduVarNetTransform(selection="gaussian", std_scale=std_scale)
        with pytest.raises(ValueError, match=rf"SSDU std_scale must be a finite number > 0, got {std_scale}"):
            ssdu_split(np.ones((4, 4), bool), np.zeros(4, bool), selection="gaussian", std_scale=std_scale)


def fake_slice(coils: int = 3, height: int = 24, width: int = 33, seed: int = 0):
    rng = np.random.default_rng(seed)
    kspace = (rng.standard_normal((coils, height, width)) + 1j * rng.standard_normal((coils, height, width)))
    target = rng.random((12, 12)).astype(np.float32)
    attrs = {"padding_left": 1, "padding_right": width - 1, "recon_size": (12, 12, 1), "max": 1.0}
    return kspace.astype(np.complex64), None, target, attrs, "vol_b.h5", 2


def test_transform_multi_mask_splits_cover_the_acquired_data_and_drop_the_target():
    kspace, mask, target, attrs, fname, slice_num = fake_slice()
    transform = SsduVarNetTransform(accelerations=[4], center_fractions=[0.125], num_splits=3, rho=0.4, seed=1)
    sample = transform(kspace, mask, target, attrs, fname, slice_num)
    assert isinstance(sample, SsduSample) and not hasattr(sample, "target")
    height, width = kspace.shape[-2:]
    assert sample.theta_mask.shape == sample.lambda_mask.shape == (3, 1, height, width, 1)
    acquired_lines = (sample.masked_kspace.abs().sum(dim=(0, 1, 3)) > 0).float()  # (W,) acquired columns
    union = sample.theta_mask + sample.lambda_mask
    assert union.max() == 1  # disjoint
    for k in range(3):
        assert torch.equal(union[k, 0, :, :, 0], acquired_lines.expand(height, width))
    assert not torch.equal(sample.lambda_mask[0], sample.lambda_mask[1])  # K different splits
    acs = acs_region(acquired_lines.numpy().astype(bool)[None], sample.num_low_frequencies)[0]
    assert acs.sum() == sample.num_low_frequencies > 0
    assert sample.theta_mask[:, 0, :, torch.from_numpy(acs), 0].min() == 1
    torch.testing.assert_close(sample.masked_kspace, to_tensor(kspace) * acquired_lines.view(1, 1, -1, 1),
                               rtol=0, atol=0)
    # the sample is the same with the true target, with garbage, or with none: the target never gets in
    for other in (None, np.full_like(target, np.nan)):
        again = transform(kspace, mask, other, attrs, fname, slice_num)
        assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(sample, again))
    transform.set_epoch(1)
    assert not torch.equal(transform(kspace, mask, target, attrs, fname, slice_num).lambda_mask, sample.lambda_mask)


def test_a_stored_mask_is_the_acquisition_that_is_split():
    """An undersampled scan (k-space zero off its stored mask, as fastMRI's test files): Θ ∪ Λ is the stored
    mask's lines, no second mask is drawn over them, and the ACS measured from the stored lines stays in Θ."""
    kspace, _, target, attrs, fname, slice_num = fake_slice(width=33)
    stored = np.zeros(33, dtype=bool)
    stored[::3] = stored[14:20] = True  # ACS of 6 lines around column 16
    kspace = kspace * stored
    transform = SsduVarNetTransform(accelerations=[8], center_fractions=[0.04], num_splits=2, rho=0.4)
    sample = transform(kspace, stored.astype(np.float32), target, attrs, fname, slice_num)
    acquired = stored.copy()
    acquired[:1] = acquired[32:] = False  # outside the padding
    union = (sample.theta_mask + sample.lambda_mask)[:, 0, :, :, 0]
    assert torch.equal(union, torch.from_numpy(np.broadcast_to(acquired, union.shape).astype(np.float32)))
    torch.testing.assert_close(sample.masked_kspace, to_tensor(kspace), rtol=0, atol=0)
    # the ACS width as the VarNet's sensitivity model measures it (twice the shorter run out from column 16)
    assert sample.num_low_frequencies == 4 and sample.theta_mask[..., 15:19, 0].min() == 1


def test_acs_of_a_2d_mask_is_its_centre_block_and_stays_in_theta():
    kspace, _, target, attrs, fname, slice_num = fake_slice(height=32, width=32)
    attrs = {**attrs, "padding_left": 0, "padding_right": 32}
    transform = SsduVarNetTransform(mask_type="variable_density", center_fractions=[0.125], accelerations=[4],
                                    rho=0.4, num_splits=3)
    sample = transform(kspace, None, target, attrs, fname, slice_num)
    acquired = (sample.theta_mask + sample.lambda_mask)[0, 0, :, :, 0].bool().numpy()
    assert not acquired.all(axis=0).any()  # a 2D mask: no column is fully acquired
    centre = np.zeros((32, 32), dtype=bool)
    centre[14:18, 14:18] = True  # the 4 x 4 centre block (0.125 x 32)
    acs = acs_region(acquired, 4)  # the block's columns, over the rows around the centre that hold them all
    assert sample.num_low_frequencies == 4 and (acs >= centre).all() and (acs <= acquired).all()
    assert acs[:, :14].sum() == acs[:, 18:].sum() == 0 and acs[14:18].all(axis=0).sum() == 4
    assert sample.lambda_mask[:, 0, 14:18, 14:18, 0].max() == 0 and sample.theta_mask[:, 0, 14:18, 14:18, 0].min() == 1


def test_normalized_l1_l2_loss_values():
    reference = torch.tensor([[3.0, -4.0, 0.0]])
    assert normalized_l1_l2_loss(reference, reference) == 0
    prediction = torch.tensor([[0.0, 0.0, 0.0]])
    assert normalized_l1_l2_loss(prediction, reference) == pytest.approx(2.0)
    prediction = torch.tensor([[3.0, -4.0, 5.0]])
    assert normalized_l1_l2_loss(prediction, reference) == pytest.approx(5 / 5 + 5 / 7)


def test_predict_kspace_is_what_varnet_forward_takes_the_rss_of():
    torch.manual_seed(0)
    model = VarNet(**TINY_MODEL).eval()
    mask = torch.zeros(1, 1, 1, 20, 1)
    mask[..., ::3, :] = 1
    mask[..., 8:12, :] = 1
    kspace = torch.randn(1, 3, 16, 20, 2) * mask
    from reconkit.ops import ifft2c, rss_complex

    with torch.no_grad():
        torch.testing.assert_close(rss_complex(ifft2c(model.predict_kspace(kspace, mask)), dim=1), model(kspace, mask))


def test_ssdu_loss_reads_only_undersampled_data_and_trains():
    kspace, mask, target, attrs, fname, slice_num = fake_slice(seed=3)
    transform = SsduVarNetTransform(accelerations=[4], center_fractions=[0.125], num_splits=2)
    batch = default_collate([transform(kspace, mask, target, attrs, fname, slice_num),
                             transform(*fake_slice(seed=4)[:4], "vol_c.h5", 0)])
    module = SsduVarNetModule(**TINY_MODEL, lr=1e-2)
    loss = module.training_step(batch, 0)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert all(p.grad is not None for p in module.model.parameters() if p.requires_grad)
    # the loss compares against the acquired Λ samples: the network input (k-space · Θ) is unchanged when they
    # change, yet the loss moves
    with torch.no_grad():
        base = ssdu_loss(module.model, batch)
        moved = batch._replace(masked_kspace=batch.masked_kspace * (1 + batch.lambda_mask[:, 0]))
        assert not torch.isclose(ssdu_loss(module.model, moved), base)
    with pytest.raises(ConfigError, match="set data.train_transform to reconkit.data.ssdu.SsduVarNetTransform"):
        module.training_step(batch._asdict(), 0)
    with pytest.raises(ConfigError, match="train it with --model reconkit.training.SsduVarNetModule"):
        VarNetModule(**TINY_MODEL).training_step(batch, 0)  # the reverse pairing


def test_ssdu_loss_runs_single_coil_slices_as_one_coil_each():
    """Single-coil batches (``(B, H, W, 2)`` k-space): each slice and split runs as one coil, so a batch's loss is
    the mean of its slices' losses (``kspace · Θ`` broadcast the batch into the coil axis: slices mixed as coils)."""
    transform = SsduVarNetTransform(accelerations=[4], center_fractions=[0.125], num_splits=2)
    samples = []
    for seed, fname in ((3, "vol_a.h5"), (4, "vol_c.h5")):
        kspace, mask, target, attrs, _, slice_num = fake_slice(coils=1, seed=seed)
        samples.append(transform(kspace[0], mask, target, attrs, fname, slice_num))
    assert samples[0].masked_kspace.ndim == 3
    torch.manual_seed(0)
    model = VarNet(**TINY_MODEL)
    calls = []
    predict = model.predict_kspace
    model.predict_kspace = lambda kspace, *args: calls.append(tuple(kspace.shape)) or predict(kspace, *args)
    with torch.no_grad():
        both = ssdu_loss(model, default_collate(samples))
        each = [ssdu_loss(model, default_collate([sample])) for sample in samples]
    height, width = samples[0].masked_kspace.shape[:2]
    assert calls[0] == (4, 1, height, width, 2)  # B · K = 4 one-coil inputs
    torch.testing.assert_close(both, (each[0] + each[1]) / 2)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssdu_data")
    simulate_dataset(root, num_volumes=3, coils=3, slices=2, encoded_size=(48, 36), recon_size=(24, 24),
                     split=(2, 1, 0), seed=2, progress=False)
    return root


def test_ssdu_config_trains_without_targets_and_validates_per_volume(tiny_data, tmp_path):
    args = ["fit", "--config", str(ROOT / "configs" / "varnet_sim_small_ssdu.yaml"),
            "--data.data_path", str(tiny_data), "--data.num_workers", "0", "--data.fraction", "0.5",
            "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path),
            *[f"--model.{k}={v}" for k, v in TINY_MODEL.items()]]  # fmt: skip
    cli = run_cli(args)
    module = cli.model
    assert isinstance(module, SsduVarNetModule)
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train_loss"]) and 0 < float(metrics["val_ssim"]) <= 1
    assert len(module.last_volume_metrics) == 1  # the one validation volume, fully sampled target
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
