"""`python -m cluster` runs the `defectflow` command line."""

from cluster.apps.cli import app

app()
