"""``simulate_volume``: one fastMRI-schema multi-coil volume from a source subject, and its HDF5 writer."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from reconkit.atomic import atomic_hdf5
from reconkit.data.simulate import acquisition, anatomy
from reconkit.data.simulate import coils as coil_model
from reconkit.data.simulate import contrast as contrast_model
from reconkit.data.simulate.header import HeaderFields, ismrmrd_header

__all__ = ["SimulatedVolume", "json_text", "simulate_volume", "write_volume"]

_ORIENTATION_CODE = {"axial": "AX", "coronal": "COR", "sagittal": "SAG"}


def json_text(value: object, **options) -> str:
    """Standard JSON for simulation parameters: a non-finite float (``snr_db=inf``) becomes the string ``"inf"`` /
    ``"-inf"`` / ``"nan"``, which ``float()`` reads back, instead of Python's ``Infinity`` that strict parsers (jq,
    JavaScript, pandas' ``read_json``) refuse.

    Example:
        >>> json_text({"snr_db": float("inf"), "coils": [4, 8]})
        '{"snr_db": "inf", "coils": [4, 8]}'
    """

    def strict(item: object) -> object:
        if isinstance(item, float) and not math.isfinite(item):
            return str(item)
        if isinstance(item, dict):
            return {key: strict(entry) for key, entry in item.items()}
        if isinstance(item, (list, tuple)):
            return [strict(entry) for entry in item]
        return item

    return json.dumps(strict(value), allow_nan=False, **options)


@dataclass
class SimulatedVolume:
    """One simulated scan.

    Attributes:
        kspace: ``(S, C, H, W)`` complex64, fastMRI orientation (H readout, W phase-encode), zero outside the
            acquired phase-encode columns ``[padding_left, padding_right)``.
        reconstruction_rss: ``(S, h, w)`` float32, RSS of ``ifft2c(kspace)`` centre-cropped to the recon size.
        sens_maps: ``(S, C, H, W)`` complex64 coil sensitivities (RSS max 1 inside the object).
        image: ``(S, H, W)`` complex64 noise-free object (magnitude × phase) before the coils.
        noise_covariance: ``(C, C)`` complex128 covariance of the noise added to each acquired k-space sample.
        header: ISMRMRD XML string.
        attrs: HDF5 file attributes (``acquisition``, ``max``, ``norm``, ``patient_id``, ``simulation``).
        params: JSON-able description of every random choice (also stored as the ``simulation`` attribute).
    """

    kspace: np.ndarray
    reconstruction_rss: np.ndarray
    sens_maps: np.ndarray
    image: np.ndarray
    noise_covariance: np.ndarray
    header: str
    attrs: dict
    params: dict

    @property
    def padding(self) -> tuple[int, int]:
        """``(padding_left, padding_right)``: the acquired phase-encode columns, as fastmri derives them."""
        return self.params["padding_left"], self.params["padding_right"]


def simulate_volume(
    seed: int,
    *,
    source: str = "mni152",
    coils: int = 8,
    slices: int = 16,
    encoded_size: tuple[int, int] = (640, 368),
    recon_size: tuple[int, int] = (320, 320),
    snr_db: float = 30.0,
    contrast: str = "mixed",
    orientation: str = "mixed",
    field_strength_t: float | None = None,
    noise_correlation: float = 0.5,
    random_contrast: float = 0.0,
) -> SimulatedVolume:
    """Simulate one multi-coil Cartesian scan; everything random follows from ``seed``.

    Independent random streams are used for (anatomy, contrast, geometry), coils, phase and noise, so the same
    seed with ``snr_db=inf`` gives the exact noise-free version of a noisy volume, and changing ``coils`` keeps
    the same slices.

    Args:
        seed: integer seed.
        source: ``"mni152"`` (training subject, any contrast), ``"nibabel_epi"`` / ``"pydicom_abdomen"`` (real
            fixed-contrast training images of other subjects), ``"dipy_b0"`` or ``"pydicom_mr"`` (real
            fixed-contrast images of other subjects, for held-out tests); see :mod:`.anatomy`.
        coils: number of receive coils ``C ≥ 1``.
        slices: number of slices ``S`` (a fixed-contrast source gives at most as many as it has: dipy_b0 10,
            nibabel_epi 24, pydicom_mr / pydicom_abdomen 1).
        encoded_size: ``(H, W)`` k-space size, both even; ``H`` covers the readout field of view
            ``H / h`` times (2× oversampling for the default 640 / 320).
        recon_size: ``(h, w)`` reconstructed size, ``h ≤ H``, ``w ≤ W``.
        snr_db: ``20·log10(mean RSS signal inside the object / noise std per coil and sample)``; ``inf`` = no noise.
        contrast: ``"t1"``, ``"t2"``, ``"pd"`` or ``"mixed"`` (ignored by fixed-contrast sources).
        orientation: ``"axial"``, ``"coronal"``, ``"sagittal"`` or ``"mixed"``.
        field_strength_t: 1.5 or 3.0 T; ``None`` draws one.
        noise_correlation: ``ρ`` in ``[0, 1)``, the noise coupling of the coils; neighbours correlate by about
            ``ρ / e`` (see :mod:`.coils`).
        random_contrast: probability in ``[0, 1]`` that a tissue-map source (mni152) gets random tissue intensities
            instead of the protocol's (contrast randomisation for training, see :mod:`.contrast`; the header still
            names the drawn protocol). Ignored by fixed-contrast sources.

    Returns:
        A :class:`SimulatedVolume`.

    Example:
        >>> vol = simulate_volume(0, coils=4, slices=2, encoded_size=(64, 40), recon_size=(32, 32))
        >>> vol.kspace.shape, vol.reconstruction_rss.shape
        ((2, 4, 64, 40), (2, 32, 32))
    """
    _check_sizes(encoded_size, recon_size, coils, slices)
    _check_options([source], contrast, orientation, field_strength_t, noise_correlation, random_contrast)
    height, width = (int(n) for n in encoded_size)
    recon = (int(recon_size[0]), int(recon_size[1]))
    anatomy_rng, coil_rng, phase_rng, noise_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(4)
    )

    subject = anatomy.load_source(source)
    geometry = anatomy.choose_geometry(subject, anatomy_rng, int(slices), orientation)
    points = anatomy.slice_points(geometry, (height, width), recon)
    protocol = _protocol(subject, contrast, field_strength_t, anatomy_rng)
    if subject.native_contrast is None:
        signals = contrast_model.tissue_signals(protocol, anatomy_rng)
        signals, randomised = contrast_model.randomise_signals(signals, anatomy_rng, random_contrast)
        weights = np.array([signals[t] for t in anatomy.TISSUES], dtype=np.float32)
        volume = np.tensordot(weights, subject.maps, axes=1)
        gamma = 1.0
    else:
        volume, randomised = subject.maps[0], False
        gamma = float(anatomy_rng.uniform(0.8, 1.25))  # contrast variation of a fixed-contrast image
    magnitude = anatomy.sample(subject, volume, points) ** gamma
    magnitude /= max(float(magnitude.max()), 1e-12)
    support = magnitude > 0.05
    pe_fraction = float(anatomy_rng.uniform(0.85, 1.0))
    scale = float(10 ** anatomy_rng.uniform(-4.5, -3.0))  # fastMRI-like absolute k-space scale

    # The array surrounds the head (axis z through its centre); its rings sit at the height of the slice stack.
    array_center = geometry.center_mm + np.array([0.0, 0.0, geometry.offsets_mm.mean() * geometry.normal[2]])
    array = coil_model.make_coil_array(int(coils), array_center, subject.radius_mm, coil_rng)
    sens = coil_model.sensitivity_maps(array, points, support)
    phase = acquisition.image_phase(points, protocol.te_ms, protocol.sequence == "spin_echo", phase_rng)
    image = (scale * magnitude * np.exp(1j * phase)).astype(np.complex64)

    lines, center, padding_left = acquisition.phase_encode_limits(width, pe_fraction)
    kspace = acquisition.encode(image[:, None] * sens, padding_left, lines)
    clean_rss = np.abs(image) * np.sqrt((sens.real**2 + sens.imag**2).sum(axis=1))
    sigma = float(clean_rss[support].mean()) / 10 ** (snr_db / 20) if math.isfinite(snr_db) else 0.0
    covariance = coil_model.noise_covariance(array, sigma, noise_correlation, coil_rng)
    if sigma > 0:
        acquisition.add_correlated_noise(kspace, covariance, noise_rng, slice(padding_left, padding_left + lines))
    target = acquisition.rss_target(kspace, recon)
    randomisation = {"random_contrast": float(random_contrast), "contrast_randomised": randomised}

    acquisition_name = _ORIENTATION_CODE[geometry.orientation] + protocol.contrast.upper()
    params = {
        "seed": int(seed), "source": source, "coils": int(coils), "slices": len(geometry.offsets_mm),
        "encoded_size": [height, width], "recon_size": list(recon), "snr_db": float(snr_db),
        "noise_sigma": sigma, "noise_correlation": float(noise_correlation), "acquisition": acquisition_name,
        "protocol": {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in asdict(protocol).items()},
        "native_contrast": subject.native_contrast, "gamma": gamma, "intensity_scale": scale,
        "orientation": geometry.orientation, "rotation_deg": geometry.rotation_deg,
        "flip_rows": geometry.flip_rows, "flip_cols": geometry.flip_cols, "fov_mm": list(geometry.fov_mm),
        "slice_offsets_mm": [round(float(o), 3) for o in geometry.offsets_mm],
        "pe_lines": lines, "padding_left": padding_left, "padding_right": padding_left + lines,
        **(randomisation if random_contrast > 0 else {}),  # absent without randomisation, as in earlier files
    }  # fmt: skip
    header = ismrmrd_header(HeaderFields(
        encoded_size=(height, width), recon_size=recon, fov_mm=geometry.fov_mm,
        slice_thickness_mm=geometry.slice_thickness_mm, num_slices=len(geometry.offsets_mm), num_coils=int(coils),
        pe_lines=lines, pe_center=center, field_strength_t=protocol.field_strength_t, tr_ms=protocol.tr_ms,
        te_ms=protocol.te_ms, flip_deg=protocol.flip_deg, sequence=protocol.sequence, protocol_name=acquisition_name,
    ))  # fmt: skip
    attrs = {
        "acquisition": acquisition_name,
        "max": float(target.max()),
        "norm": float(np.linalg.norm(target)),
        "patient_id": source,
        "simulation": json_text(params),
    }
    return SimulatedVolume(kspace, target, sens, image, covariance, header, attrs, params)


def _protocol(subject, contrast_name: str, field_strength_t, rng) -> contrast_model.Protocol:
    """The tissue-model protocol, or the nominal protocol of a fixed-contrast source (T2 spin echo)."""
    if subject.native_contrast is None:
        return contrast_model.choose_protocol(contrast_name, rng, field_strength_t)
    field = 1.5 if field_strength_t is None else float(field_strength_t)
    tr_ms, te_ms = (500.0, 12.0) if subject.native_contrast == "t1" else (4000.0, 100.0)
    return contrast_model.Protocol(subject.native_contrast, "spin_echo", field, tr_ms, te_ms, 90.0)


def _check_sizes(encoded_size, recon_size, num_coils: int, num_slices: int) -> None:
    if len(encoded_size) != 2 or len(recon_size) != 2:
        raise ValueError(f"encoded_size and recon_size need two numbers each, got {encoded_size}, {recon_size}")
    height, width = encoded_size
    if height < 8 or width < 8 or height % 2 or width % 2:
        raise ValueError(f"encoded_size must be two even numbers ≥ 8, got {tuple(encoded_size)}")
    if not (1 <= recon_size[0] <= height and 1 <= recon_size[1] <= width):
        raise ValueError(f"recon_size {tuple(recon_size)} must be positive and fit in encoded_size {(height, width)}")
    if num_coils < 1:
        raise ValueError(f"coils must be at least 1, got {num_coils}")
    if num_slices < 1:
        raise ValueError(f"slices must be at least 1, got {num_slices}")


def _check_options(
    sources: Sequence[str],
    contrast: str,
    orientation: str,
    field_strength_t: float | None,
    noise_correlation: float,
    random_contrast: float,
) -> None:
    """ValueError naming the first option of :func:`simulate_volume` that cannot be simulated for ``sources``
    (e.g. an orientation one of them cannot be cut in), before any volume is computed or any file written."""
    if contrast != "mixed" and contrast not in contrast_model.CONTRASTS:
        raise ValueError(
            f"unknown contrast {contrast!r}; expected one of {', '.join(contrast_model.CONTRASTS)} or 'mixed'"
        )
    if field_strength_t is not None and field_strength_t not in (1.5, 3.0):
        raise ValueError(f"field_strength_t must be 1.5 or 3.0, got {field_strength_t}")
    if not 0.0 <= noise_correlation < 1.0:
        raise ValueError(f"noise correlation must be in [0, 1), got {noise_correlation}")
    if not 0.0 <= random_contrast <= 1.0:
        raise ValueError(f"random_contrast must be a probability in [0, 1], got {random_contrast}")
    for name in dict.fromkeys(sources):
        anatomy.check_orientation(anatomy.load_source(name), orientation)


def write_volume(volume: SimulatedVolume, path: os.PathLike | str) -> Path:
    """Atomically write ``volume`` as a fastMRI multi-coil HDF5 file (``kspace``, ``reconstruction_rss``,
    ``ismrmrd_header``, attrs); returns the path."""
    with atomic_hdf5(path) as f:
        f.create_dataset("kspace", data=volume.kspace.astype(np.complex64))
        f.create_dataset("reconstruction_rss", data=volume.reconstruction_rss.astype(np.float32))
        f.create_dataset("ismrmrd_header", data=volume.header)
        for key, value in volume.attrs.items():
            f.attrs[key] = value
    return Path(path)
