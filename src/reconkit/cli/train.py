"""``reconkit train``: Lightning fit / validate / test / predict from YAML configs (see ``--help``)."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

from reconkit.errors import ReconkitError, printable


def main(argv: Sequence[str]) -> int:
    """Run ``reconkit train <subcommand> [options]``; returns the exit status.

    Example: ``reconkit train fit --config configs/varnet_sim_small.yaml --data.data_path data/sim_small``.
    """
    from torch.multiprocessing import ProcessRaisedException  # torch and Lightning only when training runs

    from reconkit.training.cli import run_cli

    try:
        run_cli(list(argv))
    except ReconkitError as err:
        print(f"reconkit train: {one_line(err)}", file=sys.stderr)
        return 1
    except ProcessRaisedException as err:  # --trainer.strategy ddp_spawn: a rank's error comes back as its traceback
        message = _spawned_reconkit_error(str(err))
        if message is None:
            raise
        print(f"reconkit train: {message}", file=sys.stderr)
        return 1
    except ValueError as err:  # jsonargparse wraps an error raised while building the model or data module
        cause = _reconkit_cause(err)
        if cause is None:
            raise
        print(f"reconkit train: {one_line(cause)}", file=sys.stderr)
        return 1
    except SystemExit as exit_:  # --help, or an argument error already printed by the parser
        return exit_.code if isinstance(exit_.code, int) else 1
    return 0


def _reconkit_cause(err: BaseException) -> ReconkitError | None:
    """The ReconkitError an exception was raised from, if any (jsonargparse re-raises what a class's constructor
    raised as a ValueError listing every type it tried)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ReconkitError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _spawned_reconkit_error(traceback_text: str) -> str | None:
    """The one-line message of the :class:`ReconkitError` whose traceback ``traceback_text`` is (what a process that
    ``torch.multiprocessing.spawn`` started hands back, as text: the exception object stays in that process), or
    None when its last line is another exception's."""
    found = re.match(r"([\w.]+)\.(\w+): (.*)", traceback_text.strip().splitlines()[-1])
    if found is None:
        return None
    module, name, message = found.groups()
    cls = getattr(sys.modules.get(module), name, None)
    return printable(message) if isinstance(cls, type) and issubclass(cls, ReconkitError) else None


def one_line(err: ReconkitError) -> str:
    """The message of ``err``, control characters escaped (:func:`reconkit.errors.printable`); for one raised in a
    DataLoader worker process, which the loader re-raises with the worker's whole traceback in the message, the
    original one-line message at its end."""
    text = printable(err)
    if "Original Traceback" not in text:
        return text
    return re.sub(r"^[\w.]*(Error|Exception): ", "", text.strip().splitlines()[-1])
