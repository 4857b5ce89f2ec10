"""Model lifecycle: `defectflow models list|register|promote|rollback|shadow|compare`, `retrain`."""

from __future__ import annotations

import getpass
import json
import time
from pathlib import Path

import typer
from rich.table import Table

from cluster.apps.cli.common import (
    CONFIG,
    DATA_DIR,
    REDIS_URL,
    app,
    console,
    fail,
    qa_session,
    stdout,
)

models_app = typer.Typer(help="The model registry of a line.", no_args_is_help=True)
app.add_typer(models_app, name="models")

LINE = typer.Option(..., "--line", help="line id")


def _registry(client, line: str):
    from cluster.transport.registry import Registry

    return Registry(client, line)


def _on_registry(line: str, config, redis_url, data_dir, change, keeps_active: bool = False):
    """Run ``change(registry)``; a refusal is a clear error (and says the active model stays)."""
    from cluster.transport.registry import RegistryError

    with qa_session(config, redis_url, data_dir) as (_, redis_of):
        client = redis_of(line)
        try:
            return change(_registry(client, line))
        except RegistryError as exc:
            raise fail(
                f"{exc}; the active model stays active" if keeps_active else str(exc)
            ) from None


@models_app.command("list")
def models_list(
    line: str = LINE,
    as_json: bool = typer.Option(False, "--json"),
    config: Path | None = CONFIG,
    redis_url: str | None = REDIS_URL,
    data_dir: Path | None = DATA_DIR,
):
    """Versions of a line's model: id, status, parent, metrics, threshold."""
    with qa_session(config, redis_url, data_dir) as (_, redis_of):
        client = redis_of(line)
        registry = _registry(client, line)
        versions = registry.versions()
        shadow = registry.shadow_id()
    if as_json:
        for v in versions:
            typer.echo(v.model_dump_json())
        return
    table = Table("id", "status", "parent", "created", "threshold", "val AUROC", "FPR", "path")
    for v in versions:
        status = v.status + (" (shadow)" if v.id == shadow else "")
        table.add_row(
            v.id,
            f"[bold green]{status}[/]" if v.status == "active" else status,
            v.parent or "",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(v.created)),
            f"{v.threshold:.3f}",
            f"{v.metrics['val_auroc']:.3f}" if "val_auroc" in v.metrics else "",
            f"{v.metrics['fpr']:.3f}" if "fpr" in v.metrics else "",
            v.path,
        )
    stdout.print(table)


@models_app.command("register")
def models_register(
    model_dir: Path = typer.Argument(..., help="a model folder (defectflow train --out)"),
    line: str = LINE,
    config: Path | None = CONFIG,
    redis_url: str | None = REDIS_URL,
    data_dir: Path | None = DATA_DIR,
):
    """Add a trained model folder to a line's registry as a candidate."""
    version = _on_registry(line, config, redis_url, data_dir, lambda r: r.register(model_dir))
    typer.echo(version.model_dump_json())


@models_app.command("promote")
def models_promote(
    version_id: str = typer.Argument(..., help="version id (models list)"),
    line: str = LINE,
    config: Path | None = CONFIG,
    redis_url: str | None = REDIS_URL,
    data_dir: Path | None = DATA_DIR,
):
    """Make a version active; scorers change to it between batches."""
    version = _on_registry(
        line, config, redis_url, data_dir, lambda r: r.promote(version_id), keeps_active=True
    )
    console.print(f"line {line}: {version.id} is active")
    typer.echo(version.model_dump_json())


@models_app.command("rollback")
def models_rollback(
    line: str = LINE,
    config: Path | None = CONFIG,
    redis_url: str | None = REDIS_URL,
    data_dir: Path | None = DATA_DIR,
):
    """Go back to the version that was active before the current one."""
    version = _on_registry(
        line, config, redis_url, data_dir, lambda r: r.rollback(), keeps_active=True
    )
    console.print(f"line {line}: rolled back to {version.id}")
    typer.echo(version.model_dump_json())


@models_app.command("shadow")
def models_shadow(
    version_id: str | None = typer.Argument(None, help="candidate to score in shadow"),
    off: bool = typer.Option(False, "--off", help="stop shadow scoring"),
    line: str = LINE,
    config: Path | None = CONFIG,
    redis_url: str | None = REDIS_URL,
    data_dir: Path | None = DATA_DIR,
):
    """Score a candidate beside the active model (its scores go to shadow-scores:{line})."""
    if off == (version_id is not None):
        raise fail("give a version id, or --off")
    _on_registry(
        line, config, redis_url, data_dir, lambda r: r.set_shadow(None if off else version_id)
    )
    console.print(f"line {line}: " + ("shadow scoring off" if off else f"{version_id} in shadow"))


@models_app.command("compare")
def models_compare(
    line: str = LINE,
    config: Path | None = CONFIG,
    redis_url: str | None = REDIS_URL,
    data_dir: Path | None = DATA_DIR,
):
    """How the shadow candidate agrees with the active model on the same views (and on labels)."""
    from cluster.transport.qa import labels_of, read_scores
    from cluster.transport.streams import Streams
    from workers.line.shadow import compare_scores

    with qa_session(config, redis_url, data_dir) as (_, redis_of):
        client = redis_of(line)
        streams = Streams(line)
        active = read_scores(client, streams.scores)
        shadow = read_scores(client, streams.shadow_scores)
        report = compare_scores(active, shadow, labels_of(client, line))
    if report["n_views"] == 0:
        raise fail(f"line {line}: no view scored by both models yet (is a shadow set?)")
    typer.echo(json.dumps(report))


@app.command()
def retrain(
    line: str = LINE,
    wait: bool = typer.Option(True, help="wait for the trainer's outcome"),
    timeout: float = typer.Option(1800, help="seconds to wait"),
    config: Path | None = CONFIG,
    redis_url: str | None = REDIS_URL,
    data_dir: Path | None = DATA_DIR,
):
    """Ask the line's trainer (running under `defectflow run`) to retrain from QA's labels now."""
    from cluster.transport.bus import StreamBus
    from cluster.transport.streams import Streams
    from schemas import RetrainOutcome, RetrainRequest

    streams = Streams(line)
    with qa_session(config, redis_url, data_dir) as (_, redis_of):
        bus = StreamBus(redis_of(line))
        newest = bus.newest(streams.model_events, RetrainOutcome)
        after = newest[0][0] if newest else "0"
        bus.publish(
            streams.retrain_requests,
            RetrainRequest(line=line, by=getpass.getuser(), at=time.time()),
        )
        console.print(f"line {line}: retraining requested")
        if not wait:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = bus.wait(streams.model_events, RetrainOutcome, after, block_ms=1000, count=1)
            if events:
                [(_, outcome)] = events
                typer.echo(outcome.model_dump_json())
                if outcome.outcome in ("rejected", "not retrained"):
                    raise fail(f"{outcome.outcome}: {outcome.why}", code=2)
                return
        raise fail(f"no outcome within {timeout:.0f} s (is `defectflow run` running the line?)")
