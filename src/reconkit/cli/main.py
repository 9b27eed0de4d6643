"""``reconkit`` entry point: dispatches to one module per sub-command.

Each sub-command lives in ``reconkit/cli/<name>.py`` and exposes ``main(argv: list[str]) -> int``; its own
``--help`` explains its options with an example. Modules are imported only when their command runs, so
``reconkit --help`` is fast.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence

from reconkit.errors import format_warning

# name -> (module, one-line summary). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("reconkit.cli.simulate", "write simulated fastMRI-schema multi-coil HDF5 volumes from real MRI images"),
    "train": ("reconkit.cli.train", "train / validate / test / predict with Lightning (LightningCLI, YAML configs)"),
    "export": ("reconkit.cli.export", "export a checkpoint to ONNX (FFT inside the graph) or a Triton model repository"),
    "reconstruct": ("reconkit.cli.reconstruct", "reconstruct scan files into HDF5 / NIfTI / DICOM / PNG"),
    "evaluate": ("reconkit.cli.evaluate", "score reconstructions against targets (NMSE / PSNR / SSIM, fastMRI's numbers)"),
    "serve": ("reconkit.cli.serve", "serve ONNX models over the KServe V2 / Open Inference Protocol"),
    "demo": ("reconkit.cli.demo", "simulate a held-out scan, reconstruct it with the bundled model, print a metrics table"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: reconkit <command> [options]",
        "",
        "reconkit: deep-learning MRI reconstruction toolkit.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += [
        "",
        "Run 'reconkit <command> --help' (or 'reconkit help <command>') for the options of a command, with an example.",
        "Exit codes: 0 done, 1 the work failed (in part: the other files were done), 2 bad arguments, a missing",
        "model or an unusable folder (nothing done), 130 / 143 interrupted (README.md).",
        "",
        "examples:",
        "  reconkit simulate --output data/sim --num-volumes 8 --coils 8",
        "  reconkit train fit --config configs/varnet_sim_small.yaml",
        "  reconkit reconstruct scans/*.h5 --model checkpoints/varnet_small.onnx --output out --format h5 png",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``reconkit <command> ...`` on ``argv`` (``sys.argv[1:]`` when None); returns the exit status.

    Warnings print in the CLI's format (:func:`reconkit.errors.format_warning`) while it runs; called from Python
    (``argv`` given) it leaves the caller's ``warnings.formatwarning`` as it found it, as it leaves signal handlers
    and stdout alone. The ``reconkit`` command keeps the CLI's format to the end (warnings at interpreter exit).
    """
    caller_format = warnings.formatwarning
    warnings.formatwarning = format_warning
    try:
        return _run(argv)
    finally:
        if argv is not None:
            warnings.formatwarning = caller_format


def _run(argv: Sequence[str] | None) -> int:
    """:func:`main` after installing the CLI's warning format."""
    args = list(sys.argv[1:] if argv is None else argv)
    if argv is None and hasattr(signal, "SIGPIPE") and (not args or args[0] not in _OWN_SIGPIPE):
        # `reconkit ... | head`: end quietly when the reader goes, as Unix tools do, not with a BrokenPipeError
        # (Windows has no SIGPIPE)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if argv is None and hasattr(sys.stdout, "reconfigure"):
        # a file name that stdout's encoding lacks (Windows' ANSI code page when piped or redirected) is escaped, as
        # on stderr, instead of a UnicodeEncodeError once the work is done
        sys.stdout.reconfigure(errors="backslashreplace")
    if args[:1] == ["help"] and len(args) > 1:  # `reconkit help <command> [sub-command]`: its --help, as git's
        args = [*args[1:], "--help"]
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        from reconkit import __version__

        print(f"reconkit {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"reconkit: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if argv is None and name in _CLEAN_EXIT_ON_SIGTERM:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        sys.unraisablehook = _unraisable
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (the `with` blocks removed their temporary files)
        print(f"reconkit {name}: interrupted", file=sys.stderr)
        return 130


# commands whose temporary files and folders are removed on the way out of their `with` blocks: SIGTERM (a job
# scheduler's stop, `kill`) unwinds them as Ctrl-C does. `train` keeps Lightning's own handling (SLURM requeue).
# `serve` needs it while its models load: as a container's PID 1 (deploy/Dockerfile's exec-form ENTRYPOINT) a
# process ignores signals it has no handler for, so a SIGTERM then was lost and the server went on to serve until
# SIGKILL; once serving, uvicorn's handler takes over for the graceful drain.
_CLEAN_EXIT_ON_SIGTERM = ("simulate", "export", "reconstruct", "evaluate", "demo", "serve")


# commands with sockets or worker processes keep Python's SIGPIPE handling (an error on the write, not an exit)
_OWN_SIGPIPE = ("serve", "train")


class _Terminated(SystemExit):
    """The exit a SIGTERM raises (code 143)."""


def _exit_on_sigterm(signum, frame) -> None:
    raise _Terminated(128 + signum)


def _unraisable(unraisable) -> None:
    """``sys.unraisablehook``: a SIGTERM that arrived inside a finaliser (a ``__del__`` or weakref callback, which
    garbage collection runs anywhere) was printed as "Exception ignored" and the run went on to its end, exit code
    0. The signal is sent again 0.1 s later (from a timer thread), when the finaliser and this hook have returned."""
    if isinstance(unraisable.exc_value, _Terminated):
        resend = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM))
        resend.daemon = True
        resend.start()
    else:
        sys.__unraisablehook__(unraisable)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
