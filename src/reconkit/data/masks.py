"""k-space undersampling masks.

Cartesian line masks (:class:`RandomMaskFunc`, :class:`EquiSpacedMaskFunc`, :class:`EquispacedMaskFractionFunc`,
:class:`MagicMaskFunc`, :class:`MagicMaskFractionFunc`) have the constructor and call signature of
``fastmri.data.subsample`` (fastmri 0.3.0) and draw from the random generator in the same order, so the same
seed, shape and parameters give bit-identical masks. :class:`VariableDensityMaskFunc` samples 2D (phase-encode ×
readout, or the two phase-encode axes of a 3D acquisition) with a fully sampled centre.

Every mask function is called as ``mask_func(shape, offset=None, seed=None) -> (mask, num_low_frequencies)``
where ``shape`` is the k-space shape ``(..., H, W, 2)``. Line masks have shape ``(1, ..., 1, W, 1)`` (ones except
the W axis); 2D masks have shape ``(1, ..., H, W, 1)``. Masks are float32 tensors of 0 and 1.

In a ``DataLoader`` worker, the first call without ``seed`` reseeds the generator from the seed torch gives that
worker (which follows the loader's ``generator``, or torch's seed, and changes with every epoch's workers), so
workers do not all draw the main process's stream and each epoch draws new masks; fastmri's generators are copied
unchanged into every worker, which then draw the same masks.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "LINE_MASK_TYPES",
    "MASK_TYPES",
    "EquiSpacedMaskFunc",
    "EquispacedMaskFractionFunc",
    "LineSampling",
    "MagicMaskFractionFunc",
    "MagicMaskFunc",
    "MaskFunc",
    "RandomMaskFunc",
    "VariableDensityMaskFunc",
    "create_mask_for_mask_type",
    "line_sampling",
]

Seed = int | tuple[int, ...] | None


@contextlib.contextmanager
def _seeded(rng: np.random.RandomState, seed: Seed) -> Iterator[None]:
    """Reseed ``rng`` with ``seed`` for the duration of the block, then restore its state (no-op for None)."""
    if seed is None:
        yield
        return
    state = rng.get_state()
    rng.seed(seed)
    try:
        yield
    finally:
        rng.set_state(state)


def _line_mask_tensor(columns: np.ndarray, shape: Sequence[int]) -> torch.Tensor:
    """Reshape a ``(W,)`` column mask to ``(1, ..., 1, W, 1)`` matching k-space ``shape``; float32."""
    mask_shape = [1] * len(shape)
    mask_shape[-2] = shape[-2]
    return torch.from_numpy(columns.reshape(*mask_shape).astype(np.float32))


def _center_columns(num_cols: int, num_low_frequencies: int) -> np.ndarray:
    """``(num_cols,)`` float32 mask with the ``num_low_frequencies`` central columns set (fastmri's placement)."""
    mask = np.zeros(num_cols, dtype=np.float32)
    start = (num_cols - num_low_frequencies + 1) // 2
    mask[start : start + num_low_frequencies] = 1
    return mask


class MaskFunc:
    """Base class: a fully sampled centre of ``center_fraction · W`` columns plus outer columns at ``acceleration``.

    Args:
        center_fractions: fractions of low-frequency columns to keep; one is chosen per call.
        accelerations: undersampling factors, paired with ``center_fractions`` (same length) unless
            ``allow_any_combination`` is True, in which case each is chosen independently.
        allow_any_combination: choose centre fraction and acceleration independently.
        seed: seed of the internal ``np.random.RandomState`` (in ``DataLoader`` workers replaced by the worker's
            seed: module docstring).

    Subclasses implement :meth:`outer_columns`; the random draws happen in the same order as in fastmri. A function
    may be called from several threads: a seeded call gets its seed's mask whatever the other threads draw.

    Raises:
        ValueError: a centre fraction outside ``[0, 1)``, an acceleration below 1 or not finite, an empty list, or
            lists of different lengths without ``allow_any_combination``.
    """

    _worker_seed: int | None = None  # the DataLoader worker seed ``rng`` was last seeded in (None: main process)

    def __init__(
        self,
        center_fractions: Sequence[float],
        accelerations: Sequence[int],
        allow_any_combination: bool = False,
        seed: int | None = None,
    ):
        if len(center_fractions) != len(accelerations) and not allow_any_combination:
            raise ValueError(
                "Number of center fractions should match number of accelerations "
                "if allow_any_combination is False."
            )
        # len(), not truthiness: numpy arrays (which fastmri accepts) have no truth value
        if len(center_fractions) == 0 or not all(0 <= float(f) < 1 for f in center_fractions):
            raise ValueError(f"center fractions must lie in [0, 1) (a share of the k-space columns); got "
                             f"{list(center_fractions)}")
        # 1 <= a < inf: an infinite one gave a mask of the centre lines only (and NaN fails every comparison)
        if len(accelerations) == 0 or not all(1 <= float(a) < math.inf for a in accelerations):
            raise ValueError(f"accelerations must be at least 1 and finite (1 = fully sampled); got "
                             f"{list(accelerations)}")
        self.center_fractions = center_fractions
        self.accelerations = accelerations
        self.allow_any_combination = allow_any_combination
        self.rng = np.random.RandomState()
        self.reseed(seed)  # made in a DataLoader worker: its seed stands there
        self._lock = threading.Lock()  # a call's draws (and its reseed) are not interleaved with another thread's

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __call__(
        self, shape: Sequence[int], offset: int | None = None, seed: Seed = None
    ) -> tuple[torch.Tensor, int]:
        """Sample a mask for k-space of ``shape`` ``(..., H, W, 2)``.

        Args:
            shape: k-space shape, at least 3 dimensions; columns are ``shape[-2]``.
            offset: first sampled outer column (equispaced families); random when None.
            seed: reseeds the generator for this call only (int or tuple of ints), for reproducible masks.

        Returns:
            ``(mask, num_low_frequencies)``: float32 mask of 0/1 with as many axes as ``shape``, all of size 1 but
            the columns, e.g. ``(1, 1, W, 1)`` for multi-coil k-space ``(C, H, W, 2)`` (2D masks:
            ``(1, ..., H, W, 1)``), and the number of fully sampled centre lines.

        Raises:
            ValueError: ``shape`` has fewer than 3 axes.
        """
        if len(shape) < 3:
            raise ValueError("Shape should have 3 or more dimensions")
        worker = torch.utils.data.get_worker_info()
        with self._lock:
            if seed is None and worker is not None and worker.seed != self._worker_seed:
                self.reseed(np.random.SeedSequence(worker.seed).generate_state(4))
            with _seeded(self.rng, seed):
                center, outer, num_low_frequencies = self.sample(shape, offset)
        return torch.max(center, outer), num_low_frequencies

    def reseed(self, seed: Seed | np.ndarray) -> None:
        """Reseed the generator that later calls without ``seed`` draw from (in a ``DataLoader`` worker too: the
        worker's own reseed then does not replace it)."""
        self.rng.seed(seed)
        worker = torch.utils.data.get_worker_info()
        self._worker_seed = None if worker is None else worker.seed

    def choose_acceleration(self) -> tuple[float, int]:
        """Draw one ``(center_fraction, acceleration)`` pair from the configured lists."""
        if self.allow_any_combination:
            return self.rng.choice(self.center_fractions), self.rng.choice(self.accelerations)
        choice = self.rng.randint(len(self.center_fractions))
        return self.center_fractions[choice], self.accelerations[choice]

    def sample(self, shape: Sequence[int], offset: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Return ``(center_mask, outer_mask, num_low_frequencies)`` for k-space ``shape``."""
        num_cols = shape[-2]
        center_fraction, acceleration = self.choose_acceleration()
        num_low_frequencies = round(num_cols * center_fraction)
        center = _line_mask_tensor(_center_columns(num_cols, num_low_frequencies), shape)
        outer = _line_mask_tensor(self.outer_columns(num_cols, acceleration, offset, num_low_frequencies), shape)
        return center, outer, num_low_frequencies

    def outer_columns(
        self, num_cols: int, acceleration: float, offset: int | None, num_low_frequencies: int
    ) -> np.ndarray:
        """``(num_cols,)`` mask of the columns sampled outside the centre."""
        raise NotImplementedError


class RandomMaskFunc(MaskFunc):
    """Outer columns drawn independently with probability ``(W/R − N_low) / (W − N_low)``, so that
    ``W / R`` columns are sampled on average (fastmri's ``RandomMaskFunc``)."""

    def outer_columns(
        self, num_cols: int, acceleration: float, offset: int | None, num_low_frequencies: int
    ) -> np.ndarray:
        prob = (num_cols / acceleration - num_low_frequencies) / (num_cols - num_low_frequencies)
        return self.rng.uniform(size=num_cols) < prob


class EquiSpacedMaskFunc(MaskFunc):
    """Every ``R``-th column from ``offset`` (GRAPPA-style); with the dense centre the true acceleration is
    below ``R`` (fastmri's ``EquiSpacedMaskFunc``)."""

    def outer_columns(
        self, num_cols: int, acceleration: float, offset: int | None, num_low_frequencies: int
    ) -> np.ndarray:
        if offset is None:
            offset = self.rng.randint(0, high=round(acceleration))
        mask = np.zeros(num_cols, dtype=np.float32)
        mask[offset::acceleration] = 1
        return mask


class EquispacedMaskFractionFunc(MaskFunc):
    """Equispaced outer columns at a spacing adjusted for the centre, so the total is ``≈ W / R`` columns
    (fastmri's ``EquispacedMaskFractionFunc``; spacing is rounded, so lines are only nearly equispaced).

    Where the centre alone already has ``≥ W / R`` columns, fastmri fails (zero or negative spacing; with an offset
    too once it has exactly ``W / R``); here the mask is then the centre alone, with or without offset.
    """

    def outer_columns(
        self, num_cols: int, acceleration: float, offset: int | None, num_low_frequencies: int
    ) -> np.ndarray:
        if num_low_frequencies * acceleration >= num_cols:
            return np.zeros(num_cols)
        spacing = (acceleration * (num_low_frequencies - num_cols)) / (num_low_frequencies * acceleration - num_cols)
        if offset is None:
            offset = self.rng.randint(0, high=round(spacing))
        mask = np.zeros(num_cols)
        columns = np.around(np.arange(offset, num_cols - 1, spacing)).astype(np.uint)
        mask[columns] = 1.0
        return mask


class MagicMaskFunc(MaskFunc):
    """Equispaced lines with a different offset on each half of k-space, to exploit conjugate symmetry
    (Defazio 2019, arXiv:1912.01101; fastmri's ``MagicMaskFunc``)."""

    def outer_columns(
        self, num_cols: int, acceleration: float, offset: int | None, num_low_frequencies: int
    ) -> np.ndarray:
        if offset is None:
            offset = self.rng.randint(0, high=acceleration)
        if offset % 2 == 0:
            offset_pos, offset_neg = offset + 1, offset + 2
        else:
            offset_pos, offset_neg = offset + 2, offset - 1
        positive = np.zeros((num_cols + 1) // 2, dtype=np.float32)
        negative = np.zeros(num_cols - (num_cols + 1) // 2, dtype=np.float32)
        positive[offset_pos::acceleration] = 1
        negative[offset_neg::acceleration] = 1
        return np.fft.fftshift(np.concatenate((positive, np.flip(negative))))


class MagicMaskFractionFunc(MagicMaskFunc):
    """Magic mask whose spacing is adjusted so the total is ``round(W / R)`` columns (fastmri's
    ``MagicMaskFractionFunc``). The centre is bounded to ``[1, round(W / R)]`` lines.

    Where the centre alone already reaches ``round(W / R)`` columns, fastmri fails (zero spacing); here the
    mask is then the centre alone.
    """

    def sample(self, shape: Sequence[int], offset: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        num_cols = shape[-2]
        center_fraction, acceleration = self.choose_acceleration()
        target_columns = round(num_cols / acceleration)
        num_low_frequencies = max(min(round(num_cols * center_fraction), target_columns), 1)
        outer_target = target_columns - num_low_frequencies
        center = _line_mask_tensor(_center_columns(num_cols, num_low_frequencies), shape)
        if outer_target > 0:
            outer_columns = self.outer_columns(num_cols, round(num_cols / outer_target), offset, num_low_frequencies)
        else:
            outer_columns = np.zeros(num_cols, dtype=np.float32)
        return center, _line_mask_tensor(outer_columns, shape), num_low_frequencies


class VariableDensityMaskFunc(MaskFunc):
    """2D variable-density sampling over the last two spatial axes ``(H, W)`` with a fully sampled centre.

    Used for 2D undersampling of 3D acquisitions (the two phase-encode axes) or for simulation. The centre is a
    ``round(H · f) × round(W · f)`` block (``f`` = centre fraction); the rest of the ``round(H · W / R)`` samples
    are placed by one of two patterns:

    * ``"gaussian"``: drawn without replacement with probability ∝ ``exp(−r² / (2 σ²))``, ``r`` the distance from
      the centre normalised to 1 at the edge; gives exactly ``round(H · W / R)`` samples (or the centre alone if
      it is bigger).
    * ``"poisson"``: variable-density Poisson disc: points are visited in random order and kept when no kept
      point is closer than ``ρ · (1 + r · density_slope)``; ``ρ`` is tuned so the count is within 5 % of the
      target. Pure Python: about 0.01 s for 45 × 33 and 2–3 s for 640 × 368 on one CPU core, so prefer
      ``"gaussian"`` (under 0.1 s) for masks drawn per sample during training.

    ``offset`` is ignored (there are no equispaced lines).

    Args:
        center_fractions, accelerations, allow_any_combination, seed: as :class:`MaskFunc`.
        pattern: ``"gaussian"`` or ``"poisson"``.
        sigma: Gaussian width (normalised radius units) for ``"gaussian"``.
        density_slope: radial growth of the Poisson-disc distance for ``"poisson"``.

    Calling returns ``(mask, num_low_frequencies)`` with mask shape ``(1, ..., H, W, 1)`` and
    ``num_low_frequencies`` the number of centre *columns* (W axis), as for line masks.
    """

    def __init__(
        self,
        center_fractions: Sequence[float],
        accelerations: Sequence[float],
        allow_any_combination: bool = False,
        seed: int | None = None,
        pattern: str = "gaussian",
        sigma: float = 0.4,
        density_slope: float = 3.0,
    ):
        if pattern not in ("gaussian", "poisson"):
            raise ValueError(f"pattern must be 'gaussian' or 'poisson', got {pattern!r}")
        super().__init__(center_fractions, accelerations, allow_any_combination, seed)
        self.pattern = pattern
        self.sigma = sigma
        self.density_slope = density_slope

    def sample(self, shape: Sequence[int], offset: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        height, width = shape[-3], shape[-2]
        center_fraction, acceleration = self.choose_acceleration()
        center_h = max(round(height * center_fraction), 1)
        center_w = max(round(width * center_fraction), 1)
        center = np.zeros((height, width), dtype=bool)
        top, left = (height - center_h + 1) // 2, (width - center_w + 1) // 2
        center[top : top + center_h, left : left + center_w] = True
        target = round(height * width / acceleration)
        radius = self._normalised_radius(height, width)
        if self.pattern == "gaussian":
            outer = self._gaussian(radius, center, target)
        else:
            outer = self._poisson(radius, center, target)
        mask_shape = [1] * len(shape)
        mask_shape[-3], mask_shape[-2] = height, width

        def as_tensor(m: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(m.astype(np.float32).reshape(mask_shape))

        return as_tensor(center), as_tensor(outer), center_w

    @staticmethod
    def _normalised_radius(height: int, width: int) -> np.ndarray:
        """``(H, W)`` distance from the k-space centre, each axis scaled so the edge is at 1."""
        ky = (np.arange(height) - height // 2) / max(height / 2, 1)
        kx = (np.arange(width) - width // 2) / max(width / 2, 1)
        return np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)

    def _gaussian(self, radius: np.ndarray, center: np.ndarray, target: int) -> np.ndarray:
        outer = np.zeros_like(center)
        count = target - int(center.sum())
        candidates = np.flatnonzero(~center)
        if count <= 0 or candidates.size == 0:
            return outer
        weights = np.exp(-radius.ravel()[candidates] ** 2 / (2 * self.sigma**2))
        chosen = self.rng.choice(candidates, size=min(count, candidates.size), replace=False, p=weights / weights.sum())
        outer.ravel()[chosen] = True
        return outer

    def _poisson(self, radius: np.ndarray, center: np.ndarray, target: int) -> np.ndarray:
        """Poisson-disc points outside ``center``, about ``target − |center|`` of them (within 5 %).

        The count falls roughly as ``1 / ρ²``, so ``ρ`` is updated by ``ρ · sqrt(count / wanted)`` (a few
        iterations), kept inside a bisection bracket so it always converges.
        """
        wanted = target - int(center.sum())
        if wanted <= 0:
            return np.zeros_like(center)
        order = self.rng.permutation(radius.size)
        # random sequential packing of discs with centre distance d holds about 0.7 / d² points per unit area
        rho = float(np.sqrt(0.7 * np.sum((1 + radius[~center] * self.density_slope) ** -2.0) / wanted))
        low, high = 0.0, float(max(radius.shape))
        best = None
        for _ in range(30):
            outer = self._poisson_disc(radius, center, order, rho)
            count = int(outer.sum())
            if best is None or abs(count - wanted) < abs(int(best.sum()) - wanted):
                best = outer
            if abs(count - wanted) <= 0.05 * wanted:
                break
            low, high = (rho, high) if count > wanted else (low, rho)
            proposal = rho * np.sqrt(count / wanted) if count else (low + high) / 2
            rho = proposal if low < proposal < high else (low + high) / 2
        return best

    def _poisson_disc(self, radius: np.ndarray, center: np.ndarray, order: np.ndarray, rho: float) -> np.ndarray:
        """Greedy dart throwing in ``order``: keep a point unless a kept point blocked it; outside ``center``.

        A kept point at normalised radius ``r`` blocks the disc of radius ``ρ · (1 + r · density_slope)`` around it.
        """
        height, width = radius.shape
        blocked = center.copy()
        blocked_flat = blocked.reshape(-1)
        kept = np.zeros_like(center)
        for start in range(0, order.size, 4096):  # drop already-blocked points in bulk, then visit the rest
            chunk = order[start : start + 4096]
            for index in chunk[~blocked_flat[chunk]].tolist():
                if blocked_flat[index]:
                    continue
                y, x = divmod(index, width)
                kept[y, x] = True
                r = rho * (1 + radius[y, x] * self.density_slope)
                reach = int(r)
                y0, y1 = max(y - reach, 0), min(y + reach + 1, height)
                x0, x1 = max(x - reach, 0), min(x + reach + 1, width)
                dy = np.arange(y0, y1)[:, None] - y
                dx = np.arange(x0, x1)[None, :] - x
                blocked[y0:y1, x0:x1] |= dy**2 + dx**2 < r**2
                blocked_flat[index] = True
        return kept


MASK_TYPES = {
    "random": RandomMaskFunc,
    "equispaced": EquiSpacedMaskFunc,
    "equispaced_fraction": EquispacedMaskFractionFunc,
    "magic": MagicMaskFunc,
    "magic_fraction": MagicMaskFractionFunc,
    "variable_density": VariableDensityMaskFunc,
}
LINE_MASK_TYPES = tuple(name for name, family in MASK_TYPES.items() if family is not VariableDensityMaskFunc)
"""The mask families that sample whole k-space columns (Cartesian lines); ``variable_density`` samples 2D points."""


def create_mask_for_mask_type(
    mask_type_str: str, center_fractions: Sequence[float], accelerations: Sequence[int]
) -> MaskFunc:
    """Build a mask function by name: ``random``, ``equispaced``, ``equispaced_fraction``, ``magic``,
    ``magic_fraction`` (as fastmri) or ``variable_density`` (Gaussian 2D).

    Example:
        >>> mask_func = create_mask_for_mask_type("equispaced_fraction", [0.08], [4])
        >>> mask, num_low = mask_func((1, 640, 368, 2), seed=0)
        >>> tuple(mask.shape), num_low
        ((1, 1, 368, 1), 29)
    """
    if mask_type_str not in MASK_TYPES:
        raise ValueError(f"{mask_type_str} not supported; expected one of {sorted(MASK_TYPES)}")
    return MASK_TYPES[mask_type_str](center_fractions, accelerations)


@dataclass(frozen=True)
class LineSampling:
    """How a Cartesian line mask samples k-space, as :func:`line_sampling` measures it.

    Attributes:
        acceleration: acquired columns / sampled columns (with a mask per image, the sampled columns' mean over the
            images that sample any).
        center_lines: the fully sampled centre (ACS): consecutive sampled columns through the k-space centre column
            ``W // 2`` (fastMRI's, and the ISMRMRD header's ``padding_left + center``); the narrowest over the images.
        pattern: ``"equispaced"`` (on each side of the centre the outer lines lie at one spacing, within a column:
            ``equispaced``, ``equispaced_fraction``, ``magic`` masks, a scanner's parallel-imaging lines),
            ``"random"`` (the spacing takes at least three values on each side), or None where that cannot be told
            (fewer than :data:`PATTERN_MIN_GAPS` gaps between outer lines on a side, a few lines missing from a
            regular pattern, images that disagree).
    """

    acceleration: float
    center_lines: int
    pattern: str | None


PATTERN_MIN_GAPS = 4
"""Gaps between outer lines each side of the centre needs before :func:`line_sampling` names a pattern."""


def _side_pattern(outer: np.ndarray) -> str | None:
    """``"equispaced"`` / ``"random"`` / None for the sorted outer column indices on one side of the centre."""
    gaps = np.diff(outer)
    if len(gaps) < PATTERN_MIN_GAPS:
        return None
    if gaps.max() - gaps.min() <= 1:
        return "equispaced"
    return "random" if len(np.unique(gaps)) >= 3 else None


def _center_run(image: np.ndarray, center: int) -> tuple[int, int]:
    """The run ``[start, stop)`` of sampled columns of ``image`` ``(W,)`` bool through column ``center`` (empty, at
    ``center`` clipped to the image, where that column is not sampled)."""
    if not 0 <= center < len(image) or not image[center]:
        center = min(max(center, 0), len(image))
        return center, center
    start, stop = center, center + 1
    while start > 0 and image[start - 1]:
        start -= 1
    while stop < len(image) and image[stop]:
        stop += 1
    return start, stop


def line_sampling(columns: np.ndarray, acquired: tuple[int, int] | None = None) -> LineSampling:
    """Measure a column mask: its acceleration, its fully sampled centre and whether its lines are regular.

    Columns outside the acquired window ``[left, right)`` (fastMRI's ``padding_left`` / ``padding_right``: the
    zero padding of e.g. brain files, never acquired) count neither as sampled nor as skipped.

    Args:
        columns: ``(W,)`` or ``(images, W)`` mask, nonzero = sampled; images that sample no column (slices without
            data) are left out.
        acquired: the acquired columns ``[left, right)``; None: all ``W``.

    A mask that samples no column inside the window measures ``acceleration`` inf, no centre and no pattern.

    Example:
        >>> mask = np.zeros(368)
        >>> mask[30:338:8] = 1              # every 8th acquired column, 30 columns of padding each side
        >>> mask[179:189] = 1               # 10 centre lines
        >>> sampling = line_sampling(mask, (30, 338))
        >>> round(sampling.acceleration, 2), sampling.center_lines, sampling.pattern
        (6.42, 10, 'equispaced')
    """
    sampled = np.atleast_2d(np.asarray(columns) != 0)
    width = sampled.shape[-1]
    left, right = (0, width) if acquired is None else acquired
    sampled = sampled[:, left:right]
    sampled = sampled[sampled.any(axis=1)]
    if not len(sampled):
        return LineSampling(float("inf"), 0, None)
    narrowest, patterns = right - left, set()
    for image in sampled:
        start, stop = _center_run(image, width // 2 - left)
        narrowest = min(narrowest, stop - start)
        outer = np.flatnonzero(image)
        sides = {_side_pattern(outer[outer < start]), _side_pattern(outer[outer >= stop])}
        patterns.add(sides.pop() if len(sides) == 1 else None)
    acceleration = (right - left) / float(sampled.sum(axis=1).mean())
    return LineSampling(acceleration, int(narrowest), patterns.pop() if len(patterns) == 1 else None)
