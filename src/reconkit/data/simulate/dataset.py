"""``simulate_dataset``: many volumes with varied coils / SNR / contrast, split by volume into train/val/test."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from reconkit.atomic import atomic_path, folder_problem
from reconkit.data.simulate.anatomy import SOURCES
from reconkit.data.simulate.volume import _check_options, _check_sizes, json_text, simulate_volume, write_volume

__all__ = ["simulate_dataset", "split_assignment", "volume_seed"]

SPLITS = ("train", "val", "test")

_VOLUME_FILE = re.compile(r"(?:train|val|test)/[^/\\\x00]+\.h5")
"""A manifest's ``file`` entry: a split folder and a plain ``.h5`` file name in it."""


def volume_seed(seed: int, index: int) -> int:
    """Seed of volume ``index`` of a dataset with ``seed`` (independent of the dataset size)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def split_assignment(num_volumes: int, fractions: Sequence[float], seed: int) -> list[str]:
    """Assign each volume index to ``"train"``, ``"val"`` or ``"test"``.

    Counts are ``round(fraction · N)`` for val and test (at least one each when its fraction is positive and
    ``N ≥ 3``), the rest train; which volumes go where is a permutation drawn from ``seed``.
    """
    if len(fractions) != 3 or not all(math.isfinite(f) and f >= 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split needs three finite non-negative fractions (train val test), got {list(fractions)}")
    total = float(sum(fractions))
    counts = [0, 0, 0]
    for k in (1, 2):
        counts[k] = round(fractions[k] / total * num_volumes)
        if fractions[k] > 0 and counts[k] == 0 and num_volumes >= 3:
            counts[k] = 1
    counts[2] = min(counts[2], num_volumes - counts[1])
    counts[0] = num_volumes - counts[1] - counts[2]
    if fractions[0] == 0 and counts[0] > 0:  # no train split wanted: the rest goes to test (or val)
        counts[2 if fractions[2] > 0 else 1] += counts[0]
        counts[0] = 0
    labels = [name for name, count in zip(SPLITS, counts) for _ in range(count)]
    order = np.random.default_rng([int(seed), 0x5B11]).permutation(num_volumes)
    return [labels[int(position)] for position in np.argsort(order)]


def _choices(value: object) -> list:
    """A list / tuple of per-volume choices as a list; one value (a number or a name) as a one-item list."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _earlier_volumes(output: Path) -> list[str]:
    """The volumes (``split/name.h5``) that ``output/manifest.json``, an earlier run's, lists; none where there is
    no manifest or it cannot be read. Entries of another form (a hand-edited manifest) are left out, so that no
    name in it can reach a file outside the split folders."""
    try:
        manifest = json.loads((output / "manifest.json").read_text(encoding="utf-8"))
        files = [volume["file"] for volume in manifest["volumes"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [file for file in files if isinstance(file, str) and _VOLUME_FILE.fullmatch(file)]


def _check_no_split_leak(output: Path, names: list[str], replaced: Collection[str] = ()) -> None:
    """ValueError when a volume about to be written already exists in another split folder of ``output`` (an earlier
    run with another volume count or split), other than as one of the ``replaced`` volumes (``split/name.h5``, an
    earlier run's that this run deletes): the same volume would then be in two splits, e.g. train and val."""
    for name in names:
        split, file = name.split("/")
        elsewhere = [other for other in SPLITS if other != split and f"{other}/{file}" not in replaced
                     and (output / other / file).exists()]  # fmt: skip
        if elsewhere:
            raise ValueError(f"{output / name}: {elsewhere[0]}/{file} already exists (an earlier run into this "
                             f"folder?): the volume would be in two splits; use an empty output folder")


def simulate_dataset(
    output_dir: os.PathLike | str,
    num_volumes: int,
    coils: int | Sequence[int] = 8,
    *,
    snr_db: float | Sequence[float] = 30.0,
    slices: int = 16,
    encoded_size: tuple[int, int] = (640, 368),
    recon_size: tuple[int, int] = (320, 320),
    contrast: str = "mixed",
    orientation: str = "mixed",
    source: str | Sequence[str] = "mni152",
    split: Sequence[float] = (0.7, 0.15, 0.15),
    noise_correlation: float = 0.5,
    field_strength_t: float | None = None,
    random_contrast: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Write ``num_volumes`` simulated volumes to ``output_dir/{train,val,test}/`` and ``output_dir/manifest.json``.

    Volume ``i`` has seed :func:`volume_seed` ``(seed, i)``; its coil count and SNR are drawn from ``coils`` /
    ``snr_db`` when those are sequences (a training set with variety), and so is its source subject when ``source``
    is a sequence (repeat a name to weight it), so a dataset is reproducible volume by volume. Files are named
    ``<source>_s<seed>_<i:04d>.h5`` and written atomically.

    Args:
        output_dir: destination folder (created). It is made to hold this dataset: files of the same names are
            replaced, and the volumes that an earlier run's ``manifest.json`` there lists and this run does not
            write (a larger ``num_volumes``, another seed, split or source) are deleted first, so the folder never
            mixes two datasets. Other files are kept; a volume of those (an interrupted earlier run's, which left
            no manifest) in another split folder than this run puts it is a ValueError (it would be in two splits).
        num_volumes: number of volumes ``N ≥ 1``.
        coils: coil count, or a sequence of counts to draw from per volume.
        snr_db: SNR in dB (``inf`` for none), or a sequence to draw from per volume.
        source: a source name (see :data:`reconkit.data.simulate.SOURCES`), or a sequence to draw from per volume.
        slices, encoded_size, recon_size, contrast, orientation, noise_correlation, field_strength_t, random_contrast:
            as for :func:`reconkit.data.simulate.simulate_volume`.
        split: train / val / test fractions (by volume; see :func:`split_assignment`).
        seed: dataset seed.
        progress: show a progress bar.

    Returns:
        The manifest: ``{"seed", "options", "volumes": [{"file", "split", "seed", "params"}, ...]}``.
    """
    if num_volumes < 1:
        raise ValueError(f"num_volumes must be at least 1, got {num_volumes}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    source_choices = [str(s) for s in _choices(source)]
    unknown = sorted(set(source_choices) - set(SOURCES))
    if not source_choices or unknown:
        raise ValueError(f"source needs names from {', '.join(SOURCES)}; got {source_choices}")
    labels = split_assignment(num_volumes, split, seed)
    coil_choices, snr_choices = [int(c) for c in _choices(coils)], [float(s) for s in _choices(snr_db)]
    if not coil_choices or not snr_choices:
        raise ValueError(f"coils and snr_db need at least one value each, got {coil_choices} and {snr_choices}")
    if any(np.isnan(snr) for snr in snr_choices):
        raise ValueError(f"snr_db must be numbers in dB ('inf' for no noise), got {snr_choices}")
    # before any folder is made or volume written (a source that cannot be cut in `orientation` failed mid-run)
    _check_sizes(encoded_size, recon_size, min(coil_choices), slices)
    _check_options(source_choices, contrast, orientation, field_strength_t, noise_correlation, random_contrast)
    output = Path(output_dir)
    problem = folder_problem(output)  # a file, a read-only folder, a link to nothing ("File exists" from mkdir)
    if problem is not None:
        raise ValueError(f"{output}: the output cannot be written: {problem}")
    output.mkdir(parents=True, exist_ok=True)  # fails now, not after the first volume, if it cannot be a folder
    options = {
        "coils": coil_choices, "snr_db": snr_choices, "slices": slices, "encoded_size": list(encoded_size),
        "recon_size": list(recon_size), "contrast": contrast, "orientation": orientation, "source": source_choices,
        "split": list(split), "noise_correlation": noise_correlation, "field_strength_t": field_strength_t,
        "random_contrast": random_contrast,
    }  # fmt: skip
    plan = []
    for index in range(num_volumes):
        vseed = volume_seed(seed, index)
        pick = np.random.default_rng(vseed)
        coil_index, snr_index = int(pick.integers(len(coil_choices))), int(pick.integers(len(snr_choices)))
        # drawn after coils and SNR so a single-source dataset stays the one earlier versions wrote
        volume_source = source_choices[int(pick.integers(len(source_choices))) if len(source_choices) > 1 else 0]
        plan.append((index, vseed, coil_index, snr_index, volume_source,
                     f"{labels[index]}/{volume_source}_s{seed}_{index:04d}.h5"))
    names = [name for *_, name in plan]
    replaced = set(_earlier_volumes(output)) - set(names)  # the dataset this run replaces, not to be mixed in
    _check_no_split_leak(output, names, replaced)  # first: a refused run deletes nothing
    for earlier in replaced:
        (output / earlier).unlink(missing_ok=True)
    # an earlier run's manifest would describe the volumes this run replaces: a run stopped part-way (Ctrl-C, a
    # full disk) leaves none, rather than one whose parameters are no longer those of the files
    (output / "manifest.json").unlink(missing_ok=True)
    entries = []
    desc = f"simulate {'+'.join(dict.fromkeys(source_choices))}"
    for index, vseed, coil_index, snr_index, volume_source, name in tqdm(plan, desc=desc, unit="vol",
                                                                          disable=not progress):
        volume = simulate_volume(
            vseed, source=volume_source, coils=coil_choices[coil_index],
            snr_db=snr_choices[snr_index], slices=slices, encoded_size=encoded_size,
            recon_size=recon_size, contrast=contrast, orientation=orientation, field_strength_t=field_strength_t,
            noise_correlation=noise_correlation, random_contrast=random_contrast,
        )  # fmt: skip
        write_volume(volume, output / name)
        entries.append({"file": name, "split": labels[index], "seed": vseed, "params": volume.params})
    manifest = {"seed": int(seed), "num_volumes": int(num_volumes), "options": options, "volumes": entries}
    with atomic_path(output / "manifest.json") as tmp:
        tmp.write_text(json_text(manifest, indent=1))
    return manifest
