"""reconkit: deep-learning MRI reconstruction toolkit.

Subpackages, with imports flowing one way (left imports nothing to its right)::

    errors, atomic, ops, metrics  <-  data, models  <-  io, training, export, inference  <-  serve, cli
"""

__version__ = "0.1.0"

from reconkit.errors import DataError, ReconkitError

__all__ = ["DataError", "ReconkitError", "__version__"]
