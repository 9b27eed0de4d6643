"""``reconkit export``: checkpoint → ONNX (MatMul FFT inside the graph), optionally into a Triton model repository."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from reconkit.atomic import folder_problem
from reconkit.errors import ReconkitError, printable

__all__ = ["build_parser", "main"]

EXAMPLE = """examples:
  reconkit export --checkpoint checkpoints/varnet_small.ckpt --output varnet.onnx --size 640 368 --size 640 372
  reconkit export --checkpoint checkpoints/varnet_small.ckpt --output varnet.onnx --size 320 320 \\
      --triton-repository models --model-name varnet

One graph branch is traced per --size (height = readout, width = phase-encode); the file picks the branch from the
input's shape. Batch and coil counts stay dynamic. See docs/export.md.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reconkit export", epilog=EXAMPLE,
        description=__doc__ and __doc__.split("\n")[0].split(": ", 1)[1],  # None under python -OO
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint readable by reconkit.models.load_model")
    parser.add_argument("--output", required=True, type=Path, help="ONNX file to write")
    parser.add_argument("--size", nargs=2, type=int, action="append", metavar=("H", "W"),
                        help="spatial size the graph serves; repeat for several (default: 640 368)")
    parser.add_argument("--coils", type=int, default=4, help="coil count used for tracing (the graph accepts any; default 4)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 up to the newest this PyTorch exports, 23 with PyTorch 2.14 (default 17: ONNX Runtime 1.15 and later run it; a newer opset needs a newer runtime, e.g. 23 needs 1.23 or later)")
    parser.add_argument("--triton-repository", type=Path, help="also write a Triton model repository here")
    parser.add_argument("--model-name", "--name", dest="model_name",
                        help="model name in the Triton repository (default: the output file's stem)")
    parser.add_argument("--version", type=int, default=1,
                        help="model version in the Triton repository, 1 to 999999999 (default 1)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="Triton max_batch_size (default 8)")
    return parser


def _check_arguments(args: argparse.Namespace, sizes: list[tuple[int, int]]) -> None:
    """ReconkitError / ValueError naming the option, path or checkpoint for what cannot work, before any export."""
    from reconkit.export.onnx_export import check_export_options, load_checkpoint_model

    bad = [f"{h} {w}" for h, w in sizes if min(h, w) < 2]
    if bad:
        raise ReconkitError(f"--size {bad[0]}: height and width must be at least 2")
    if args.coils < 1:
        raise ReconkitError(f"--coils {args.coils}: must be at least 1")
    if args.triton_repository is not None:
        from reconkit.export.triton_repository import check_triton_options

        if args.triton_repository.exists() and not args.triton_repository.is_dir():
            raise ReconkitError(f"--triton-repository {args.triton_repository}: is not a directory")
        problem = folder_problem(args.triton_repository)
        if problem:
            raise ReconkitError(f"--triton-repository {args.triton_repository}: {problem}")
        check_triton_options(args.model_name or args.output.stem, args.version, args.max_batch_size)
    check_export_options(args.output, args.checkpoint, args.opset)
    problem = folder_problem(args.output.parent)
    if problem:
        raise ReconkitError(f"--output {args.output}: {problem}")
    load_checkpoint_model(args.checkpoint)  # and again by export_onnx: a bad checkpoint is refused before any export


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from reconkit.export import export_onnx, load_onnx_metadata

    sizes = [tuple(s) for s in (args.size or [(640, 368)])]
    try:
        _check_arguments(args, sizes)  # all of them before the (minutes-long) export
    except (ReconkitError, ValueError) as exc:  # exit 2, as every command refuses what cannot work before any work
        print(f"reconkit export: error: {exc}", file=sys.stderr)
        return 2
    try:
        path = export_onnx(args.checkpoint, args.output, [(args.coils, h, w) for h, w in sizes], opset=args.opset)
        meta = load_onnx_metadata(path)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {meta['reconkit.model_type']}, "
              f"sizes {meta['reconkit.spatial_sizes']}, opset {args.opset}")
        if args.triton_repository is not None:
            from reconkit.export.triton_repository import write_triton_repository

            name = args.model_name or path.stem
            written = write_triton_repository(path, args.triton_repository, name, version=args.version,
                                              max_batch_size=args.max_batch_size)
            print(f"wrote Triton model {name!r} version {args.version} under {written}")
    except (ReconkitError, ValueError) as exc:
        print(f"reconkit export: error: {printable(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
