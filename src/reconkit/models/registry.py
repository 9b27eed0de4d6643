"""The one registry of model types, and checkpoint loading without the training code.

Checkpoint contract (see docs/architecture.md): a dict (a Lightning ``.ckpt`` is one) holding

* ``"reconkit"``: ``{"model_type": str, "model_kwargs": dict, "mask": {...}, "normalization": str}``;
* ``"state_dict"``: model weights under the prefix ``model.`` (other keys, e.g. a loss's buffers, are ignored).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reconkit.atomic import atomic_path
from reconkit.errors import ReconkitError
from reconkit.models.classical import CGSense, ZeroFilled
from reconkit.models.unet import Unet
from reconkit.models.varnet import VarNet
from reconkit.models.vit import VisionTransformer

__all__ = ["MODEL_TYPES", "TORCH_SAVE_MAGIC", "CheckpointError", "ModelConfigError", "build_model",
           "check_checkpoint_file", "load_model", "save_model"]

MODEL_TYPES: dict[str, Callable[..., nn.Module]] = {
    "varnet": VarNet,
    "unet": Unet,
    "vit": VisionTransformer,
    "zero_filled": ZeroFilled,
    "cg_sense": CGSense,
}

_STATE_PREFIX = "model."


class ModelConfigError(ReconkitError):
    """Unknown model type or hyper-parameters the model does not accept."""


class CheckpointError(ReconkitError):
    """A checkpoint file is missing, corrupt, or does not match the model it describes.

    Message: ``"<path>: <problem>"``.
    """

    def __init__(self, path: os.PathLike | str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple:
        # Exception pickles as cls(*args), and args is ("<path>: <problem>",): a TypeError when unpickled
        return type(self), (self.path, self.problem), self.__dict__


def build_model(model_type: str, **model_kwargs: Any) -> nn.Module:
    """Instantiate a registered model type (``"varnet"``, ``"unet"``, ``"vit"``, ``"zero_filled"``, ``"cg_sense"``).

    Example:
        >>> build_model("unet", in_chans=1, out_chans=1, chans=4, num_pool_layers=2).chans
        4
    """
    if model_type not in MODEL_TYPES:
        raise ModelConfigError(f"unknown model_type {model_type!r}; registered: {sorted(MODEL_TYPES)}")
    try:
        return MODEL_TYPES[model_type](**model_kwargs)
    except (TypeError, ValueError) as exc:  # unexpected / missing keyword arguments, or values the model refuses
        raise ModelConfigError(f"model_type {model_type!r}: bad model_kwargs {model_kwargs}: {exc}") from exc


def save_model(
    path: os.PathLike | str,
    model: nn.Module,
    model_type: str,
    model_kwargs: dict,
    mask: dict | None = None,
    normalization: str | None = None,
) -> Path:
    """Write a minimal checkpoint following the contract (atomically: temp file, then ``os.replace``).

    Training writes Lightning checkpoints instead; this is for models built outside Lightning (tests, demos).
    """
    path = Path(path)
    checkpoint = {
        "reconkit": {"model_type": model_type, "model_kwargs": dict(model_kwargs), "mask": mask,
                     "normalization": normalization},
        "state_dict": {_STATE_PREFIX + k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return path


TORCH_SAVE_MAGIC = (b"PK\x03\x04", b"\x80")
"""How ``torch.save``'s files start: a zip archive, or a pickle (the legacy format)."""


def _check_file_kind(path: Path) -> bytes:
    """Name what ``path`` is when it cannot be a ``torch.save`` file: empty, an HDF5 scan, an ONNX graph, or
    anything that starts neither like torch.save's zip archive nor like a pickle, or one it cannot read (no read
    permission); else return its first bytes."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as err:
        raise CheckpointError(path, f"cannot read the file: {err.strerror or err}") from None
    if not head:
        raise CheckpointError(path, "empty file (0 bytes)")
    if head.startswith(b"\x89HDF"):
        raise CheckpointError(path, "is an HDF5 file (a scan?), not a model checkpoint")
    if head.startswith(TORCH_SAVE_MAGIC):
        return head
    if path.suffix.lower() == ".onnx" or head[:1] == b"\x08":  # ONNX: a protobuf ModelProto, field 1 ir_version
        raise CheckpointError(path, "looks like an ONNX graph, not a checkpoint (reconstruct and serve take .onnx "
                                    "files as they are; export needs the training checkpoint)")
    raise CheckpointError(path, "not a PyTorch checkpoint (neither torch.save's zip format nor a pickle)")


def check_checkpoint_file(path: os.PathLike | str) -> None:
    """Raise :class:`CheckpointError` naming ``path`` when it is missing, unreadable, not a ``torch.save`` file, or a
    zip archive cut short (an interrupted copy or a full disk), without loading it: only the archive's directory is
    read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found" if not path.exists() else "is not a regular file")
    zipped = _check_file_kind(path).startswith(TORCH_SAVE_MAGIC[0])
    if zipped and not zipfile.is_zipfile(path):
        raise CheckpointError(path, "not a readable PyTorch checkpoint (corrupt or truncated?): the zip archive has no "
                                "end (its central directory is missing)")


def weights_only_refusal(path: os.PathLike | str, exc: pickle.UnpicklingError) -> CheckpointError:
    """The :class:`CheckpointError` for a file that ``torch.load(..., weights_only=True)`` refused with ``exc``
    (it pickles objects other than tensors and plain data), quoting torch's reason."""
    # torch's message: "Weights only load failed. ... WeightsUnpickler error: <reason> ...", or for a module it
    # blocks outright (os, subprocess, builtins: what a crafted file calls) its own paragraph, "Trying to load
    # unsupported GLOBAL posix.system whose module posix is blocked."
    text = str(exc)
    reason = text.partition("WeightsUnpickler error:")[2] or next(
        (part for part in text.split("\n\n") if "GLOBAL" in part), "")
    reason = " ".join(reason.split())[:160]
    detail = f" ({reason})" if reason else ""
    return CheckpointError(path, f"cannot be read as weights and plain data only; refusing to unpickle other objects"
                                 f"{detail}")


def _read_checkpoint(path: Path) -> dict:
    check_checkpoint_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise weights_only_refusal(path, exc) from exc
    except Exception as exc:  # torch.load fails in many ways on damaged files (EOFError, IndexError, ...)
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CheckpointError(path, f"not a readable PyTorch checkpoint (corrupt or truncated?): {detail}") from exc
    if not isinstance(checkpoint, dict):
        raise CheckpointError(path, f"expected a dict checkpoint, found {type(checkpoint).__name__}")
    return checkpoint


def _check_entry(path: Path, checkpoint: dict) -> dict:
    entry = checkpoint.get("reconkit")
    if not isinstance(entry, dict):
        raise CheckpointError(path, "missing the 'reconkit' entry (model_type, model_kwargs): not a reconkit "
                                    "checkpoint")
    if not isinstance(entry.get("model_type"), str):
        raise CheckpointError(path, "'reconkit' entry lacks a string 'model_type'")
    if not isinstance(entry.get("model_kwargs"), dict):
        raise CheckpointError(path, "'reconkit' entry lacks a dict 'model_kwargs'")
    mask = entry.get("mask")
    if mask is not None and not isinstance(mask, dict):
        raise CheckpointError(path, f"'reconkit' entry's 'mask' must be a dict, got {type(mask).__name__}")
    for key in ("accelerations", "center_fractions"):  # reconstruct's and export's mask defaults
        value = (mask or {}).get(key)
        values = value if isinstance(value, (list, tuple)) else [] if value is None else [value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and -1e300 < v < 1e300 for v in values):
            raise CheckpointError(path, f"'reconkit' entry's mask {key} must be a number or a list of numbers, got "
                                        f"{str(value)[:80]}")
    return entry


def _model_state(path: Path, checkpoint: dict) -> dict[str, torch.Tensor]:
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(path, "missing 'state_dict'")
    weights = {k[len(_STATE_PREFIX):]: v for k, v in state.items() if k.startswith(_STATE_PREFIX)}
    for name, value in weights.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(path, f"weight {name!r} is a {type(value).__name__}, not a tensor")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(path, f"weight {name!r} holds NaN or Inf values")
    return weights


def _summarise(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _build_checkpoint_model(path: Path, entry: dict) -> nn.Module:
    """``build_model`` of a checkpoint's ``"reconkit"`` entry; its :class:`ModelConfigError` (bad hyper-parameters,
    or a model larger than the memory free) as a :class:`CheckpointError` naming the file."""
    try:
        return build_model(entry["model_type"], **entry["model_kwargs"])
    except ModelConfigError as exc:
        raise CheckpointError(path, str(exc)) from exc


def load_model(path: os.PathLike | str) -> tuple[nn.Module, dict]:
    """Rebuild a model from a checkpoint file without the training code; returns ``(model, info)``.

    ``model`` is on the CPU in eval mode, in its weights' dtype (not torch's default dtype), except that float16 /
    bfloat16 weights (``--trainer.precision bf16-true`` / ``16-true``) load into a float32 model, exactly: every
    reconkit model takes float32 k-space and runs its FFTs in float32. ``info`` is the
    checkpoint's ``"reconkit"`` entry (``model_type``, ``model_kwargs``, ``mask``, ``normalization``; the last two
    ``None`` when absent) plus ``"path"``, and ``"epoch"`` / ``"global_step"`` when the checkpoint records them.

    Raises:
        CheckpointError: missing / corrupt file, missing entries, unknown model type, bad hyper-parameters, a
            ``mask`` that is not a dict or whose accelerations / centre fractions are not numbers, weights that do
            not fit the model (names or shapes), non-finite weights, a model larger than the memory free. The message
            names the file.
    """
    path = Path(path)
    checkpoint = _read_checkpoint(path)
    entry = _check_entry(path, checkpoint)
    weights = _model_state(path, checkpoint)
    try:  # on the meta device first: model_kwargs asking for a huge model (chans=10**6) allocate nothing there
        with torch.device("meta"):
            expected = _build_checkpoint_model(path, entry).state_dict()
    except RuntimeError as exc:  # e.g. "Storage size calculation overflowed" for chans=10**10
        raise CheckpointError(path, f"model_type {entry['model_type']!r} with {entry['model_kwargs']} cannot be "
                                    f"built: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc

    if expected and not weights:
        raise CheckpointError(path, f"'state_dict' has no weights under the prefix {_STATE_PREFIX!r}")
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        parts = ([f"missing weights {_summarise(missing)}"] if missing else []) + (
            [f"unexpected weights {_summarise(unexpected)}"] if unexpected else [])
        raise CheckpointError(path, f"weights do not fit model_type {entry['model_type']!r} with "
                                    f"{entry['model_kwargs']}: " + "; ".join(parts))
    wrong = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if weights[k].shape != v.shape]
    if wrong:
        raise CheckpointError(path, f"weight shapes do not fit the model (checkpoint vs model): {_summarise(wrong)}")
    # as large as the checkpoint's own weights; here (not on meta) the model checks that it fits in free memory
    model = _build_checkpoint_model(path, entry)
    # built in the caller's default dtype (float64 after torch.set_default_dtype): give it the weights' own dtype,
    # float32 for half-precision weights (their model would meet the float32 FFTs' activations: a dtype error)
    dtype = next((v.dtype for v in weights.values() if v.is_floating_point()), torch.float32)
    model.to(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    model.load_state_dict(weights)
    model.eval()

    info = {"mask": None, "normalization": None, **entry, "path": str(path)}
    for key in ("epoch", "global_step"):
        if isinstance(checkpoint.get(key), int):
            info[key] = checkpoint[key]
    return model, info
