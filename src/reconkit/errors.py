"""One error type for everything reconkit reports about bad input, and one warning type for what it works around."""

from __future__ import annotations

import math
import numbers
import os
import warnings


class ReconkitError(Exception):
    """Base class for errors reconkit raises about user input (files, checkpoints, requests)."""


class DataError(ReconkitError):
    """A data file is corrupt, truncated, empty or does not follow the expected schema.

    The message always names the file and the problem, in one line::

        DataError("/data/file1000.h5", "missing dataset 'kspace'")
        -> "/data/file1000.h5: missing dataset 'kspace'"
    """

    def __init__(self, path: os.PathLike | str | None, problem: str | None = None):
        if problem is None:
            # one argument: a whole message, as a DataLoader re-raises a worker's exception (exc_type(message));
            # without this form it would re-raise a plain RuntimeError
            path, problem = None, str(path)
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{self.path}: {problem}")


class ConfigError(ReconkitError, ValueError):
    """An argument or option value that cannot work (e.g. a centre fraction of 1.5); raised when the object is built,
    before any work starts, and printed by the CLI in one line."""


def check_number(name: str, value: object, minimum: float, *, integer: bool = False, strict: bool = False) -> None:
    """Raise :class:`ConfigError` naming ``name`` and the allowed range unless ``value`` is a finite number
    ``>= minimum`` (``> minimum`` when ``strict``), and an integer (not a bool) when ``integer``.

    What a configuration dataclass's ``__post_init__`` calls for each numeric field, so that a value nothing could
    use is refused where it is given, not deep in the code that uses it.

    Example:
        >>> check_number("BatchingConfig.instances", 0, 1, integer=True)
        Traceback (most recent call last):
        ...
        reconkit.errors.ConfigError: BatchingConfig.instances must be an integer >= 1, got 0
    """
    kind = "an integer" if integer else "a finite number"
    allowed = f"{kind} {'>' if strict else '>='} {minimum:g}"
    number = not isinstance(value, bool) and isinstance(value, numbers.Integral if integer else numbers.Real)
    if not (number and math.isfinite(value) and (value > minimum if strict else value >= minimum)):
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")


class ReconkitWarning(UserWarning):
    """Input reconkit could handle, but not in the usual way (e.g. a slower path); the CLI prints it in one line
    (:func:`format_warning`)."""


_BIDI = (*range(0x202A, 0x202F), *range(0x2066, 0x206A))  # embeddings, overrides, isolates: reorder what follows
_ESCAPED = str.maketrans({chr(code): chr(code).encode("unicode_escape").decode("ascii")
                          for code in (*range(0x20), *range(0x7F, 0xA0), *_BIDI)
                          if chr(code) not in "\n\t"})  # fmt: skip


def printable(text: object) -> str:
    """``str(text)`` with its control characters (C0 but newline and tab, DEL, C1, and Unicode's bidirectional
    embeddings / overrides / isolates, which reorder the text after them) written as Python escapes
    (``"\\x1b"``, ``"\\r"``, ``"\\x07"``): what the CLI prints of a file name, an attribute or a model's metadata
    shows them instead of the terminal obeying them (an ESC sequence that clears the screen or hides a line, an OSC 8
    link, a carriage return that writes over the message).

    Example:
        >>> printable("scan\\x1b[2J.h5: not an HDF5 file")
        'scan\\\\x1b[2J.h5: not an HDF5 file'
        >>> printable("scan_\\u202egpj.h5")  # a right-to-left override would show it as "scan_5h.jpg"
        'scan_\\\\u202egpj.h5'
    """
    return str(text).translate(_ESCAPED)


_python_format_warning = warnings.formatwarning


def format_warning(message, category, filename, lineno, line=None) -> str:
    """``warnings.formatwarning`` of the ``reconkit`` command (in its main process and, through ``reconkit train``,
    its DDP ranks): reconkit's own warnings in one line, ``"warning: <message>\\n"``, as the CLI's other notes; others
    as Python formats them. Control characters (from a file name, an attribute, a model's metadata) are escaped
    (:func:`printable`). The Python API leaves ``warnings.formatwarning`` as it is.

    Example:
        >>> format_warning(ReconkitWarning("scan\\x1b[2J.h5: no 'max' attr"), ReconkitWarning, "x.py", 1)
        "warning: scan\\\\x1b[2J.h5: no 'max' attr\\n"
    """
    if issubclass(category, ReconkitWarning):
        return f"warning: {printable(message)}\n"
    return printable(_python_format_warning(message, category, filename, lineno, line))
