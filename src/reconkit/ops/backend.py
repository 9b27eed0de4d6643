"""Choice between the pure-PyTorch and the fused Triton implementation of the coil / data-consistency ops.

Order of precedence: the ``backend=`` argument, then the ``RECONKIT_OPS_BACKEND`` environment variable
(``torch`` or ``triton``), then automatic: Triton for CUDA tensors when Triton imports, PyTorch otherwise.
With ``TRITON_INTERPRET=1`` (set before the kernels are imported) the Triton path also accepts CPU tensors (used
by the tests). Under ``fft_impl("matmul")`` (the ONNX export path) the ops take the MatMul path whatever the backend.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["backend_choice", "resolve_backend", "triton_available"]

_BACKENDS = ("torch", "triton")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``reconkit.ops.triton_kernels`` can be imported (Triton installed and usable)."""
    try:
        import reconkit.ops.triton_kernels  # noqa: F401
    except Exception:  # noqa: BLE001 -- ImportError, or Triton failing to initialise on this machine
        return False
    return True


def backend_choice(backend: str | None) -> str:
    """The backend asked for (``backend=``, else ``RECONKIT_OPS_BACKEND``, else ``"auto"``), its name checked.

    The ops check it on every call, also where the path does not depend on it (``hybrid=True``, the export path),
    so that a misspelt name fails at once rather than on the first call that uses it.
    """
    choice = backend or os.environ.get("RECONKIT_OPS_BACKEND") or "auto"
    if choice != "auto" and choice not in _BACKENDS:
        # named: a value from the environment reaches every command, whose error otherwise gave no clue where from
        source = "" if backend else " (environment variable RECONKIT_OPS_BACKEND)"
        raise ValueError(f"unknown ops backend {choice!r}{source}; expected one of {_BACKENDS} or 'auto'")
    return choice


def resolve_backend(backend: str | None, *tensors: torch.Tensor) -> str:
    """Return ``"torch"`` or ``"triton"`` for an op on ``tensors``: the one named by ``backend`` or
    ``RECONKIT_OPS_BACKEND``, else (``None`` / ``"auto"``) Triton when every tensor is on CUDA and Triton imports.

    Raises:
        ValueError: an unknown backend name.
        RuntimeError: ``"triton"`` asked for where Triton is not available.
    """
    choice = backend_choice(backend)
    if choice == "auto":
        on_cuda = all(t.is_cuda for t in tensors)
        return "triton" if on_cuda and triton_available() else "torch"
    if choice == "triton" and not triton_available():
        raise RuntimeError("backend 'triton' requested but Triton is not available on this machine")
    return choice
