"""Per-volume metrics from per-slice statistics equal fastmri.evaluate on the stacked volume (the oracle)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fastmri import evaluate

from reconkit.training.volume_metrics import gather_slice_stats, mean_over_volumes, slice_stats, volume_metrics


def _volume(rng: np.random.Generator, slices: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    target = rng.random((slices, h, w)).astype(np.float32) + 0.1
    output = (target + 0.05 * rng.standard_normal(target.shape)).astype(np.float32)
    return target, output


def test_volume_metrics_equal_fastmri_evaluate_on_odd_sizes():
    rng = np.random.default_rng(0)
    volumes = {"a.h5": _volume(rng, 3, 17, 13), "b.h5": _volume(rng, 2, 11, 15)}
    records = []
    for fname, (target, output) in volumes.items():
        for s in range(target.shape[0]):
            records.append(slice_stats(torch.from_numpy(output[s]), torch.from_numpy(target[s]),
                                       float(target.max()), fname, s))
    per_volume = volume_metrics(records)
    for fname, (target, output) in volumes.items():
        maxval = float(target.max())
        assert per_volume[fname]["num_slices"] == target.shape[0]
        assert per_volume[fname]["nmse"] == pytest.approx(evaluate.nmse(target, output), rel=1e-5)
        assert per_volume[fname]["psnr"] == pytest.approx(evaluate.psnr(target, output, maxval=maxval), rel=1e-5)
        assert per_volume[fname]["ssim"] == pytest.approx(evaluate.ssim(target, output, maxval=maxval), rel=1e-5)
    mean = mean_over_volumes(per_volume)
    assert mean["ssim"] == pytest.approx(np.mean([v["ssim"] for v in per_volume.values()]))


def test_volume_split_into_shuffled_parts_gives_same_metrics():
    """Slices of one volume arriving in any order and with duplicates (DDP padding) give the same numbers."""
    rng = np.random.default_rng(1)
    target, output = _volume(rng, 5, 9, 9)
    records = [slice_stats(torch.from_numpy(output[s]), torch.from_numpy(target[s]), float(target.max()), "v", s)
               for s in range(5)]
    shuffled = [records[i] for i in (3, 0, 4, 1, 2, 0)]  # slice 0 twice, as a padded DistributedSampler does
    deduped = gather_slice_stats(shuffled)  # no process group: just de-duplication and ordering
    assert [r.slice_num for r in deduped] == [0, 1, 2, 3, 4]
    assert volume_metrics(deduped) == volume_metrics(records)
    assert volume_metrics(records[:4])["v"]["ssim"] != volume_metrics(records)["v"]["ssim"]


def test_slice_stats_rejects_uncropped_output():
    with pytest.raises(ValueError, match="crop the output"):
        slice_stats(torch.zeros(8, 6), torch.zeros(6, 6), 1.0, "file1.h5", 0)


def test_empty_evaluation_gives_nan_not_a_number_from_nowhere():
    assert all(math.isnan(v) for v in mean_over_volumes({}).values())


class _MpsLikeTensor(torch.Tensor):
    """Emulates an Apple-silicon MPS tensor: float64 is refused on the device (as MPS's own error), the CPU copy is
    a plain tensor."""

    def double(self, *args, **kwargs):
        raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64")

    def cpu(self, *args, **kwargs):
        return super().cpu(*args, **kwargs).as_subclass(torch.Tensor)


def test_slice_stats_of_a_tensor_on_a_device_without_float64():
    """Validation converted each slice to float64 on its device before copying it to the CPU: with Lightning's
    ``accelerator: auto`` on an Apple-silicon Mac (MPS, no float64) every validation step failed."""
    rng = np.random.default_rng(3)
    target = torch.from_numpy(rng.random((8, 8), dtype=np.float32))
    output = target + 0.01
    stats = slice_stats(output.as_subclass(_MpsLikeTensor), target.as_subclass(_MpsLikeTensor), 1.0, "a.h5", 0)
    assert stats == slice_stats(output, target, 1.0, "a.h5", 0)
