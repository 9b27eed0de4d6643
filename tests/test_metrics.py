"""reconkit.metrics against the oracle: fastmri.evaluate (NMSE, PSNR, SSIM) and fastmri.losses.SSIMLoss."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from fastmri import evaluate as fm_evaluate
from fastmri.losses import SSIMLoss as FastmriSSIMLoss
from scipy.ndimage import gaussian_filter

from reconkit.metrics import MetricTable, SSIMLoss, band_nmse, nmse, psnr, psnr_torch, ssim, ssim_torch, volume_metrics

SIZES = [(3, 32, 32), (2, 41, 27), (4, 64, 48), (1, 7, 9)]


def smooth_volume(shape: tuple[int, ...], seed: int, sigma: float = 2.0) -> np.ndarray:
    """Non-negative smooth random magnitude volume (like an MR magnitude image), float32."""
    rng = np.random.default_rng(seed)
    vol = np.abs(gaussian_filter(rng.standard_normal(shape), sigma=(0, sigma, sigma)))
    return (vol / vol.max() * 1e-4).astype(np.float32)  # fastMRI-like scale


def degraded(gt: np.ndarray, seed: int, noise: float) -> np.ndarray:
    """A blurred, noisy reconstruction of ``gt``."""
    rng = np.random.default_rng(seed)
    blurred = gaussian_filter(gt, sigma=(0, 0.8, 0.8))
    return (blurred + noise * gt.max() * rng.standard_normal(gt.shape)).astype(np.float32)


@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("noise", [0.01, 0.1])
def test_volume_metrics_equal_fastmri(shape, noise):
    gt = smooth_volume(shape, seed=1)
    pred = degraded(gt, seed=2, noise=noise)
    assert nmse(gt, pred) == pytest.approx(float(fm_evaluate.nmse(gt, pred)), rel=1e-6)
    assert psnr(gt, pred) == pytest.approx(float(fm_evaluate.psnr(gt, pred)), abs=1e-6)
    assert ssim(gt, pred) == pytest.approx(float(fm_evaluate.ssim(gt, pred)[0]), abs=1e-6)
    maxval = float(gt.max()) * 1.3
    assert psnr(gt, pred, maxval) == pytest.approx(float(fm_evaluate.psnr(gt, pred, maxval)), abs=1e-6)
    assert ssim(gt, pred, maxval) == pytest.approx(float(fm_evaluate.ssim(gt, pred, maxval)[0]), abs=1e-6)


@pytest.mark.parametrize("scale", [1e-6, 1e4])
def test_volume_ssim_equals_fastmri_at_any_intensity_scale(scale):
    """The volume SSIM's local means are differences of running sums, whose rounding grows with the row's total:
    on an object in a zero background at raw-k-space-like scales it must still be fastmri's number (whose own
    value moves by 2e-9 relative between these two scales; ours does not)."""
    gt = np.zeros((2, 96, 80))
    gt[:, 20:76, 16:64] = smooth_volume((2, 56, 48), seed=9)
    gt *= scale
    pred = gt + 0.05 * scale * np.random.default_rng(10).standard_normal(gt.shape) * (gt > 0)
    assert ssim(gt, pred) == pytest.approx(float(fm_evaluate.ssim(gt, pred)[0]), rel=1e-8)  # fastmri: 2e-9 apart


def test_metrics_order_better_reconstructions():
    gt = smooth_volume((2, 48, 40), seed=3)
    good, bad = degraded(gt, 4, noise=0.01), degraded(gt, 4, noise=0.2)
    assert nmse(gt, good) < nmse(gt, bad)
    assert psnr(gt, good) > psnr(gt, bad)
    assert ssim(gt, good) > ssim(gt, bad)
    assert ssim(gt, gt) == pytest.approx(1.0, abs=1e-12)
    assert nmse(gt, gt) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's divide-by-zero RuntimeWarning reached `reconkit evaluate`'s output
        assert psnr(gt, gt) == np.inf  # fastmri's number, which skimage gives with that warning


def test_metrics_reject_bad_shapes():
    gt = smooth_volume((2, 16, 16), seed=5)
    with pytest.raises(ValueError, match="shape"):
        nmse(gt, gt[:, :8])
    with pytest.raises(ValueError, match="dimensions"):
        ssim(gt[0], gt[0])
    with pytest.raises(ValueError, match="window"):
        ssim(gt[:, :5, :5], gt[:, :5, :5])


def test_complex_images_nmse_equals_fastmri_psnr_ssim_refuse_them():
    """A float64 cast kept the real parts of complex images alone, with only numpy's ComplexWarning: NMSE differed
    from fastmri's (which takes |error|), PSNR / SSIM (which fastmri refuses for complex input) gave a number."""
    rng = np.random.default_rng(7)
    gt = smooth_volume((2, 16, 16), seed=6) * np.exp(1j * rng.uniform(0, 2 * np.pi, (2, 16, 16)))
    pred = gt + 1e-5 * (rng.standard_normal(gt.shape) + 1j * rng.standard_normal(gt.shape))
    assert nmse(gt, pred) == pytest.approx(float(fm_evaluate.nmse(gt, pred)), rel=1e-12)
    for metric in (psnr, ssim):
        with pytest.raises(ValueError, match="complex images; pass magnitudes"):
            metric(gt, pred)


def test_torch_metrics_refuse_complex_images():
    """psnr_torch, ssim_torch and SSIMLoss returned complex numbers for complex images, band_nmse scored their real
    parts alone (with torch's cast warning)."""
    gt = torch.randn(2, 16, 16, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    calls = [("psnr_torch", lambda: psnr_torch(gt, 1.1 * gt, maxval=1.0)),
             ("ssim", lambda: ssim_torch(gt, 1.1 * gt, maxval=1.0)),
             ("ssim", lambda: SSIMLoss()(gt[:, None], 1.1 * gt[:, None], torch.ones(2))),
             ("band_energies", lambda: band_nmse(1.1 * gt, gt, num_bands=2))]
    for name, call in calls:
        with pytest.raises(ValueError, match=f"{name}: complex images; pass magnitudes"):
            call()


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (3, 1, 37, 29)])
def test_ssim_loss_equals_fastmri_and_gradients(shape):
    gen = torch.Generator().manual_seed(0)
    target = torch.from_numpy(smooth_volume((shape[0],) + shape[2:], seed=6)).unsqueeze(1)
    output = (target + 1e-5 * torch.randn(shape, generator=gen)).requires_grad_(True)
    data_range = target.flatten(1).amax(dim=1)
    ours, theirs = SSIMLoss(), FastmriSSIMLoss()
    loss = ours(output, target, data_range)
    torch.testing.assert_close(loss, theirs(output, target, data_range), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        ours(output, target, data_range, reduced=False), theirs(output, target, data_range, reduced=False)
    )
    (grad,) = torch.autograd.grad(loss, output)
    (grad_ref,) = torch.autograd.grad(theirs(output, target, data_range), output)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5 * grad_ref.abs().max().item())
    assert ours.state_dict().keys() == theirs.state_dict().keys()  # checkpoints holding the loss stay loadable


def test_ssim_loss_other_window():
    x = torch.rand(2, 1, 24, 24, generator=torch.Generator().manual_seed(1))
    y = x.flip(-1)
    data_range = torch.ones(2)
    for win_size, k1, k2 in [(5, 0.01, 0.03), (9, 0.02, 0.05)]:
        torch.testing.assert_close(
            SSIMLoss(win_size, k1, k2)(x, y, data_range), FastmriSSIMLoss(win_size, k1, k2)(x, y, data_range)
        )


def test_ssim_loss_and_batch_ssim_stay_float32_under_bf16_autocast_and_for_bf16_images():
    """Under autocast (--trainer.precision bf16-mixed) the window convolutions ran in bfloat16: E[x²] − E[x]²
    cancelled to noise, SSIM came out above 1 and the SSIM loss negative (-0.02 here instead of 0.006); bfloat16
    images (a U-Net's output under autocast) met the float32 window: a dtype error. Under float16 autocast the
    squares of raw-scale images underflowed: a loss of 0."""
    gen = torch.Generator().manual_seed(3)
    target = 1 + 0.3 * torch.rand(2, 1, 32, 32, generator=gen)  # an offset, as the bright tissue of an MR image
    output = target + 0.01 * torch.randn(target.shape, generator=gen)
    data_range = target.flatten(1).amax(dim=1)
    expected_loss = SSIMLoss()(output, target, data_range)
    expected_ssim = ssim_torch(target[:, 0], output[:, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = SSIMLoss()(output, target, data_range)
        batch_ssim = ssim_torch(target[:, 0], output[:, 0])
    assert loss.dtype == batch_ssim.dtype == torch.float32
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(batch_ssim, expected_ssim, rtol=1e-6, atol=1e-7)
    rounded = output.bfloat16()
    torch.testing.assert_close(SSIMLoss()(rounded, target, data_range),
                               SSIMLoss()(rounded.float(), target, data_range), rtol=1e-6, atol=1e-7)
    # float16 autocast (16-mixed on a GPU) at fastMRI's raw scale: the squares (~1e-9) underflowed, the loss was 0
    raw = 1e-4
    with torch.autocast("cpu", dtype=torch.float16):
        loss = SSIMLoss()(output * raw, target * raw, data_range * raw)
    torch.testing.assert_close(loss, SSIMLoss()(output * raw, target * raw, data_range * raw), rtol=1e-5, atol=1e-7)


def test_ssim_loss_cast_to_bfloat16_keeps_an_exact_window():
    """Under --trainer.precision bf16-true (a U-Net with data.transform unet and loss ssim) Lightning casts the loss's
    window buffer to bfloat16: 1/49 rounded made a window summing to 0.9989, and the variances E[x²] − E[x]² of a
    bright region took that error: the loss came out 16 % low (0.00514 instead of 0.00610 here)."""
    gen = torch.Generator().manual_seed(3)
    target = 1 + 0.3 * torch.rand(2, 1, 32, 32, generator=gen)
    output = target + 0.01 * torch.randn(target.shape, generator=gen)
    data_range = target.flatten(1).amax(dim=1)
    torch.testing.assert_close(SSIMLoss().bfloat16()(output, target, data_range),
                               SSIMLoss()(output, target, data_range), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("win_size", [1, 0, -3, 2.5])
def test_ssim_window_sizes_that_cannot_work_are_refused(win_size):
    """win_size 1 was a ZeroDivisionError (the covariances divide by w² − 1), 0 a shape RuntimeError or (SSIMLoss)
    ZeroDivisionError, -3 gave ssim 1.0 for any two volumes, 2.5 an AttributeError or TypeError."""
    x = np.random.default_rng(0).random((2, 16, 16))
    for call in (lambda: ssim(x, 0.5 * x, win_size=win_size), lambda: SSIMLoss(win_size),
                 lambda: ssim_torch(torch.from_numpy(x), torch.from_numpy(0.5 * x), win_size=win_size)):
        with pytest.raises(ValueError, match=rf"ssim win_size must be an integer >= 2, got {win_size}"):
            call()


def test_batch_metrics_match_volume_metrics():
    gt = smooth_volume((3, 40, 36), seed=7)
    pred = degraded(gt, seed=8, noise=0.05)
    maxval = float(gt.max())
    gt_t, pred_t = torch.from_numpy(gt).double(), torch.from_numpy(pred).double()
    per_slice_ssim = ssim_torch(gt_t, pred_t, maxval)
    assert per_slice_ssim.shape == (3,)
    assert per_slice_ssim.mean().item() == pytest.approx(float(fm_evaluate.ssim(gt, pred)[0]), abs=1e-6)
    per_slice_psnr = psnr_torch(gt_t, pred_t, maxval)
    for i in range(3):
        assert per_slice_psnr[i].item() == pytest.approx(psnr(gt[i : i + 1], pred[i : i + 1], maxval), abs=1e-6)
    # default peak is each image's own maximum
    own_peak = psnr_torch(gt_t, pred_t)
    assert own_peak[0].item() == pytest.approx(psnr(gt[:1], pred[:1]), abs=1e-6)
    # float32 on the batch path stays close to the float64 reference
    assert ssim_torch(gt_t.float(), pred_t.float(), maxval).mean().item() == pytest.approx(
        per_slice_ssim.mean().item(), abs=1e-4
    )


def test_batch_metrics_take_one_peak_per_image_in_any_shape_and_refuse_other_counts():
    """A ``(B, 1)`` peak (or ``(B, 1, 1)`` from ``amax(keepdim=True)``) failed in ``expand`` with a RuntimeError."""
    gt = torch.from_numpy(smooth_volume((2, 16, 16), seed=9))
    pred = torch.from_numpy(degraded(gt.numpy(), seed=10, noise=0.05))
    peaks = torch.tensor([1.0, 2.0], dtype=gt.dtype)
    for metric in (psnr_torch, ssim_torch):
        expected = metric(gt, pred, peaks)
        for shaped in (peaks[:, None], peaks[:, None, None], peaks.numpy()):
            torch.testing.assert_close(metric(gt, pred, shaped), expected)
        with pytest.raises(ValueError, match=rf"{metric.__name__}: maxval must be a scalar or one value per image "
                                             r"\(2\); got shape \(3,\)"):
            metric(gt, pred, torch.ones(3))


def test_metric_table_aggregates_volumes():
    table = MetricTable()
    gts = [smooth_volume((2, 24, 24), seed=s) for s in (10, 11, 12)]
    for i, gt in enumerate(gts):
        table.add(f"file{i}", volume_metrics(gt, degraded(gt, seed=20 + i, noise=0.05)))
    summary = table.summary()
    psnrs = [table.rows[f"file{i}"]["PSNR"] for i in range(3)]
    assert summary["PSNR"][0] == pytest.approx(np.mean(psnrs))
    assert summary["PSNR"][1] == pytest.approx(np.std(psnrs, ddof=1))
    assert set(summary) == {"NMSE", "PSNR", "SSIM"}
    assert "3 volumes" in table.format()


def test_metric_table_counts_the_volumes_of_each_metric():
    """``format`` printed the count of all rows on every line: a metric two of three volumes have read
    "(3 volumes)", though its mean and std (``summary``) are over those two (docaudit)."""
    table = MetricTable()
    table.add("file0", {"PSNR": 30.0, "SSIM": 0.8})
    table.add("file1", {"PSNR": 32.0, "SSIM": 0.9})
    table.add("file2", {"PSNR": 34.0})
    assert table.format().splitlines() == ["PSNR = 32 +/- 2 (3 volumes)", "SSIM = 0.85 +/- 0.07071 (2 volumes)"]


def _ssim_under_memory_limit(gt: np.ndarray, pred: np.ndarray, extra_bytes: int) -> float | str:
    """:func:`ssim` in a forked child whose address space may grow by at most ``extra_bytes``: the value, or the
    error's type name when it ran out."""
    import multiprocessing
    import resource

    def child(queue) -> None:
        # one thread: a second one's stack and malloc arena (64 MiB of address space) would count against the limit
        torch.set_num_threads(1)
        with open("/proc/self/statm") as f:
            virtual = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (virtual + extra_bytes, resource.getrlimit(resource.RLIMIT_AS)[1]))
        try:
            queue.put(ssim(gt, pred))
        except (MemoryError, RuntimeError) as err:  # torch reports a failed allocation as RuntimeError
            queue.put(type(err).__name__)

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    process.join(timeout=60)
    return queue.get(timeout=1) if process.exitcode == 0 else f"child exit code {process.exitcode}"


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="address-space limit via /proc")
def test_volume_ssim_memory_is_one_slice_not_the_volume():
    """fastMRI scores a volume slice by slice; computing all slices at once held float64 convolution buffers of
    ~100× the volume (2.8 GB for 64 slices of 320 × 320): 16 slices of 160 × 160 stay within 64 MB, as one does."""
    rng = np.random.default_rng(0)
    gt = rng.random((16, 160, 160))
    pred = gt + 0.1 * rng.random(gt.shape)
    expected = np.mean([fm_evaluate.ssim(gt[s : s + 1], pred[s : s + 1], maxval=gt.max()) for s in range(16)])
    assert _ssim_under_memory_limit(gt, pred, 64 * 2**20) == pytest.approx(expected, abs=1e-10)
