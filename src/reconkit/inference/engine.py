"""Reconstruction engine shared by ``reconkit reconstruct``, ``reconkit demo``, the benchmarks and the data scripts.

:func:`load_reconstructor` turns a model reference (a reconkit checkpoint, an exported ONNX file, or the classical
baselines ``zero-filled`` / ``cg-sense``) into a :class:`Reconstructor`; :func:`volume_mask` picks the mask of a
volume (stored, detected from empty columns, or retrospective and seeded from the file name as fastMRI does);
:func:`reconstruct_volume` runs a volume through it slice batch by slice batch and crops to the recon size;
:func:`training_mask_mismatch` says where a volume's own sampling lies outside the model's training mask.
"""

from __future__ import annotations

import functools
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from reconkit.data import Volume, apply_mask, center_crop, create_mask_for_mask_type, filename_seed
from reconkit.data.masks import LineSampling, line_sampling
from reconkit.errors import DataError, ReconkitError, ReconkitWarning, check_number
from reconkit.export.onnx_format import format_sizes
from reconkit.models.classical import zero_filled as zero_filled_image

__all__ = [
    "CLASSICAL",
    "DEFAULT_MASK",
    "Reconstructor",
    "TrainingMask",
    "VolumeResult",
    "acquired_columns",
    "default_backend",
    "load_reconstructor",
    "reconstruct_volume",
    "training_mask_mismatch",
    "volume_mask",
]

CLASSICAL = ("zero-filled", "cg-sense")
DEFAULT_MASK = {"mask_type": "equispaced_fraction", "acceleration": 4, "center_fraction": 0.08}
MATERIAL = 1.25
"""How far a volume's sampling may lie outside the training mask before :func:`training_mask_mismatch` speaks: an
acceleration above 1.25 × the highest trained, a centre of fewer than 1 / 1.25 = 80 % of the narrowest trained."""


# --------------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class TrainingMask:
    """The masks a model was trained with, as its checkpoint (``mask``) or ONNX metadata (``reconkit.mask_family``,
    ``reconkit.acceleration``, ``reconkit.center_fraction``) records them; empty where not recorded.

    Attributes:
        mask_type: the mask family (``equispaced_fraction``, ``random``, ...), or None.
        accelerations: every acceleration trained at (e.g. ``(4.0, 8.0)``).
        center_fractions: every centre fraction trained with (share of the k-space width ``W``).
    """

    mask_type: str | None = None
    accelerations: tuple[float, ...] = ()
    center_fractions: tuple[float, ...] = ()

    @classmethod
    def recorded(cls, mask_type: str | None, accelerations, center_fractions) -> TrainingMask:
        """From the recorded values: a name or None, and numbers, lists of numbers or None."""
        def numbers(values) -> tuple[float, ...]:
            return () if values is None else tuple(float(v) for v in np.atleast_1d(values))

        return cls(str(mask_type) if mask_type else None, numbers(accelerations), numbers(center_fractions))

    def mask_defaults(self) -> dict:
        """The training mask as CLI defaults (first acceleration / centre fraction)."""
        defaults = {}
        if self.mask_type:
            defaults["mask_type"] = self.mask_type
        if self.accelerations:
            defaults["acceleration"] = int(self.accelerations[0])
        if self.center_fractions:
            defaults["center_fraction"] = self.center_fractions[0]
        return defaults


@dataclass
class Reconstructor:
    """A k-space model behind one call, whatever runs it.

    ``run(masked_kspace (B, C, H, W, 2) float32, mask (B, 1, 1, W, 1) float32) -> (B, H, W) float32`` (numpy),
    the RSS magnitude at the full encoded size; an ONNX model's ``run`` raises ``ReconkitError`` with ONNX
    Runtime's reason when a call fails.

    Attributes:
        name: what the summary prints (file name or baseline name).
        backend: ``"torch"`` or ``"onnx"``.
        training_mask: all the masks the model was trained with, as recorded (empty for the classical baselines and
            files that record none); :attr:`mask_defaults` is its first one.
        spatial_sizes: k-space ``(H, W)`` an ONNX graph was specialised for; None when any size works.
        fallback: returns the same model's PyTorch ``run`` for the sizes outside ``spatial_sizes`` (from the ONNX
            file's own weights, built on the first call and cached); None when there is none (then those sizes
            are an error).
        run_for_size: returns the ``run`` for one size of ``spatial_sizes``, where the backend prepares something
            per size (an ONNX file with several sizes: one ONNX Runtime session per size, opened on first use);
            None when ``run`` is all there is. :meth:`runner_for` calls it, so the preparation happens before a
            volume's model calls are timed.
    """

    name: str
    backend: str
    run: Callable[[np.ndarray, np.ndarray], np.ndarray]
    training_mask: TrainingMask = field(default_factory=TrainingMask)
    spatial_sizes: list[tuple[int, int]] | None = None
    fallback: Callable[[], Callable[[np.ndarray, np.ndarray], np.ndarray]] | None = None
    run_for_size: Callable[[int, int], Callable[[np.ndarray, np.ndarray], np.ndarray]] | None = None

    @property
    def mask_defaults(self) -> dict:
        """``mask_type`` / ``acceleration`` / ``center_fraction`` the model was trained with, where recorded (the
        first of :attr:`training_mask`'s): the CLI's mask defaults."""
        return self.training_mask.mask_defaults()

    def runner_for(
        self, path: Path, height: int, width: int
    ) -> tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], str | None]:
        """The call for k-space of ``height × width``, and a note when it is not the model's own backend.

        Raises:
            DataError: the ONNX graph lacks this size and there is no PyTorch fallback.
            ReconkitError: ONNX Runtime cannot open the graph of this size.
        """
        if self.spatial_sizes is None or (height, width) in self.spatial_sizes:
            return (self.run if self.run_for_size is None else self.run_for_size(height, width)), None
        sizes = format_sizes(self.spatial_sizes)
        if self.fallback is None:
            raise DataError(
                path,
                f"k-space is {height}x{width} but the ONNX model {self.name} only takes {sizes} (re-export with "
                f"`reconkit export --size {height} {width}`, or run the checkpoint with --backend torch)",
            )
        return self.fallback(), (
            f"ran in PyTorch: {height}x{width} is not a size of the ONNX graph ({sizes}); "
            f"`reconkit export --size {height} {width}` adds it"
        )


def _parse_device(device: str) -> torch.device:
    """``device`` (``"cpu"``, ``"cuda"`` or ``"cuda:N"``) as a ``torch.device``; ReconkitError naming it otherwise
    (torch's own error listed every backend it knows, and ONNX Runtime ran an unknown name on the CPU)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ReconkitError(f"device {device!r}: reconkit runs models on 'cpu' or 'cuda' ('cuda:N': the N-th GPU)")
    return parsed


def _check_cuda_index(device: str, parsed: torch.device) -> None:
    """ReconkitError naming ``device`` when PyTorch sees no GPU of its index (``cuda`` is ``cuda:0``)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ReconkitError(f"device {device!r}, but PyTorch sees no CUDA device (a CPU build, or no GPU)")
    if (parsed.index or 0) >= count:
        raise ReconkitError(f"device {device!r}, but PyTorch sees {count} CUDA device(s): cuda:0 to cuda:{count - 1}")


def _torch_device(device: str) -> torch.device:
    """``device`` for a PyTorch model, checked: an ONNX model needs only ONNX Runtime's CUDA provider (checked where
    its session opens), so ``--device cuda`` with a CPU build of PyTorch fails for PyTorch models only."""
    parsed = _parse_device(device)
    if parsed.type == "cuda":
        _check_cuda_index(device, parsed)
    return parsed


def _torch_runner(model: torch.nn.Module, device: torch.device) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    model = model.to(device).eval()
    # the float32 inputs in the weights' dtype: a float64 checkpoint (e.g. --trainer.precision 64-true) runs in float64
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    def run(masked_kspace: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            image = model(torch.from_numpy(masked_kspace).to(device, dtype), torch.from_numpy(mask).to(device, dtype))
        return image.float().cpu().numpy()

    return run


def _built_once(build: Callable) -> Callable:
    """``functools.cache`` for the sessions and models an ONNX reconstructor builds on first use, also when several
    threads (a user's own server) ask at once: ``functools.cache`` runs ``build`` in each of them, one ONNX Runtime
    session or PyTorch model apiece. A failure is not kept (as with ``functools.cache``)."""
    built: dict = {}
    lock = threading.Lock()

    @functools.wraps(build)
    def get(*args):
        if args not in built:  # the lock only while building: a call of a size that is open never waits
            with lock:
                if args not in built:
                    built[args] = build(*args)
        return built[args]

    return get


def _onnx_reconstructor(path: Path, device: str, threads: int | None, torch_fallback: bool) -> Reconstructor:
    import onnxruntime as ort

    from reconkit.export import load_onnx_as_torch, read_onnx, single_size_model
    from reconkit.export.onnx_export import UNKNOWN_MASK_FAMILY, decoded_metadata
    from reconkit.export.onnx_format import session_source

    parsed = _parse_device(device)
    proto = read_onnx(path)  # read once: the metadata, and the size branches of a multi-size file
    metadata = decoded_metadata(proto, path)
    providers: list = ["CPUExecutionProvider"]
    if parsed.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ReconkitError(f"{path}: device {device!r}, but this onnxruntime has no CUDAExecutionProvider")
        if torch.cuda.is_available():  # else (a CPU build of PyTorch) ONNX Runtime says so when a session opens
            _check_cuda_index(device, parsed)
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": parsed.index or 0}))
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads

    def open_session(model: bytes | str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        try:
            session = ort.InferenceSession(model, options, providers=providers)
        except Exception as err:  # noqa: BLE001 -- onnxruntime raises its own exception types for unreadable models
            raise ReconkitError(f"{path}: cannot load ONNX model ({str(err).splitlines()[0]})") from None

        def run(masked_kspace: np.ndarray, mask: np.ndarray) -> np.ndarray:
            try:
                return session.run(["image"], {"masked_kspace": masked_kspace, "mask": mask})[0]
            except Exception as err:  # noqa: BLE001 -- onnxruntime's own types (InvalidArgument, Fail, ...)
                raise ReconkitError(f"ONNX Runtime failed on masked_kspace {list(masked_kspace.shape)}, mask "
                                    f"{list(mask.shape)}: {' '.join(str(err).split())}") from None

        return run

    declared = metadata.get("reconkit.spatial_sizes", "dynamic")
    sizes = None if declared == "dynamic" else [(int(h), int(w)) for h, w in declared]
    run_for_size = None
    if sizes is not None and len(sizes) > 1:
        # ONNX Runtime would prepare every size's branch on load (~10 s for the bundled model's eight): open one
        # session per size instead, from that size's branch alone, when a volume of that size first comes
        @_built_once
        def whole_file() -> tuple[Callable[[np.ndarray, np.ndarray], np.ndarray] | None, ReconkitError | None]:
            try:  # a failure is kept too, so that it is not retried (≈ 10 s) for every volume
                return open_session(session_source(path, proto)), None
            except ReconkitError as err:
                return None, err

        @_built_once
        def run_for_size(height: int, width: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
            try:
                return open_session(single_size_model(proto, height, width).SerializeToString())
            except ReconkitError as err:  # e.g. a file an ONNX optimiser rewrote, its branches no longer laid out
                whole, whole_err = whole_file()  # as reconkit exports them: the whole file may still run
                if whole_err is not None:
                    raise whole_err from None
                reason = str(err).removeprefix(f"{path}: ")
                warnings.warn(f"{path}: opened the whole file (slower to start) because its {height}x{width} "
                              f"branch could not be opened alone: {reason}", ReconkitWarning, stacklevel=2)
                return whole

        def run(masked_kspace: np.ndarray, mask: np.ndarray) -> np.ndarray:
            height, width = masked_kspace.shape[2:4]
            if (height, width) not in sizes:
                raise ReconkitError(f"{path}: input height x width {height}x{width} not exported; "
                                    f"this model serves {format_sizes(sizes)}")
            return run_for_size(height, width)(masked_kspace, mask)
    else:
        run = open_session(session_source(path, proto))

    @_built_once  # the model is rebuilt once, when a size outside the graph first comes
    def torch_run() -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        # on the CPU where ONNX Runtime has CUDA but this PyTorch has not (the CUDA image's onnxruntime-gpu alone)
        return _torch_runner(load_onnx_as_torch(path), parsed if torch.cuda.is_available() else torch.device("cpu"))

    rebuildable = torch_fallback and sizes is not None and "reconkit.model_kwargs" in metadata

    family = metadata.get("reconkit.mask_family")
    training = TrainingMask.recorded(  # a bare module's file knows no mask family: the CLI's default applies
        None if family == UNKNOWN_MASK_FAMILY else family,
        metadata.get("reconkit.acceleration"),
        metadata.get("reconkit.center_fraction"),
    )
    return Reconstructor(
        name=path.name,
        backend="onnx",
        run=run,
        training_mask=training,
        spatial_sizes=sizes,
        fallback=torch_run if rebuildable else None,
        run_for_size=run_for_size,
    )


def default_backend(model: str) -> str:
    """``"onnx"`` for a model file named ``*.onnx`` (any case: ``MODEL.ONNX`` too), else ``"torch"``."""
    return "onnx" if Path(model).suffix.lower() == ".onnx" else "torch"


def load_reconstructor(
    model: str,
    backend: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
    torch_fallback: bool = True,
) -> Reconstructor:
    """Build the model named by ``model``.

    Args:
        model: ``zero-filled`` / ``cg-sense`` (classical baselines), a ``.onnx`` file (ONNX Runtime; a file exported
            for several sizes gets one session per size, opened from that size's branch when first needed, or the
            whole file's session, with a :class:`~reconkit.errors.ReconkitWarning`, where a branch cannot be opened
            alone) or a reconkit checkpoint (``reconkit.models.load_model``).
        backend: ``"torch"`` / ``"onnx"``; None infers it from the file extension (:func:`default_backend`).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (the N-th GPU; ``"cuda"`` is ``"cuda:0"``).
        threads: ONNX Runtime intra-op threads, an integer >= 1 (None: its default), checked for every model.
            Not applied to PyTorch models (a checkpoint, the baselines, the ONNX file's PyTorch fallback): their
            threads are process-wide, set them with ``torch.set_num_threads`` as ``reconkit reconstruct --threads``
            does.
        torch_fallback: for an ONNX file exported from a checkpoint, run k-space sizes its graph lacks with the
            file's own weights in PyTorch (:func:`reconkit.export.load_onnx_as_torch`) instead of failing.

    Raises:
        ReconkitError: unknown name, missing or unreadable model file, an unknown or unavailable device (named),
            or backend mismatch.
        ConfigError: ``threads`` not None and not an integer >= 1 (ONNX Runtime took -1 without a word).
    """
    from reconkit.models import contract_model, load_model
    from reconkit.models.classical import CGSense, ZeroFilled

    if threads is not None:
        check_number("threads", threads, 1, integer=True)

    if model in CLASSICAL:
        if backend == "onnx":
            raise ReconkitError(f"{model}: classical baselines run with the torch backend only")
        baseline = ZeroFilled() if model == "zero-filled" else CGSense()
        return Reconstructor(name=model, backend="torch", run=_torch_runner(baseline, _torch_device(device)))
    path = Path(model)
    if not path.is_file():
        raise ReconkitError(f"{path}: model file not found (or use 'zero-filled' / 'cg-sense')")
    named_onnx = default_backend(model) == "onnx"
    if (backend or ("onnx" if named_onnx else "torch")) == "onnx":
        if not named_onnx:
            raise ReconkitError(f"{path}: --backend onnx needs an .onnx file; export it with 'reconkit export'")
        return _onnx_reconstructor(path, device, threads, torch_fallback)
    if named_onnx:
        raise ReconkitError(f"{path}: an ONNX file runs with --backend onnx, not torch")
    torch_device = _torch_device(device)
    net, info = load_model(path)
    net = contract_model(net)  # image-domain models (U-Net, ViT) get the zero-filled front end, as on export
    mask_info = (info.get("mask") if isinstance(info, dict) else None) or {}  # None: saved without a mask
    training = TrainingMask.recorded(
        mask_info.get("mask_type"), mask_info.get("accelerations"), mask_info.get("center_fractions")
    )
    return Reconstructor(
        name=path.name,
        backend="torch",
        run=_torch_runner(net, torch_device),
        training_mask=training,
    )


# --------------------------------------------------------------------------------------------------- volumes


@dataclass
class VolumeResult:
    """One reconstructed volume, all images ``(slices, h, w)`` float32 cropped to the header's recon size.

    Attributes:
        reconstruction: the model's output.
        zero_filled: RSS of the inverse FFT of the masked k-space (the input the model saw).
        target: the file's reference image, cropped alike, or None.
        acceleration: acquired columns / sampled columns (their mean over the slices with a mask per slice), as
            ``sampling.acceleration``.
        seconds: wall time of the model calls.
        note: set when the volume ran on another backend than the model's own (a size the ONNX graph lacks).
        empty_slices: indices of slices whose masked k-space is all zero: not run through the model (a VarNet's
            normalisation would divide by zero), their reconstruction is zero like their zero-filled image.
        sampling: the mask measured inside the acquired columns (:func:`reconkit.data.masks.line_sampling`):
            acceleration, fully sampled centre lines, regular or random lines; :func:`training_mask_mismatch`
            compares it with the model's training mask.
    """

    reconstruction: np.ndarray
    zero_filled: np.ndarray
    target: np.ndarray | None
    acceleration: float
    seconds: float
    note: str | None = None
    empty_slices: list[int] = field(default_factory=list)
    sampling: LineSampling | None = None


def _coil_kspace(volume: Volume) -> np.ndarray:
    """k-space as ``(slices, coils, H, W)`` complex (single-coil files get one coil)."""
    return volume.kspace[:, None] if volume.kspace.ndim == 3 else volume.kspace


def acquired_columns(volume: Volume) -> tuple[int, int, str | None]:
    """The acquired k-space columns ``[left, right)`` from the header's encoding limits (fastMRI's ``padding_left`` /
    ``padding_right``; ``left`` moved on by the ``kspace_encoding_step_1`` minimum, 0 in fastMRI files, for a
    partial-Fourier scan that numbers its lines in the full k-space, as Gadgetron reads it), and a note when those
    limits do not fit the file's k-space width: then the part inside the width is used, or the whole width when
    nothing of it is left."""
    width = volume.kspace.shape[-1]
    header = volume.info.header
    left, right = header.padding_left + header.kspace_encoding_step_1_minimum, header.padding_right
    if 0 <= left < right <= width:
        return left, right, None
    fitted = max(0, min(left, width)), max(0, min(right, width))
    if fitted[1] <= fitted[0]:
        fitted = (0, width)
    note = (f"the header's encoding limits put the acquired k-space columns at [{left}, {right}), outside the "
            f"{width} columns of 'kspace'; columns [{fitted[0]}, {fitted[1]}) are taken as acquired")
    return fitted[0], fitted[1], note


def recon_crop(volume: Volume) -> tuple[tuple[int, int], str | None]:
    """The ``(h, w)`` output images are cropped to: the header's recon size, at most the k-space's ``(H, W)``, and a
    note when the header asks for more than that."""
    height, width = volume.kspace.shape[-2:]
    recon_x, recon_y = volume.info.header.recon_size[:2]
    crop = (min(recon_x, height), min(recon_y, width))
    if crop == (recon_x, recon_y):
        return crop, None
    return crop, (f"the header's recon size {recon_x}x{recon_y} is larger than the {height}x{width} k-space; the "
                  f"images are {crop[0]}x{crop[1]}")


def volume_mask(
    volume: Volume, mask_type: str, acceleration: int, center_fraction: float, seed: int | None
) -> tuple[np.ndarray, bool]:
    """The float32 column mask for ``volume`` and whether it was made here (retrospective).

    A stored ``mask`` dataset wins (zeroed outside the acquired window, as fastMRI's ``VarNetDataTransform`` does,
    and, with a :class:`~reconkit.errors.ReconkitWarning`, in the columns no image holds data in);
    otherwise, if some image (slice) holding data leaves a column inside the acquired window
    ``[padding_left, padding_right)`` empty, the file is already undersampled and each image's non-empty columns
    are its mask; otherwise a mask is drawn from ``mask_type`` with the file-name seed (or ``seed``), zeroed
    outside the acquired window as fastMRI does.

    Returns:
        ``(mask, retrospective)``: ``mask`` is ``(1, 1, 1, W, 1)``, one for every slice, or ``(slices, 1, 1, W, 1)``
        when already undersampled images differ in their sampling (e.g. the slices or contrasts of an ISMRMRD raw
        file, each undersampled with its own lines).

    Raises:
        DataError: the k-space holds no data or leaves rows empty between rows that hold data (undersampled along
            the readout H, which a column mask cannot describe), a stored mask marks none of the columns that hold
            data, or the drawn mask samples none of the acquired columns (tiny widths, where the centre fraction
            rounds to no line and no other line was drawn).
    """
    kspace = _coil_kspace(volume)
    width = kspace.shape[-1]
    left, right, _ = acquired_columns(volume)
    # image by image: np.abs of the whole volume would hold another half of its k-space
    held = [_held_lines(image) for image in kspace]
    _refuse_empty_rows(volume, [rows for _, rows in held])
    held_columns = np.stack([columns for columns, _ in held])  # (slices, W)
    if volume.mask is not None:  # outside the acquired window no column holds data, as fastMRI's transform says
        per_image = (np.asarray(volume.mask, dtype=np.float32) != 0)[None]
        per_image[:, :left], per_image[:, right:] = False, False
        per_image = _without_empty_columns(volume, per_image, held_columns.any(axis=0))
    else:
        per_image = held_columns
    with_data = per_image[per_image.any(axis=1)]  # the images that hold data
    if not len(with_data):
        raise DataError(volume.info.path, "k-space holds no data (every column is zero)")
    if volume.mask is not None or not with_data[:, left:right].all():  # already undersampled
        union = with_data.any(axis=0)
        if (with_data == union).all():  # every image with data sampled alike
            return union.astype(np.float32).reshape(1, 1, 1, width, 1), False
        return per_image.astype(np.float32).reshape(-1, 1, 1, width, 1), False
    mask_func = create_mask_for_mask_type(mask_type, [center_fraction], [acceleration])
    probe = torch.zeros(1, 1, kspace.shape[-2], width, 2)  # mask functions only look at the shape (a 2D one at H)
    _, mask, _ = apply_mask(
        probe, mask_func, seed=filename_seed(volume.info.path.name) if seed is None else seed, padding=(left, right)
    )
    if mask.shape[-3] != 1:
        raise ReconkitError(f"mask type {mask_type!r} gives a 2D mask; reconstruct takes Cartesian line masks")
    if not mask.any():  # tiny widths: no centre line and no drawn line; every slice would come out as zeros
        raise DataError(
            volume.info.path,
            f"the {mask_type} mask ({acceleration}x, centre fraction {center_fraction}) samples none of the "
            f"{right - left} acquired k-space columns; use a lower --acceleration or a larger --center-fraction",
        )
    return mask.reshape(1, 1, 1, width, 1).numpy().astype(np.float32), True


def _held_lines(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which columns ``(W,)`` and rows ``(H,)`` of one image's k-space ``(coils, H, W)`` hold data (bool)."""
    held = (image != 0).any(axis=0)  # (H, W)
    return held.any(axis=0), held.any(axis=1)


def _refuse_empty_rows(volume: Volume, rows: list[np.ndarray]) -> None:
    """Raise when an image leaves k-space rows empty between its first and last row that hold data (``rows``: one
    ``(H,)`` bool per image): sampled lines along the readout axis H (phase-encode lines stored as rows, or a 2D
    mask), which a line mask along W cannot describe. Empty rows at the edges (an asymmetric echo, discarded ADC
    samples) are fine."""
    for index, held in enumerate(rows):
        found = np.flatnonzero(held)
        if not len(found):
            continue
        span = int(found[-1] - found[0] + 1)
        if span > len(found):
            raise DataError(
                volume.info.path,
                f"k-space rows are left empty along the readout (H): {span - len(found)} of the {span} rows between "
                f"the first and last that hold data (image {index}), so it is undersampled along H, not in "
                "phase-encode columns (W) as reconstruct takes it; store 'kspace' as (slices, coils, readout H, "
                "phase-encode W): transpose its last two axes",
            )


def _without_empty_columns(volume: Volume, stored: np.ndarray, held: np.ndarray) -> np.ndarray:
    """The stored mask ``stored`` ``(1, W)`` bool without the columns that no image holds data in (``held``
    ``(W,)``), with a warning naming the file where it marks such columns: a model would take their zeros for
    measured data. Kept as it is when no image holds data (every slice is then written as zeros)."""
    claimed = stored[0] & ~held
    if not claimed.any() or not held.any():
        return stored
    if not (stored[0] & held).any():
        raise DataError(volume.info.path, "its 'mask' marks none of the k-space columns that hold data: it does "
                                          "not describe this k-space (a mask stored uncentred?)")
    listed = ", ".join(map(str, np.flatnonzero(claimed)[:5])) + (", …" if claimed.sum() > 5 else "")
    warnings.warn(ReconkitWarning(
        f"{volume.info.path}: its 'mask' marks {int(claimed.sum())} column(s) as sampled that hold no data in any "
        f"slice (columns {listed}); they are left out of the mask, as a model would take their zeros for measured "
        "data (a mask that does not describe the k-space, e.g. one stored uncentred, gives a wrong image)"
    ), stacklevel=3)
    return stored & held


def _batches(num_slices: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, num_slices, batch_size):
        yield slice(start, min(start + batch_size, num_slices))


def reconstruct_volume(
    volume: Volume,
    reconstructor: Reconstructor,
    mask: np.ndarray,
    batch_size: int = 4,
    on_slices: Callable[[int], None] | None = None,
) -> VolumeResult:
    """Run ``reconstructor`` over all slices of ``volume`` with column ``mask`` ``(1, 1, 1, W, 1)`` (every slice) or
    ``(slices, 1, 1, W, 1)`` (one per slice), as :func:`volume_mask` gives; of any dtype, nonzero = sampled.

    ``on_slices(n)`` is called after every batch of ``n`` slices (progress bars).

    Raises:
        DataError: naming the volume's file: a size the model does not take, a model call that fails with a
            ``ReconkitError`` (an ONNX Runtime error, e.g. a graph fixed to another size whose file lacks
            reconkit's size metadata), or an output of the wrong shape or with NaN / inf.
        ReconkitError: ONNX Runtime cannot open the graph of this size (:meth:`Reconstructor.runner_for`).
        ValueError: ``mask`` of neither shape.
    """
    kspace = _coil_kspace(volume)
    num_slices, _, height, width = kspace.shape
    run, note = reconstructor.runner_for(volume.info.path, height, width)
    crop = recon_crop(volume)[0]
    # filled batch by batch: a list of cropped batches would keep each batch's full-size images alive (a crop is a
    # view), and those long-lived blocks among the batches' large temporaries fragment the heap: the process then
    # grew by several times the volume's k-space instead of by one batch
    outputs = np.zeros((num_slices, *crop), dtype=np.float32)
    zero_filled = np.zeros((num_slices, *crop), dtype=np.float32)
    seconds, empty_slices = 0.0, []
    if mask.ndim != 5 or mask.shape[0] not in (1, num_slices) or tuple(mask.shape[1:]) != (1, 1, width, 1):
        raise ValueError(f"mask must be (1, 1, 1, {width}, 1) or ({num_slices}, 1, 1, {width}, 1) (one, or one per "
                         f"slice, of (slices, 1, 1, W, 1)); got {tuple(mask.shape)}")
    mask = (np.asarray(mask) != 0).astype(np.float32)  # nonzero = sampled: a 0/255 mask would scale the k-space by 255
    for batch in _batches(num_slices, max(1, batch_size)):
        # one batch-sized float32 array, masked in place: each astype / `+ 0.0` / boolean selection was another copy
        masked = np.stack((kspace[batch].real, kspace[batch].imag), axis=-1).astype(np.float32, copy=False)
        batch_mask = np.broadcast_to(mask if mask.shape[0] == 1 else mask[batch], (masked.shape[0], *mask.shape[1:]))
        masked *= batch_mask
        masked += 0.0  # -0.0 becomes 0.0
        # before the model call, which gets `masked` itself: a model that changed its input cannot change this
        zero_filled[batch] = center_crop(zero_filled_image(torch.from_numpy(masked)).numpy(), crop)
        holds_data = masked.reshape(masked.shape[0], -1).any(axis=1)
        empty_slices += [batch.start + i for i in np.flatnonzero(~holds_data)]
        image = np.zeros((masked.shape[0], height, width), dtype=np.float32)
        if holds_data.any():
            start = time.perf_counter()
            try:  # the mask's selection is a small writable copy (torch warns on the read-only broadcast view)
                ran = run(masked if holds_data.all() else masked[holds_data], batch_mask[holds_data])
            except ReconkitError as err:  # e.g. a graph without reconkit's size metadata, fixed to another size
                raise DataError(volume.info.path, f"model {reconstructor.name}: {err}") from err
            seconds += time.perf_counter() - start
            if ran.shape != (int(holds_data.sum()), height, width) or not np.isfinite(ran).all():
                raise DataError(
                    volume.info.path,
                    f"model {reconstructor.name} returned {ran.shape} "
                    f"{'with NaN/inf ' if not np.isfinite(ran).all() else ''}for slices {batch.start}-"
                    f"{batch.stop - 1}",
                )
            image[holds_data] = ran
        outputs[batch] = center_crop(image, crop)
        if on_slices is not None:
            on_slices(masked.shape[0])
    target = volume.target
    if target is not None:
        target = center_crop(target, (min(crop[0], target.shape[-2]), min(crop[1], target.shape[-1])))
    sampling = line_sampling(mask.reshape(mask.shape[0], width), acquired_columns(volume)[:2])
    return VolumeResult(
        reconstruction=outputs,
        zero_filled=zero_filled,
        target=None if target is None else np.asarray(target, dtype=np.float32),
        acceleration=sampling.acceleration,
        seconds=seconds,
        note=note,
        empty_slices=empty_slices,
        sampling=sampling,
    )


_PATTERN_OF_FAMILY = {"random": "random", "equispaced": "equispaced", "equispaced_fraction": "equispaced",
                      "magic": "equispaced", "magic_fraction": "equispaced"}
"""What :func:`reconkit.data.masks.line_sampling` measures for a mask of each line family."""


def _counted(count: int, noun: str, shown: str | None = None) -> str:
    """``"1 line"``, ``"26 lines"`` (``shown`` in place of the number, e.g. a range)."""
    return f"{count if shown is None else shown} {noun}{'' if count == 1 else 's'}"


def training_mask_mismatch(training: TrainingMask, sampling: LineSampling, width: int) -> str | None:
    """Where a volume's own sampling lies materially outside the model's training mask, in one sentence; None where
    it lies within, or where the model records no training mask (the classical baselines, older files).

    Told: an acceleration above :data:`MATERIAL` × the highest trained; a fully sampled centre of fewer lines than
    the narrowest trained centre fraction gives at this width, divided by :data:`MATERIAL`; lines of the other
    pattern (regular vs random) than the training family's, where ``sampling`` could tell. Meant for masks the
    scan came with: a retrospective mask is the one asked for.

    Args:
        training: the model's :attr:`Reconstructor.training_mask`.
        sampling: the volume's mask measured (:attr:`VolumeResult.sampling`).
        width: the k-space width ``W``, zero padding included: the width the training masks' centre fraction was
            taken of.

    Example:
        >>> training = TrainingMask("equispaced_fraction", (4.0,), (0.08,))
        >>> training_mask_mismatch(training, LineSampling(7.9, 10, "equispaced"), 320)
        'sampled at 7.9x with 10 centre lines; the model was trained at 4x with 8 % centre (26 lines at this width): expect lower quality'
        >>> training_mask_mismatch(training, LineSampling(4.2, 26, "equispaced"), 320) is None
        True
    """
    accelerations, fractions = sorted(set(training.accelerations)), sorted(set(training.center_fractions))
    centre_lines = [round(width * fraction) for fraction in fractions]
    trained_pattern = _PATTERN_OF_FAMILY.get(training.mask_type or "")
    faster = bool(accelerations) and sampling.acceleration > MATERIAL * accelerations[-1]
    narrower = bool(fractions) and sampling.center_lines * MATERIAL < centre_lines[0]
    other_pattern = None not in (trained_pattern, sampling.pattern) and sampling.pattern != trained_pattern
    if not (faster or narrower or other_pattern):
        return None
    measured = f"sampled at {sampling.acceleration:.1f}x with {_counted(sampling.center_lines, 'centre line')}"
    trained = []
    if accelerations:
        trained.append("at " + "/".join(f"{acceleration:g}x" for acceleration in accelerations))
    if fractions:
        percent = "-".join(dict.fromkeys(f"{100 * fraction:g}" for fraction in (fractions[0], fractions[-1])))
        counts = "-".join(dict.fromkeys(str(count) for count in (centre_lines[0], centre_lines[-1])))
        trained.append(f"with {percent} % centre ({_counted(centre_lines[-1], 'line', counts)} at this width)")
    if other_pattern:
        measured += f", {sampling.pattern} lines"
        trained.append(f"on {training.mask_type} masks")
    return f"{measured}; the model was trained {' '.join(trained)}: expect lower quality"
