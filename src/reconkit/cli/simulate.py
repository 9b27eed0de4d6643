"""``reconkit simulate``: write simulated fastMRI-schema multi-coil HDF5 volumes (train/val/test splits)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from reconkit.atomic import folder_problem
from reconkit.errors import ReconkitError, printable

EXAMPLES = """\
examples:
  # 12 small volumes for fast CPU training, 4-16 coils, SNR 20-40 dB, split 70/15/15 by volume
  reconkit simulate --output data/sim_small --num-volumes 12 --coils 4 8 16 --snr-db 20 30 40 \\
      --encoded-size 320 184 --recon-size 160 160 --slices 16 --seed 0

  # knee-sized files (640 x 368 encoded -> 320 x 320), 15 coils, T2 only
  reconkit simulate --output data/sim_full --num-volumes 4 --coils 15 --contrast t2

  # held-out subject (real b0 images from dipy), all volumes in test/
  reconkit simulate --output data/sim_heldout --num-volumes 4 --coils 8 --source dipy_b0 --split 0 0 1
"""


def build_parser() -> argparse.ArgumentParser:
    from reconkit.data.simulate.anatomy import SOURCES

    parser = argparse.ArgumentParser(
        prog="reconkit simulate",
        description="Simulate multi-coil Cartesian k-space from real MRI images and write fastMRI HDF5 files "
        "(kspace, reconstruction_rss, ismrmrd_header, attrs) into OUTPUT/{train,val,test}/ plus "
        "OUTPUT/manifest.json with every volume's parameters. See docs/data.md.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", required=True,
                        help="destination folder (created). Re-running into it replaces the dataset its manifest.json "
                             "lists: files of the same names are rewritten and the earlier run's other volumes "
                             "deleted (fewer volumes, another seed or split), so the folder never mixes two "
                             "datasets. Other files are kept, with a warning (training would read them too); one "
                             "of them in another split than this run puts it is refused (it would be in two "
                             "splits)")
    parser.add_argument("--num-volumes", type=int, required=True, help="number of volumes (files) to write")
    parser.add_argument(
        "--coils",
        type=int,
        nargs="+",
        default=[8],
        help="receive coil count; several values = one drawn per volume (default: 8)",
    )
    parser.add_argument(
        "--encoded-size",
        type=int,
        nargs=2,
        default=[640, 368],
        metavar=("H", "W"),
        help="k-space size: readout H (oversampled) x phase-encode W, both even (default: 640 368)",
    )
    parser.add_argument(
        "--recon-size",
        type=int,
        nargs=2,
        default=[320, 320],
        metavar=("h", "w"),
        help="reconstruction_rss size, the centre crop (default: 320 320)",
    )
    parser.add_argument(
        "--slices", type=int, default=16,
        help="slices per volume, at most what the source holds (dipy_b0 10, the single-image pydicom_* sources 1; a "
             "note: line says when volumes have fewer; default: 16)",
    )
    parser.add_argument(
        "--snr-db",
        type=float,
        nargs="+",
        default=[30.0],
        help="SNR in dB (mean object RSS / noise std per coil), 'inf' for no noise; several values "
        "= one drawn per volume (default: 30)",
    )
    parser.add_argument(
        "--noise-correlation",
        type=float,
        default=0.5,
        help="noise coupling strength rho in [0, 1): coils d mm apart correlate by about "
        "rho*exp(-d/loop diameter), neighbours ~rho/e (default: 0.5)",
    )
    parser.add_argument(
        "--contrast",
        choices=["t1", "t2", "pd", "mixed"],
        default="mixed",
        help="weighting synthesised from tissue maps (mni152 only; default: mixed)",
    )
    parser.add_argument(
        "--random-contrast",
        type=float,
        default=0.0,
        metavar="P",
        help="contrast randomisation for training sets: probability that an mni152 volume gets random tissue "
        "intensities instead of its protocol's (SynthSeg-style domain randomisation; default: 0)",
    )
    parser.add_argument(
        "--orientation",
        choices=["axial", "coronal", "sagittal", "mixed"],
        default="mixed",
        help="slice orientation (mni152 any; the real-image sources only the plane their slices show: pydicom_shoulder "
        "sagittal, the others axial; default: mixed)",
    )
    parser.add_argument(
        "--field-strength",
        type=float,
        choices=[1.5, 3.0],
        default=None,
        help="B0 in tesla for the relaxation times (default: drawn per volume)",
    )
    parser.add_argument(
        "--source",
        choices=list(SOURCES),
        default="mni152",
        nargs="+",
        metavar="SOURCE",
        help="source images (" + ", ".join(SOURCES) + "), one drawn per volume when several are given "
        "(repeat one to weigh it double): mni152 = template brain with synthesised contrasts (nilearn), "
        "nibabel_epi / pydicom_abdomen / pydicom_liver / pydicom_shoulder = real EPI brain / abdominal / shoulder "
        "images for training, "
        "dipy_b0 / pydicom_mr = real images of other subjects for held-out tests (default: mni152)",
    )
    parser.add_argument(
        "--split",
        type=float,
        nargs=3,
        default=[0.7, 0.15, 0.15],
        metavar=("TRAIN", "VAL", "TEST"),
        help="fractions of volumes per split (default: 0.7 0.15 0.15)",
    )
    parser.add_argument("--seed", type=int, default=0, help="dataset seed; same seed, same files (default: 0)")
    parser.add_argument("--no-progress", action="store_true",
                        help="do not show a progress bar (none is shown when stderr is not a terminal, e.g. a log)")
    return parser


def _warn_of_other_volumes(output: Path, manifest: dict) -> None:
    """A ``warning:`` line for the volume files in ``output``'s split folders that this run did not write (not in an
    earlier run's manifest: an interrupted run's, or a user's own), which training would read with the dataset."""
    from reconkit.data.simulate.dataset import SPLITS
    from reconkit.data.slice_dataset import list_volume_files

    written = {output / volume["file"] for volume in manifest["volumes"]}
    others = [file for split in SPLITS if (output / split).is_dir()
              for file in list_volume_files(output / split) if file not in written]  # fmt: skip
    if others:
        print(printable(f"warning: {output} also holds {len(others)} volume file(s) this run did not write (the first: "
                        f"{others[0]}); training on it reads them too"), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    from reconkit.data.simulate import simulate_dataset

    # a missing output's nearest existing parent (an existing output: simulate_dataset's checks)
    problem = None if Path(args.output).exists() else folder_problem(args.output)
    if problem:  # before any work, as the checks below; an OSError after it is a write that failed during the run
        print(f"reconkit simulate: error: --output {args.output}: {problem}", file=sys.stderr)
        return 2
    try:
        manifest = simulate_dataset(
            args.output, args.num_volumes, args.coils, snr_db=args.snr_db, slices=args.slices,
            encoded_size=tuple(args.encoded_size), recon_size=tuple(args.recon_size), contrast=args.contrast,
            orientation=args.orientation, source=args.source, split=args.split,
            noise_correlation=args.noise_correlation, field_strength_t=args.field_strength,
            random_contrast=args.random_contrast, seed=args.seed,
            progress=not args.no_progress and sys.stderr.isatty(),  # as reconstruct's: no bars in a CI log
        )  # fmt: skip
    except (ValueError, ReconkitError) as error:  # option values and the output folder, checked before any volume
        print(f"reconkit simulate: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a write that failed during the run (a full disk): the work failed, exit 1
        print(f"reconkit simulate: error: {error}", file=sys.stderr)
        return 1
    fewer = {v["params"]["source"]: v["params"]["slices"] for v in manifest["volumes"]
             if v["params"]["slices"] < args.slices}
    for source, slices in fewer.items():
        print(f"note: source {source} holds {slices} slice(s) in this orientation; its volumes have {slices}, "
              f"not --slices {args.slices}", file=sys.stderr)
    _warn_of_other_volumes(Path(args.output), manifest)
    counts = {name: sum(v["split"] == name for v in manifest["volumes"]) for name in ("train", "val", "test")}
    print(
        f"wrote {len(manifest['volumes'])} volume(s) to {args.output} "
        f"(train {counts['train']}, val {counts['val']}, test {counts['test']}); manifest.json lists them"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
