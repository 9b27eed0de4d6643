"""Model sizes that cannot work are refused when the model is made, before any weight is allocated.

``VarNet``, ``Unet`` / ``NormUnet`` and ``VisionTransformer`` check their sizes first thing in ``__init__`` (so do
``build_model``, checkpoint loading and ``reconkit train``'s configs, which go through them), with two bounds:

* counts of repeated blocks, each its own Python module built one after the other: ``num_cascades`` and the ViT's
  ``depth`` at most :data:`MAX_REPEATS`, pooling levels (``pools``, ``sens_pools``, ``num_pool_layers``) at most
  :data:`MAX_POOLS`. ``VarNet(num_cascades=10**5)`` spent 18 s building cascades before it failed.
* the weights: their number (from the layer sizes, :func:`reconkit.models.unet.unet_weights`, or counted on the
  ``meta`` device, which allocates nothing: :func:`meta_weights`) times the bytes of torch's default dtype must fit in the memory free where they are built: :func:`reconkit.data.volume.available_memory`
  on the CPU (Linux's ``MemAvailable`` or a container's cgroup limit), ``torch.cuda.mem_get_info`` plus the blocks
  PyTorch's caching allocator holds unused (freed tensors' memory, which it reuses) under a CUDA default device;
  not checked elsewhere. ``VarNet(chans=10**5)`` asked for 360 GB; ``Unet(chans=10**6)`` for 36 TB.

Neither touches real research models: fastMRI's VarNet (12 cascades, chans 18, pools 4) has 30 M weights (0.12 GB
in float32), and 48 cascades of chans 64 have 1.5 G (6 GB). Training needs more than the weights (gradients,
optimiser state, activations: about 4× the weights with Adam, plus activations), which is not checked here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from reconkit.data.volume import available_memory

__all__ = ["MAX_POOLS", "MAX_REPEATS", "check_model_size", "meta_weights"]

MAX_REPEATS = 1000
"""Most cascades / transformer blocks: 80× fastMRI's 12 cascades. Each runs once per forward pass, so 1000 already
takes minutes per fastMRI slice on a CPU; past it even building the modules takes seconds to minutes."""

MAX_POOLS = 24
"""Most 2× pooling levels of a U-Net: its input needs at least ``2**pools`` pixels a side (16.7 M at 24), and
fastMRI's U-Nets use 4."""


def _free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``; None where not known or not a memory (``meta``)."""
    if device.type == "cpu":
        return available_memory()
    if device.type == "cuda":  # the driver's free memory and what PyTorch's caching allocator holds unused
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    return None


def meta_weights(*parts: tuple[int, Callable[[], nn.Module]]) -> int:
    """``Σ count × weights of build()`` over the ``(count, build)`` parts, each module built once on the ``meta``
    device (no memory, no initialisation arithmetic): a cascade once, times the cascades, rather than every one.

    Raises:
        RuntimeError: a tensor of more than ``2**63`` bytes ("Storage size calculation overflowed").
    """
    with torch.device("meta"):
        return sum(count * sum(p.numel() for p in build().parameters()) for count, build in parts)


def check_model_size(
    model: str,
    sizes: Mapping[str, float],
    weights: Callable[[], int],
    repeats: tuple[str, ...] = (),
    pools: tuple[str, ...] = (),
) -> None:
    """Raise ``ValueError`` naming ``model`` and its ``sizes`` when a ``repeats`` size exceeds :data:`MAX_REPEATS`,
    a ``pools`` size exceeds :data:`MAX_POOLS`, or the ``weights()`` weights need more memory than is free on
    torch's default device (called only where that is known; not on ``meta``, so a model counted by
    :func:`meta_weights` does not check itself again).

    Example:
        >>> check_model_size("Unet", {"chans": 4}, lambda: 1000)
        >>> check_model_size("VarNet", {"num_cascades": 10**5}, lambda: 0, repeats=("num_cascades",))
        Traceback (most recent call last):
        ...
        ValueError: VarNet: num_cascades=100000 is more than 1000 (reconkit.models.sizes.MAX_REPEATS)
    """
    for names, most, limit in ((repeats, MAX_REPEATS, "MAX_REPEATS"), (pools, MAX_POOLS, "MAX_POOLS")):
        for name in names:
            if sizes[name] > most:
                raise ValueError(f"{model}: {name}={sizes[name]} is more than {most} (reconkit.models.sizes.{limit})")
    device = torch.get_default_device()
    free = _free_memory(device)
    if free is None:
        return
    shown = ", ".join(f"{name}={value}" for name, value in sizes.items())
    try:
        count = weights()
    except RuntimeError as err:  # meta_weights: "Storage size calculation overflowed"
        raise ValueError(f"{model}({shown}): too large to build ({str(err).splitlines()[0]})") from None
    needed = count * torch.get_default_dtype().itemsize
    if needed > free:
        raise ValueError(f"{model}({shown}): {count:.3g} weights take {needed / 2**30:.3g} GiB in "
                         f"{torch.get_default_dtype()}, more than the {free / 2**30:.3g} GiB of memory free on "
                         f"{device.type}")
