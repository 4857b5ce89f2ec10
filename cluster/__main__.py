"""`python -m cluster` runs the `defectflow` command line."""

from cluster.cli import app

app()
