"""The ``defectflow`` command line."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from schemas import STREAM_MESSAGES

app = typer.Typer(
    help="defectflow: streaming visual defect inspection (DifferNet on Ray + Redis streams).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


@app.callback()
def main() -> None:
    """Train and run defect inspection on factory lines."""


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a clear error (no traceback) and return the exit to raise."""
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


@app.command()
def schemas(out: Path = typer.Option(..., "--out", help="folder for the JSON Schema files")):
    """Write the JSON Schema of every stream message, for consumers in other languages."""
    out.mkdir(parents=True, exist_ok=True)
    for message_type in STREAM_MESSAGES:
        path = out / f"{message_type.kind}.v{message_type.schema_version}.schema.json"
        path.write_text(json.dumps(message_type.entry_json_schema(), indent=2) + "\n")
        console.print(f"wrote {path}")


if __name__ == "__main__":
    app()
