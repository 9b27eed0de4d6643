"""Discovery of a Triton-layout model repository: ``DIR/<name>/<version>/model.onnx`` (+ ``DIR/<name>/config.pbtxt``).

Only directories whose names pass :data:`MODEL_NAME` / numeric versions are served, and only what is found at
start-up: names and versions from request URLs are looked up in the table built here and never touch the
filesystem. ``config.pbtxt`` (optional) is read for the fields the server uses, with Triton's meanings:

* ``max_batch_size`` (absent = 0 = requests run one by one, no batching),
* ``dynamic_batching { max_queue_delay_microseconds, default_queue_policy { max_queue_size } }``
  (batching happens only when the block is present),
* ``instance_group [ { count } ]`` (number of concurrent executions per model).

Without ``config.pbtxt`` the server's defaults (:class:`BatchingConfig` from the CLI) apply.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

from reconkit.errors import DataError, ReconkitError, check_number
from reconkit.serve.pbtxt import PbtxtError, first, parse_pbtxt

__all__ = ["MODEL_NAME", "BatchingConfig", "ModelEntry", "discover_models"]

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_VERSION = re.compile(r"^[1-9][0-9]{0,8}$")
_log = logging.getLogger("reconkit.serve")


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
    """How requests for one model are queued and batched.

    max_batch_size: largest batch run at once (0: no batching, each request runs alone).
    dynamic: whether concurrent requests with equal non-batch shapes are merged into one batch.
    max_queue_delay_s: how long the first queued request may wait for others to join its batch (seconds).
    max_queue_size: requests waiting at most; more are refused with 503.
    instances: executions of the model that may run at the same time.

    Raises :class:`~reconkit.errors.ConfigError` naming the field unless ``max_batch_size`` is an integer >= 0,
    ``max_queue_delay_s`` a finite number >= 0, and ``max_queue_size`` and ``instances`` integers >= 1.
    """

    max_batch_size: int = 8
    dynamic: bool = True
    max_queue_delay_s: float = 0.0
    max_queue_size: int = 64
    instances: int = 1

    def __post_init__(self) -> None:
        check_number("BatchingConfig.max_batch_size", self.max_batch_size, 0, integer=True)
        check_number("BatchingConfig.max_queue_delay_s", self.max_queue_delay_s, 0)
        check_number("BatchingConfig.max_queue_size", self.max_queue_size, 1, integer=True)
        check_number("BatchingConfig.instances", self.instances, 1, integer=True)


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One servable model version found in the repository."""

    name: str
    version: str
    onnx_path: Path
    batching: BatchingConfig


def _batching_from_config(path: Path, name: str, defaults: BatchingConfig) -> BatchingConfig:
    try:
        config = parse_pbtxt(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, PbtxtError) as exc:
        raise DataError(path, f"cannot read Triton model configuration: {exc}") from exc
    declared = first(config, "name")
    if declared is not None and declared != name:
        raise DataError(path, f"config names model {declared!r} but its directory is {name!r}")

    def message(parent: dict, field: str) -> dict | None:
        """A nested message field (``field { ... }``), or None when absent."""
        value = first(parent, field)
        if value is not None and not isinstance(value, dict):
            raise DataError(path, f"{field} must be a message ({field} {{ ... }}), got {value!r}")
        return value

    def count(parent: dict, field: str, default: int) -> int:
        """A non-negative integer field (Triton's are uint / int), ``default`` when absent."""
        value = first(parent, field, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DataError(path, f"{field} must be a non-negative integer, got {value!r}")
        return value

    max_batch_size = count(config, "max_batch_size", 0)
    dynamic = message(config, "dynamic_batching")
    groups = config.get("instance_group", [])
    if not all(isinstance(group, dict) for group in groups):
        raise DataError(path, "instance_group must be a list of messages ([ { count: N }, ... ])")
    instances = sum(count(group, "count", 1) for group in groups) if groups else 1
    if instances < 1:
        raise DataError(path, "instance_group counts must add up to at least 1")
    queue_delay_s, queue_size = defaults.max_queue_delay_s, defaults.max_queue_size
    if dynamic is not None:
        queue_delay_s = count(dynamic, "max_queue_delay_microseconds", 0) / 1e6
        policy = message(dynamic, "default_queue_policy") or {}
        queue_size = count(policy, "max_queue_size", 0) or defaults.max_queue_size  # Triton: 0 = unbounded
    return BatchingConfig(max_batch_size, dynamic is not None and max_batch_size > 0, queue_delay_s, queue_size, instances)


def discover_models(repository: Path | str, defaults: BatchingConfig = BatchingConfig()) -> list[ModelEntry]:
    """Every ``<name>/<version>/model.onnx`` under ``repository``, sorted by name then version.

    Raises ``ReconkitError`` when the directory is missing or holds no servable model, and ``DataError`` for a
    malformed ``config.pbtxt`` or a folder it cannot read (permissions). Directories with invalid names are skipped
    with a warning.
    """
    root = Path(repository)
    if not root.is_dir():
        raise ReconkitError(f"{root}: model repository is not a directory")
    entries = []
    folder = root
    try:  # a folder without read (listing) or execute (stat of what is in it) permission
        for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not MODEL_NAME.match(model_dir.name):
                _log.warning("skipping model directory with an invalid name", extra={"path": str(model_dir)})
                continue
            folder = model_dir
            config_path = model_dir / "config.pbtxt"
            has_config = config_path.is_file()
            batching = _batching_from_config(config_path, model_dir.name, defaults) if has_config else defaults
            versions = sorted((p for p in model_dir.iterdir() if _VERSION.match(p.name)), key=lambda p: int(p.name))
            for version_dir in versions:
                folder, onnx_path = version_dir, version_dir / "model.onnx"
                if onnx_path.is_file():
                    entries.append(ModelEntry(model_dir.name, version_dir.name, onnx_path, batching))
    except OSError as exc:
        where = "" if exc.filename in (None, str(folder)) else f" ({exc.filename})"
        raise DataError(folder, f"cannot read the folder: {exc.strerror or exc}{where}") from None
    if not entries:
        raise ReconkitError(f"{root}: no model found; expected the layout <name>/<version>/model.onnx")
    return entries
