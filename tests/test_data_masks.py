"""Masks: bit-identical to fastmri 0.3.0 for the same seed / shape / parameters; variable-density 2D masks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from fastmri.data import subsample as fastmri_subsample

from reconkit.data import masks

FAMILIES = ["RandomMaskFunc", "EquiSpacedMaskFunc", "EquispacedMaskFractionFunc", "MagicMaskFunc", "MagicMaskFractionFunc"]
PARAMS = [([0.08], [4]), ([0.04], [8]), ([0.08, 0.04], [4, 8]), ([0.1], [3]), ([0.3], [5])]
WIDTHS = [368, 369, 372, 320, 33, 24, 25, 101]
SEEDS = [0, 1, 123, (1, 2, 3), tuple(map(ord, "file1000001.h5"))]
OFFSETS = [None, 0, 1, 3]


def _pair(family, center_fractions, accelerations, **kwargs):
    ours = getattr(masks, family)(center_fractions, accelerations, **kwargs)
    theirs = getattr(fastmri_subsample, family)(center_fractions, accelerations, **kwargs)
    return ours, theirs


def _call_both(ours, theirs, shape, offset, seed):
    """Call both; return (ours_result, theirs_result) where a result is (mask, n) or the raised exception type."""
    results = []
    for func in (ours, theirs):
        try:
            results.append(func(shape, offset, seed))
        except ValueError as err:
            results.append(type(err))
    return results


@pytest.mark.parametrize("family", FAMILIES)
def test_bit_identical_to_fastmri(family):
    compared = 0
    for (center_fractions, accelerations), width, seed, offset in itertools.product(PARAMS, WIDTHS, SEEDS, OFFSETS):
        ours, theirs = _pair(family, center_fractions, accelerations)
        shape = (1, 17, width, 2)
        got, want = _call_both(ours, theirs, shape, offset, seed)
        if not isinstance(want, tuple):
            # fastmri fails when the centre alone reaches W / R; we return the centre-only mask instead
            assert family in ("EquispacedMaskFractionFunc", "MagicMaskFractionFunc"), (width, seed, offset)
            mask, num_low = got
            assert int(mask.sum()) == num_low
            continue
        assert got[0].dtype == want[0].dtype == torch.float32
        assert got[0].shape == want[0].shape == (1, 1, width, 1)
        assert torch.equal(got[0], want[0]), (family, center_fractions, accelerations, width, seed, offset)
        assert got[1] == want[1]
        compared += 1
    assert compared > 500


@pytest.mark.parametrize("family", FAMILIES)
def test_unseeded_calls_follow_the_same_generator_stream(family):
    """Constructor seed, then several calls without seed, with a seeded call in between (state restored)."""
    ours, theirs = _pair(family, [0.08, 0.04], [4, 8], seed=42)
    for width, seed in [(368, None), (369, None), (64, 7), (368, None), (101, None)]:
        (m1, n1), (m2, n2) = ours((1, 8, width, 2), None, seed), theirs((1, 8, width, 2), None, seed)
        assert torch.equal(m1, m2) and n1 == n2


@pytest.mark.parametrize("family", FAMILIES)
def test_any_combination_and_higher_rank_shapes(family):
    ours, theirs = _pair(family, [0.08, 0.04, 0.1], [4, 8], allow_any_combination=True)
    for shape, seed in [((3, 15, 40, 320, 2), 0), ((40, 331, 2), 5), ((1, 1, 1, 64, 2), (9, 9))]:
        (m1, n1), (m2, n2) = ours(shape, None, seed), theirs(shape, None, seed)
        assert m1.shape == m2.shape and torch.equal(m1, m2) and n1 == n2


@pytest.mark.parametrize("family", FAMILIES)
def test_numpy_array_parameters_as_fastmri(family):
    """fastmri takes numpy arrays of centre fractions / accelerations (e.g. from np.linspace or a config loader)."""
    ours, theirs = _pair(family, np.array([0.08, 0.04]), np.array([4, 8]), seed=5)
    for width, seed in [(368, 3), (101, None), (64, (1, 2))]:
        (m1, n1), (m2, n2) = ours((1, 8, width, 2), None, seed), theirs((1, 8, width, 2), None, seed)
        assert torch.equal(m1, m2) and n1 == n2


def test_centre_only_when_centre_reaches_target():
    for family in ("EquispacedMaskFractionFunc", "MagicMaskFractionFunc"):
        mask, num_low = getattr(masks, family)([0.3], [5])((1, 8, 100, 2), seed=0)
        columns = mask.flatten()
        assert int(columns.sum()) == num_low
        sampled = columns.nonzero().flatten()
        assert torch.equal(sampled, torch.arange(sampled[0], sampled[0] + num_low))  # contiguous centre block


def test_create_mask_for_mask_type_matches_fastmri():
    for name in ("random", "equispaced", "equispaced_fraction", "magic", "magic_fraction"):
        ours = masks.create_mask_for_mask_type(name, [0.08], [4])
        theirs = fastmri_subsample.create_mask_for_mask_type(name, [0.08], [4])
        assert type(ours).__name__ == type(theirs).__name__
        (m1, n1), (m2, n2) = ours((1, 640, 372, 2), seed=3), theirs((1, 640, 372, 2), seed=3)
        assert torch.equal(m1, m2) and n1 == n2
    with pytest.raises(ValueError, match="not supported"):
        masks.create_mask_for_mask_type("spiral", [0.08], [4])


def test_bad_arguments():
    with pytest.raises(ValueError, match="should match"):
        masks.RandomMaskFunc([0.08, 0.04], [4])
    with pytest.raises(ValueError, match="center fractions"):
        masks.RandomMaskFunc(np.array([]), np.array([]))
    with pytest.raises(ValueError, match="accelerations must be"):
        masks.RandomMaskFunc([0.08], np.array([0.5]))
    with pytest.raises(ValueError, match="3 or more"):
        masks.RandomMaskFunc([0.08], [4])((368, 2))
    with pytest.raises(ValueError, match="pattern"):
        masks.VariableDensityMaskFunc([0.08], [4], pattern="radial")


@pytest.mark.parametrize("name", sorted(masks.MASK_TYPES))
@pytest.mark.parametrize("acceleration", [float("inf"), float("nan")])
def test_non_finite_acceleration_is_refused(name, acceleration):
    # an infinite acceleration gave a mask of the centre lines only
    with pytest.raises(ValueError, match="accelerations must be at least 1 and finite"):
        masks.create_mask_for_mask_type(name, [0.08], [acceleration])


@pytest.mark.parametrize("pattern", ["gaussian", "poisson"])
@pytest.mark.parametrize("height,width,acceleration", [(64, 48, 4), (45, 33, 6), (32, 96, 8)])
def test_variable_density(pattern, height, width, acceleration):
    func = masks.VariableDensityMaskFunc([0.1], [acceleration], pattern=pattern)
    mask, num_low = func((4, height, width, 2), seed=11)
    assert mask.shape == (1, height, width, 1) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    plane = mask[0, :, :, 0]

    # acceleration: gaussian is exact, poisson within 10 %
    achieved = plane.numel() / plane.sum().item()
    tolerance = 0.01 if pattern == "gaussian" else 0.10
    assert abs(achieved - acceleration) / acceleration <= tolerance, achieved

    # the centre block is fully sampled
    center_h, center_w = max(round(height * 0.1), 1), max(round(width * 0.1), 1)
    top, left = (height - center_h + 1) // 2, (width - center_w + 1) // 2
    assert num_low == center_w
    assert plane[top : top + center_h, left : left + center_w].all()

    # variable density: the inner half (by normalised radius) is sampled more densely than the outer part
    ky = (torch.arange(height) - height // 2) / (height / 2)
    kx = (torch.arange(width) - width // 2) / (width / 2)
    radius = (ky[:, None] ** 2 + kx[None, :] ** 2).sqrt()
    assert plane[radius < 0.5].mean() > 1.5 * plane[radius > 0.8].mean()

    # reproducible by seed, different for another seed, generator state restored after a seeded call
    again, _ = func((4, height, width, 2), seed=11)
    other, _ = func((4, height, width, 2), seed=12)
    assert torch.equal(mask, again)
    assert not torch.equal(mask, other)


def test_variable_density_constructor_seed_and_many_coils_shape():
    first = masks.VariableDensityMaskFunc([0.08], [4], seed=3)((2, 8, 40, 30, 2))[0]
    second = masks.VariableDensityMaskFunc([0.08], [4], seed=3)((2, 8, 40, 30, 2))[0]
    assert first.shape == (1, 1, 40, 30, 1)
    assert torch.equal(first, second)
    mask, _ = masks.create_mask_for_mask_type("variable_density", [0.08], [4])((1, 40, 30, 2), seed=0)
    assert mask.shape == (1, 40, 30, 1)
    assert np.isclose(mask.numel() / mask.sum().item(), 4, rtol=0.01)


class _UnseededMasks(torch.utils.data.Dataset):
    """Eight items, each an unseeded draw of one shared mask function (as a transform with ``use_seed=False``)."""

    def __init__(self):
        self.mask_func = masks.RandomMaskFunc([0.1], [2], seed=7)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.mask_func((1, 8, 64, 2))[0].flatten()


class _SeededInWorker(torch.utils.data.Dataset):
    """Two items, each the first unseeded draw of a mask function made with seed 7 in ``__getitem__``."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> torch.Tensor:
        return masks.RandomMaskFunc([0.1], [2], seed=7)((1, 8, 64, 2))[0].flatten()


def test_unseeded_masks_in_dataloader_workers_differ_by_worker_and_epoch_and_repeat_by_seed():
    # every worker starts from a copy of the main process's generator: without a reseed per worker, worker 1 drew
    # worker 0's masks, and every epoch's new workers drew the first epoch's masks again
    dataset = _UnseededMasks()

    def epochs(seed: int) -> list[list[tuple]]:
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2,
                                             generator=torch.Generator().manual_seed(seed))
        return [[tuple(mask.tolist()) for mask in loader] for _ in range(2)]

    first, second = epochs(0)
    assert len(set(first)) == len(first) and not set(first) & set(second)
    assert epochs(0) == [first, second]  # reproducible: torch's worker seeds follow the loader's generator
    assert epochs(1)[0] != first
    # a function made in the worker keeps its own seed there
    loader = torch.utils.data.DataLoader(_SeededInWorker(), batch_size=None, num_workers=1)
    assert [tuple(mask.tolist()) for mask in loader] == [tuple(_SeededInWorker()[0].tolist())] * 2


def test_seeded_calls_from_several_threads_give_each_seed_its_mask():
    # a seeded call reseeds the shared generator for its draws: another thread's call in between drew from it
    from concurrent.futures import ThreadPoolExecutor

    func = masks.create_mask_for_mask_type("random", [0.08], [4])
    expected = {seed: func((1, 8, 368, 2), seed=seed)[0] for seed in range(20)}
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda seed: (seed, func((1, 8, 368, 2), seed=seed)[0]), list(range(20)) * 20))
    assert all(torch.equal(mask, expected[seed]) for seed, mask in got)


def test_mask_function_pickles_and_copies():
    import copy
    import pickle

    func = masks.RandomMaskFunc([0.08], [4], seed=1)
    for other in (pickle.loads(pickle.dumps(func)), copy.deepcopy(func)):
        assert torch.equal(other((1, 8, 64, 2))[0], copy.deepcopy(func)((1, 8, 64, 2))[0])
        assert torch.equal(other((1, 8, 64, 2), seed=3)[0], func((1, 8, 64, 2), seed=3)[0])


@pytest.mark.parametrize("family", ["random", "equispaced", "equispaced_fraction", "magic", "magic_fraction"])
def test_line_sampling_tells_fastmri_masks_apart_and_measures_their_centre(family):
    """fastmri's own masks at fastMRI knee / brain widths: regular families measure "equispaced", random ones
    "random", never the other; the centre is at least the mask's fully sampled centre."""
    expected = "random" if family == "random" else "equispaced"
    for width, (acceleration, fraction), seed in itertools.product((368, 320), ((4, 0.08), (8, 0.04)), range(10)):
        mask_func = fastmri_subsample.create_mask_for_mask_type(family, [fraction], [acceleration])
        mask, num_low = mask_func((1, 640, width, 2), seed=seed)
        sampling = masks.line_sampling(mask.numpy().reshape(width))
        assert sampling.pattern == expected and sampling.center_lines >= num_low
        assert sampling.acceleration == width / mask.sum().item()


def test_line_sampling_leaves_out_padding_and_images_without_lines():
    """Zero padding outside the acquired columns is neither sampled nor skipped; an image with no line (a slice
    without data) does not count in the mean; too few outer lines name no pattern; no line at all is inf."""
    columns = np.zeros((3, 40))
    columns[0, 10:30:3] = columns[0, 19:22] = 1  # 9 of the 20 acquired columns, 4 through the centre (20)
    columns[1, 10:30:5] = 1  # 4 columns, the centre column alone
    sampling = masks.line_sampling(columns, (10, 30))
    assert sampling == masks.LineSampling(20 / ((9 + 4) / 2), 1, None)
    assert masks.line_sampling(np.zeros(8)) == masks.LineSampling(float("inf"), 0, None)
