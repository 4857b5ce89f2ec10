"""The ``defectflow`` command line: one module per command group, each adding its commands to
the one Typer app of ``common`` (which imports none of them)."""

from cluster.apps.cli import frontend, line, models, ops, qa, scorer  # noqa: F401  (registers)
from cluster.apps.cli.common import app

__all__ = ["app"]
