"""Source anatomy for the simulator: real MRI images that installed packages ship, and slice sampling.

Sources (all read from package files on disk, never downloaded):

* ``"mni152"`` — nilearn's bundled MNI152 2009 template (1 mm, 197 × 233 × 189) with its grey-matter and
  white-matter probability maps and brain mask. CSF is the part of the brain mask that is neither GM nor WM. The
  template is skull-stripped, so a head shell is added from the distance to the brain surface: a 2 mm CSF layer,
  a 5 mm skull (no signal, a little diploë fat) and a 5 mm scalp (fat and muscle). Tissue fractions give any
  contrast through the signal equations in :mod:`.contrast`. This is the **training** subject.
* ``"dipy_b0"`` — dipy's ``S0_10slices.nii.gz``: ten real axial b = 0 (T2-weighted EPI) slices of a different
  human brain, 128 × 128 at 2 mm. Its contrast is fixed. Use it as the **held-out** subject.
* ``"pydicom_mr"`` — pydicom's ``MR_small.dcm``: one real 64 × 64 MR slice (T2-weighted, TR 4000 ms, TE 240 ms).
  Its contrast is fixed; a volume from it has one slice.
* ``"nibabel_epi"`` — nibabel's ``example4d.nii.gz`` (first frame): 24 real axial T2*-weighted EPI slices of
  another human brain, 128 × 96 at 2 mm, 2.2 mm apart. Fixed contrast; a **training** source that is not a
  template.
* ``"pydicom_abdomen"`` — pydicom's ``examples_overlay.dcm``: one real axial abdominal slice (Siemens 1.5 T, T1
  gradient echo, 300 × 484 at 0.72 mm). Fixed contrast, one slice; other anatomy than the brain for training.
* ``"pydicom_liver"`` / ``"pydicom_shoulder"`` — two real slices from the ``pydicom-data`` package (pydicom's
  test-file store): a contrast-enhanced T1 abdominal MPR with a liver lesion (Siemens, 484 × 484 at 0.72 mm,
  ``MR-SIEMENS-DICOM-WithOverlays.dcm``) and an oblique (sagittal-nearest) T1 spin-echo shoulder slice (Philips,
  1024 × 1024 at 0.195 mm, binned 2 × 2, ``MR2_UNCR.dcm``). Fixed contrast, one slice each; musculoskeletal and
  more body anatomy for training. Files from DICOM slices are labelled with the plane their header gives.

None of the training sources (mni152, nibabel_epi and the pydicom images) comes from dipy, the package of the held-out
subject, so no training image can be a view of the held-out scan.

World coordinates are RAS millimetres with B0 along +z (head–foot). Image rows (H, the readout direction of the
encoded k-space) and columns (W, phase-encode) are placed in world space by :class:`SliceGeometry`.
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

__all__ = [
    "SOURCES",
    "SliceGeometry",
    "SourceVolume",
    "check_orientation",
    "choose_geometry",
    "load_source",
    "mni152_file",
    "sample",
    "slice_points",
]

SOURCES = ("mni152", "dipy_b0", "pydicom_mr", "nibabel_epi", "pydicom_abdomen", "pydicom_liver", "pydicom_shoulder")
ORIENTATIONS = ("axial", "coronal", "sagittal")
TISSUES = ("wm", "gm", "csf", "fat", "muscle")

# (row axis u, column axis v, slice normal n) in world coordinates for each orientation, before flips/rotation:
# axial rows run anterior -> posterior, coronal and sagittal rows run superior -> inferior.
_AXES = {
    "axial": ((0.0, -1.0, 0.0), (-1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),
    "coronal": ((0.0, 0.0, -1.0), (-1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 0.0, -1.0), (0.0, -1.0, 0.0), (1.0, 0.0, 0.0)),
}


@dataclass(frozen=True)
class SourceVolume:
    """One source subject on a voxel grid.

    Attributes:
        name: one of :data:`SOURCES`.
        maps: ``(T, X, Y, Z)`` float32: tissue fractions in the order of :data:`TISSUES` (``T = 5``) for a
            tissue-model source, or one intensity image in [0, 1] (``T = 1``) for a fixed-contrast source.
        affine: ``(4, 4)`` voxel index -> world mm.
        orientations: orientations that can be cut (a fixed-contrast stack: only its own slices, labelled with the
            body plane they show).
        native_contrast: ``None`` for a tissue-model source, else a label such as ``"t2"``.
        center_mm: ``(3,)`` centre of the head in world mm.
        radius_mm: radius of a cylinder around z that encloses the head, in mm.
    """

    name: str
    maps: np.ndarray
    affine: np.ndarray
    orientations: tuple[str, ...]
    native_contrast: str | None
    center_mm: np.ndarray
    radius_mm: float


@dataclass(frozen=True)
class SliceGeometry:
    """Where the slices of one volume lie (all lengths in mm).

    Attributes:
        orientation: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        row_axis: ``(3,)`` unit vector along image rows (H, readout), after rotation and flip.
        col_axis: ``(3,)`` unit vector along image columns (W, phase-encode), after rotation and flip.
        normal: ``(3,)`` unit slice normal.
        offsets_mm: ``(S,)`` slice positions along ``normal`` relative to the head centre.
        fov_mm: ``(rows, cols)`` field of view of the *reconstructed* image.
        center_mm: ``(3,)`` world point at the image centre for offset 0.
        rotation_deg: in-plane rotation that was applied.
        flip_rows: whether the row axis was flipped.
        flip_cols: whether the column axis was flipped.
    """

    orientation: str
    row_axis: np.ndarray
    col_axis: np.ndarray
    normal: np.ndarray
    offsets_mm: np.ndarray
    fov_mm: tuple[float, float]
    center_mm: np.ndarray
    rotation_deg: float
    flip_rows: bool
    flip_cols: bool

    @property
    def slice_thickness_mm(self) -> float:
        """Distance between neighbouring slices (the FOV along z for a single slice)."""
        return float(np.diff(self.offsets_mm).mean()) if len(self.offsets_mm) > 1 else 3.0


def load_source(name: str) -> SourceVolume:
    """Load (and cache) a source subject by name; see the module docstring."""
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; expected one of {', '.join(SOURCES)}")
    return _LOADERS[name]()


# nilearn's bundled MNI152 2009 files; read directly (as nilearn.datasets.load_mni152_template / _gm_template /
# _wm_template / _brain_mask do at resolution=1: scaled to max 1, mask = T1 > 0.2) without importing nilearn.
_MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def mni152_file(kind: str) -> Path:
    """Path of nilearn's bundled MNI152 ``"t1"``, ``"gm"`` or ``"wm"`` image (nilearn is not imported)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the 'mni152' source needs nilearn (pip install nilearn)")
    return Path(spec.origin).parent / "datasets" / "data" / _MNI_FILES[kind]


@functools.lru_cache(maxsize=1)
def _load_mni152() -> SourceVolume:
    import nibabel

    def read(kind: str) -> tuple[np.ndarray, np.ndarray]:
        image = nibabel.load(str(mni152_file(kind)))
        data = np.asarray(image.dataobj, dtype=np.float32)
        return data / data.max(), np.asarray(image.affine, dtype=np.float64)

    t1, affine = read("t1")
    gm, wm = read("gm")[0], read("wm")[0]
    brain = ndimage.gaussian_filter((t1 > 0.2).astype(np.float32), 0.7)
    total = np.maximum(gm + wm, 1e-6)
    scale = np.minimum(1.0, brain / total)  # GM + WM never exceed the brain fraction
    gm, wm = gm * scale, wm * scale
    csf = np.clip(brain - gm - wm, 0.0, 1.0)

    # Head shell from the distance (mm) to the brain surface, computed on a 2 mm grid (1 mm voxels here).
    coarse = ndimage.distance_transform_edt(brain[::2, ::2, ::2] < 0.5, sampling=2.0).astype(np.float32)
    dist = ndimage.zoom(coarse, 2, order=1, grid_mode=True, mode="grid-constant")[tuple(slice(n) for n in t1.shape)]
    dist = np.pad(dist, [(0, n - m) for n, m in zip(t1.shape, dist.shape)], mode="edge")

    def band(lo: float, hi: float) -> np.ndarray:  # soft 0/1 band lo < d < hi with 1 mm edges
        return np.clip(dist - lo + 0.5, 0, 1) * np.clip(hi - dist + 0.5, 0, 1) * (brain < 0.5)

    csf += 1.0 * band(0.0, 2.0)
    fat = 0.25 * band(4.0, 5.5) + 0.6 * band(7.0, 12.0)  # diploë, then subcutaneous fat
    muscle = 0.4 * band(7.0, 12.0)
    maps = np.stack([wm, gm, csf, fat, muscle]).astype(np.float32)
    support = maps.sum(axis=0) > 0.05
    center, radius = _extent(support, affine)
    return SourceVolume("mni152", maps, affine, ORIENTATIONS, None, center, radius)


@functools.lru_cache(maxsize=1)
def _load_dipy_b0() -> SourceVolume:
    import nibabel

    path = importlib.resources.files("dipy.data").joinpath("files", "S0_10slices.nii.gz")
    image = np.squeeze(np.asarray(nibabel.load(str(path)).get_fdata(), dtype=np.float32))  # (128, 128, 10)
    # The file's z zoom is not a slice thickness; 2 mm in-plane as stored, 4 mm between slices.
    return _fixed_contrast_source("dipy_b0", image, (2.0, 2.0, 4.0), "t2")


@functools.lru_cache(maxsize=1)
def _load_pydicom_mr() -> SourceVolume:
    import pydicom

    dataset = pydicom.dcmread(_pydicom_test_file("MR_small.dcm"))
    image = dataset.pixel_array.astype(np.float32).T[:, ::-1, None]  # (x, y, 1), rows of the DICOM run along -y
    # The stored pixel spacing (0.31 mm) describes a 2 cm crop; it is stretched to head size (3 mm pixels).
    return _fixed_contrast_source("pydicom_mr", image, (3.0, 3.0, 3.0), "t2")


@functools.lru_cache(maxsize=1)
def _load_nibabel_epi() -> SourceVolume:
    import nibabel

    path = importlib.resources.files("nibabel.tests").joinpath("data", "example4d.nii.gz")
    if not path.is_file():
        raise FileNotFoundError(f"the 'nibabel_epi' source needs nibabel's bundled test image {path}; not installed")
    image = np.asarray(nibabel.load(str(path)).dataobj[..., 0], dtype=np.float32)  # (128, 96, 24), LAS
    return _fixed_contrast_source("nibabel_epi", image, (2.0, 2.0, 2.2), "t2")


def _pydicom_slice(name: str, filename: str, contrast: str, binning: int = 1) -> SourceVolume:
    """One real DICOM slice as a fixed-contrast source, ``binning`` × ``binning`` pixels averaged.

    These scans' fields of view cut through the body (arms, flanks, shoulder girdle); a 12 mm-ish cosine taper
    (16 pixels) at the frame's edges keeps that cut from becoming a bright straight edge that no real acquisition
    of the whole body would have."""
    import pydicom

    dataset = pydicom.dcmread(_pydicom_test_file(filename))
    image = dataset.pixel_array.astype(np.float32)
    if binning > 1:
        rows, cols = (n // binning * binning for n in image.shape)
        image = image[:rows, :cols].reshape(rows // binning, binning, cols // binning, binning).mean(axis=(1, 3))
    image = image.T[:, ::-1, None]  # (x, y, 1) as for MR_small
    for axis in (0, 1):
        n, edge = image.shape[axis], 16
        ramp = np.ones(n, dtype=np.float32)
        ramp[:edge] = ramp[-edge:][::-1] = 0.5 - 0.5 * np.cos(np.pi * (np.arange(edge) + 0.5) / edge)
        image *= ramp.reshape([-1 if a == axis else 1 for a in range(3)])
    spacing = float(dataset.PixelSpacing[0]) * binning
    voxel_mm = (spacing, spacing, float(dataset.SliceThickness))
    return _fixed_contrast_source(name, image, voxel_mm, contrast, _dicom_plane(dataset.ImageOrientationPatient))


def _dicom_plane(orientation: Sequence[float]) -> str:
    """``"axial"``, ``"coronal"`` or ``"sagittal"``: the body plane nearest a DICOM ImageOrientationPatient (row and
    column direction cosines, LPS), by the largest component of the slice normal, as scanners label oblique slices.

    >>> _dicom_plane([1, 0, 0, 0, 1, 0]), _dicom_plane([0.57, 0.82, 0, 0, 0, -1])
    ('axial', 'sagittal')
    """
    normal = np.cross(np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:6], dtype=float))
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]


@functools.lru_cache(maxsize=1)
def _load_pydicom_abdomen() -> SourceVolume:
    return _pydicom_slice("pydicom_abdomen", "examples_overlay.dcm", "t1")


@functools.lru_cache(maxsize=1)
def _load_pydicom_liver() -> SourceVolume:
    # An MPR of a contrast-enhanced T1 abdomen (liver lesion, kidneys), 484 x 484 at 0.72 mm: pydicom-data.
    return _pydicom_slice("pydicom_liver", "MR-SIEMENS-DICOM-WithOverlays.dcm", "t1")


@functools.lru_cache(maxsize=1)
def _load_pydicom_shoulder() -> SourceVolume:
    # An oblique shoulder slice (Philips, protocol "T1W/SE/1024"; its normal is 35 degrees from left-right, so a
    # sagittal oblique), 1024 x 1024 at 0.195 mm, binned to 512 x 512 at 0.39 mm: pydicom-data.
    return _pydicom_slice("pydicom_shoulder", "MR2_UNCR.dcm", "t1", binning=2)


def _pydicom_test_file(name: str) -> str:
    """Path of one of pydicom's bundled test files; never downloads (pydicom would fetch missing ones)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(f"pydicom's bundled test file {name!r} is not installed (reconkit never downloads it)")
    return str(path)


def _fixed_contrast_source(
    name: str, image: np.ndarray, voxel_mm: tuple[float, float, float], contrast: str, plane: str = "axial"
) -> SourceVolume:
    """A fixed-contrast source: ``image`` ``(X, Y, Z)`` scaled to its 99.5th percentile, cut only along its own
    slices, which show the body's ``plane`` (the orientation the simulated files are labelled with)."""
    image = np.clip(image, 0, None)
    image = image / max(float(np.percentile(image, 99.5)), 1e-6)
    maps = np.clip(image, 0, 1.2)[None].astype(np.float32)
    shape = np.array(image.shape, dtype=np.float64)
    affine = np.diag([*voxel_mm, 1.0])
    affine[:3, 3] = -(shape - 1) / 2 * np.array(voxel_mm)
    # Parenchyma of a T2 / b0 image is dim next to CSF, so the head is everything above 3 % (noise opened away).
    support = ndimage.binary_opening(maps[0] > 0.03, iterations=2)
    center, radius = _extent(support if support.any() else maps[0] > 0, affine)
    return SourceVolume(name, maps, affine, (plane,), contrast, center, radius)


_LOADERS = {
    "mni152": _load_mni152,
    "dipy_b0": _load_dipy_b0,
    "pydicom_mr": _load_pydicom_mr,
    "nibabel_epi": _load_nibabel_epi,
    "pydicom_abdomen": _load_pydicom_abdomen,
    "pydicom_liver": _load_pydicom_liver,
    "pydicom_shoulder": _load_pydicom_shoulder,
}


def _extent(support: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre (mm) and radius around z (mm) of the voxels in ``support``."""
    idx = np.argwhere(support[::2, ::2, ::2]).astype(np.float64) * 2  # every 2nd voxel is plenty
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    center = (world.min(axis=0) + world.max(axis=0)) / 2
    radius = float(np.hypot(world[:, 0] - center[0], world[:, 1] - center[1]).max())
    return center, radius


def check_orientation(source: SourceVolume, orientation: str) -> None:
    """ValueError unless ``source`` can be cut in ``orientation`` (``"mixed"``: any of its own orientations)."""
    if orientation != "mixed" and orientation not in source.orientations:
        raise ValueError(f"source {source.name!r} can be cut only {'/'.join(source.orientations)}, not {orientation!r}")


def choose_geometry(
    source: SourceVolume,
    rng: np.random.Generator,
    num_slices: int,
    orientation: str = "mixed",
    fov_mm: float | None = None,
) -> SliceGeometry:
    """Draw a slice stack through the anatomy: orientation, position, spacing, in-plane rotation, flips, FOV.

    Slices of a tissue-model source are spread (3–5 mm apart) over the part of the head where the brain's
    cross-section is at least a third of its largest one. A fixed-contrast 2D stack is cut at its own slice
    positions, so it gives at most as many slices as it has.

    Args:
        source: the subject.
        rng: random generator (consumed in a fixed order, so a seed reproduces the geometry).
        num_slices: requested number of slices ``S``.
        orientation: ``"axial"``, ``"coronal"``, ``"sagittal"`` or ``"mixed"`` (one drawn per volume).
        fov_mm: reconstructed field of view; ``None`` draws one that holds the head (about 1.15 head diameters).
    """
    check_orientation(source, orientation)
    options = source.orientations if orientation == "mixed" else (orientation,)
    chosen = options[int(rng.integers(len(options)))]
    # a fixed-contrast stack holds its slices in its own (x, y) plane, whichever plane of the body they show
    u, v, n = (np.array(a) for a in _AXES[chosen if source.native_contrast is None else "axial"])
    angle = float(rng.uniform(-10, 10)) if source.native_contrast is None else float(rng.uniform(-5, 5))
    c, s = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
    u, v = c * u + s * v, -s * u + c * v
    flip_rows, flip_cols = bool(rng.random() < 0.25), bool(rng.random() < 0.5)
    u, v = (-u if flip_rows else u), (-v if flip_cols else v)
    if fov_mm is None:
        fov_mm = float(2 * source.radius_mm * rng.uniform(1.05, 1.25))

    if source.native_contrast is None:
        low, high = _anatomy_range(source, n)
        spacing = float(rng.uniform(3.0, 5.0))
        if num_slices > 1:
            spacing = min(spacing, (high - low) / (num_slices - 1))
        extent = spacing * (num_slices - 1)
        middle = float(rng.uniform(low + extent / 2, max(low + extent / 2, high - extent / 2)))
        offsets = middle + spacing * (np.arange(num_slices) - (num_slices - 1) / 2)
    else:
        depth = source.maps.shape[3]
        count = min(num_slices, depth)
        first = int(rng.integers(depth - count + 1))
        z = source.affine[2, 2] * np.arange(first, first + count) + source.affine[2, 3]
        offsets = z - source.center_mm[2]
    return SliceGeometry(
        chosen,
        u,
        v,
        n,
        np.asarray(offsets, dtype=np.float64),
        (fov_mm, fov_mm),
        source.center_mm.copy(),
        angle,
        flip_rows,
        flip_cols,
    )


@functools.lru_cache(maxsize=8)
def _anatomy_profile(name: str, axis: int) -> tuple[np.ndarray, np.ndarray]:
    source = load_source(name)
    brain = source.maps[:3].sum(axis=0) if source.native_contrast is None else source.maps[0]
    other = tuple(a for a in range(3) if a != axis)
    area = (brain > 0.5).sum(axis=other).astype(np.float64)
    coords = source.affine[axis, axis] * np.arange(area.size) + source.affine[axis, 3] - source.center_mm[axis]
    return coords, area


def _anatomy_range(source: SourceVolume, normal: np.ndarray) -> tuple[float, float]:
    """Range of offsets (mm from the head centre) along ``normal`` where the brain cross-section is large."""
    axis = int(np.argmax(np.abs(normal)))
    coords, area = _anatomy_profile(source.name, axis)
    inside = coords[area >= area.max() / 3]
    return float(inside.min()), float(inside.max())


def slice_points(geometry: SliceGeometry, shape: tuple[int, int], recon_size: tuple[int, int]) -> np.ndarray:
    """World coordinates (mm) of every pixel centre of the encoded grid.

    Args:
        geometry: the slice stack.
        shape: encoded image size ``(H, W)``; the pixel size is ``fov_mm / recon_size`` so the central
            ``recon_size`` crop spans the FOV (the readout is oversampled by ``H / recon_h``).
        recon_size: ``(h, w)``.

    Returns:
        ``(S, H, W, 3)`` float64 world coordinates in mm.
    """
    height, width = shape
    row_mm = geometry.fov_mm[0] / recon_size[0]
    col_mm = geometry.fov_mm[1] / recon_size[1]
    rows = (np.arange(height) - height // 2) * row_mm
    cols = (np.arange(width) - width // 2) * col_mm
    plane = rows[:, None, None] * geometry.row_axis + cols[None, :, None] * geometry.col_axis
    offsets = geometry.offsets_mm[:, None, None, None] * geometry.normal
    return geometry.center_mm + offsets + plane[None]


def sample(source: SourceVolume, volume: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    """Interpolate a ``(X, Y, Z)`` voxel ``volume`` of ``source`` at world points ``(..., 3)`` (0 outside)."""
    inverse = np.linalg.inv(source.affine)
    index = points_mm @ inverse[:3, :3].T + inverse[:3, 3]
    order = 1 if source.native_contrast is None else 3
    coords = np.moveaxis(index, -1, 0).reshape(3, -1)
    values = ndimage.map_coordinates(volume, coords, order=order, mode="constant", cval=0.0, prefilter=order > 1)
    return np.clip(values, 0, None).reshape(points_mm.shape[:-1]).astype(np.float32)
