"""reconkit: deep-learning MRI reconstruction toolkit.

Subpackages, with imports flowing one way (left imports nothing to its right)::

    errors, ops, metrics  <-  data, models  <-  training, export  <-  cli, serve
"""

__version__ = "0.1.0"

from reconkit.errors import DataError, ReconkitError

__all__ = ["DataError", "ReconkitError", "__version__"]
