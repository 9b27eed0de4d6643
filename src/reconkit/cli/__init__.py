"""The ``reconkit`` command line: one module per sub-command, dispatched by :mod:`reconkit.cli.main`."""
