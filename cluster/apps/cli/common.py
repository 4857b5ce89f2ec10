"""What every `defectflow` command shares: the Typer app, the console, clear errors, progress
bars, the settings every command reads, and the options that override them."""

from __future__ import annotations

import faulthandler
import signal
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

app = typer.Typer(
    help="defectflow: streaming visual defect inspection (DifferNet on Ray + Redis streams).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)  # messages, progress
stdout = Console()  # tables asked for


@app.callback()
def main() -> None:
    """Train and run defect inspection on factory lines."""
    # `kill -USR1 PID` prints every thread's stack to stderr: where a stuck command waits.
    try:
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    except (OSError, ValueError):  # stderr is no file (a test's runner): nowhere to print
        pass


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a clear error (no traceback) and return the exit to raise."""
    # Messages name files: printed literally (a "[" in a name is not markup) and unwrapped, so a
    # path in an error can be copied whole.
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def warn_skip(path: Path, reason: str) -> None:
    console.print(f"[yellow]skipped[/] {escape(reason)}", soft_wrap=True)


@contextmanager
def progress_bars():
    """A ``progress(task, done, total)`` callback drawing one Rich bar per task."""
    with Progress(
        TextColumn("{task.description:>8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bars:
        tasks: dict[str, int] = {}

        def update(task: str, done: int, total: int) -> None:
            if task not in tasks:
                tasks[task] = bars.add_task(task, total=total)
            bars.update(tasks[task], completed=done, total=total)

        yield update


DEVICE = typer.Option("auto", help="auto (CUDA when there is a GPU) | cpu | cuda | cuda:N")
RUNTIME = typer.Option(
    "torch", help="torch | onnx | openvino: the latter run the model's export (defectflow export)"
)


REDIS_URL = typer.Option(
    None,
    "--redis",
    help="redis://, rediss:// or unix:// URL [default: DEFECTFLOW_REDIS_URL, else embedded]",
)
RAY_ADDRESS = typer.Option(
    None, help="existing Ray cluster, e.g. auto [default: DEFECTFLOW_RAY_ADDRESS, else a local Ray]"
)


def load_cli_settings(config: Path | None, **overrides):
    """Settings from ``config`` and the environment, the options given on the command line
    (those not None) on top; a wrong value is a clear error."""
    from cluster.runtime.settings import ConfigError, load_settings

    try:
        settings = load_settings(config)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    return settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})


CONFIG = typer.Option(None, "--config", help="YAML settings (as for `defectflow run`)")
DASHBOARD_TOKENS = typer.Option(
    None,
    "--tokens",
    envvar="DEFECTFLOW_DASHBOARD_TOKENS",
    help="QA token file (`defectflow qa-token`): every request needs a token [default: one "
    "token for this session, for labelling; reads open, this machine only]",
)


def dashboard_tokens(path: Path | None):
    """The dashboard's tokens: the file's, or one for this session (printed)."""
    from cluster.apps.dashboard.tokens import QaTokens, TokenFileError

    if path is not None:
        try:
            return QaTokens.load(path)
        except TokenFileError as exc:
            raise fail(str(exc)) from None
    tokens, token = QaTokens.session()
    console.print(f"labelling token for this session (or use --tokens FILE): {token}")
    return tokens


DATA_DIR = typer.Option(None, "--data-dir", help="state folder (e.g. demo-out after a demo)")


@contextmanager
def qa_session(config: Path | None, redis_url: str | None, data_dir: Path | None):
    """Settings and ``redis_of(line)``, a client for a line's Redis (None: the top level's);
    an embedded server started here is stopped on exit. A wrong URL or password is one clear
    error."""
    from cluster.runtime.line_redis import LineRedis
    from cluster.transport.connection import RedisUnavailable

    settings = load_cli_settings(config, redis_url=redis_url, data_dir=data_dir)
    try:
        with LineRedis(settings) as redis_of:
            yield settings, redis_of
    except RedisUnavailable as exc:
        raise fail(str(exc)) from None
