"""`defectflow status`: what a running deployment is doing, from Redis and Ray."""

from __future__ import annotations

import json
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

ACTOR_CLASSES = (
    "CameraIngestActor",
    "DetectMatteActor",
    "ScorerActor",
    "AggregatorActor",
    "TrainerActor",
)


def line_status(client, line: str, cameras: list[str]) -> dict:
    from cluster.transport.bus import StreamBus
    from cluster.transport.registry import Registry
    from cluster.transport.streams import Streams, line_groups

    bus = StreamBus(client)
    streams = Streams(line)
    groups = line_groups(streams, cameras)
    return {
        "streams": {
            name: bus.length(name)
            for name in [s for s, _ in groups] + [streams.verdicts, streams.labels]
        },
        "lag": {f"{stream}/{group}": bus.lag(stream, group) for stream, group in groups},
        "dead_letters": bus.length(streams.dead_letters),
        "active_model": Registry(client, line).active_id(),
        "shadow_model": Registry(client, line).shadow_id(),
    }


def live_actors(ray_address: str) -> list[dict]:
    """defectflow's live actors; Ray's state API is served by the head's dashboard process."""
    import ray
    from ray.util.state import list_actors
    from ray.util.state.exception import RayStateApiException

    ray.init(address=ray_address, logging_level="WARNING")
    try:
        actors = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
    except (RayStateApiException, ConnectionError) as exc:
        raise fail(f"cannot list actors (is the head's dashboard running?): {exc}") from None
    finally:
        ray.shutdown()
    return [
        {"class": a.class_name, "node_id": a.node_id, "pid": a.pid}
        for a in actors
        if a.class_name in ACTOR_CLASSES
    ]


@app.command()
def status(
    ray_address: str | None = typer.Option(None, help="Ray cluster to list live actors of"),
    as_json: bool = typer.Option(False, "--json"),
    config: Path | None = CONFIG,
    redis_url: str | None = REDIS_URL,
    data_dir: Path | None = DATA_DIR,
):
    """Stream lengths, consumer-group lag, dead letters, active models and live actors."""
    from cluster.transport.qa import camera_ids, line_ids
    from cluster.transport.streams import Streams

    with qa_session(config, redis_url, data_dir) as (settings, redis_of):
        configured = {line.id: [c.id for c in line.cameras] for line in settings.lines}
        for line in line_ids(redis_of()):
            if line not in configured:
                configured[line] = camera_ids(redis_of(), line)
        if not configured:
            raise fail("no lines configured and none in Redis")
        report = {
            "lines": {
                line: line_status(redis_of(line), line, cams) for line, cams in configured.items()
            },
        }
    if ray_address:
        report["actors"] = live_actors(ray_address)
    if as_json:
        typer.echo(json.dumps(report))
        return
    table = Table("line", "stream / group", "length", "lag", title="streams")
    for line, info in report["lines"].items():
        for key, lag in info["lag"].items():
            stream = key.split("/")[0]
            table.add_row(line, key, str(info["streams"].get(stream, "")), str(lag))
        for stream in (Streams(line).verdicts, Streams(line).labels):
            table.add_row(line, stream, str(info["streams"][stream]), "")
    stdout.print(table)
    models = Table("line", "active model", "shadow", "dead letters", title="models")
    for line, info in report["lines"].items():
        models.add_row(
            line,
            info["active_model"] or "-",
            info["shadow_model"] or "-",
            str(info["dead_letters"]),
        )
    stdout.print(models)
    if "actors" in report:
        actors = Table("actor", "node", "pid", title=f"{len(report['actors'])} live actors")
        for a in sorted(report["actors"], key=lambda a: (a["class"], a["node_id"])):
            actors.add_row(a["class"], a["node_id"][:12], str(a["pid"]))
        stdout.print(actors)


@app.command("config-reference")
def config_reference(
    out: Path | None = typer.Option(None, "--out", help="file to write (default: print it)"),
):
    """Every setting of a line file, its type, default and meaning (docs/configuration.md)."""
    from cluster.runtime.settings_doc import render

    text = render()
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        console.print(f"wrote {out}")


@app.command()
def deadletters(
    line: str = typer.Option(..., "--line", help="line id"),
    reason: str | None = typer.Option(None, help="only those whose reason contains this"),
    replay: str | None = typer.Option(None, "--replay", help="send this entry back to its stream"),
    purge: bool = typer.Option(False, "--purge", help="delete them (those --reason selects)"),
    as_json: bool = typer.Option(False, "--json"),
    config: Path | None = CONFIG,
    redis_url: str | None = REDIS_URL,
    data_dir: Path | None = DATA_DIR,
):
    """A line's dead letters (entries a stage could not process) with their reasons; replay one
    to its stream once its cause is fixed, or purge them."""
    from cluster.transport import deadletters as letters

    with qa_session(config, redis_url, data_dir) as (_, redis_of):
        client = redis_of(line)
        found = letters.dead_letters(client, line, reason)
        if replay is not None:
            [letter] = [d for d in found if d.entry_id == replay] or [None]
            if letter is None:
                raise fail(f"line {line}: no dead letter {replay}")
            new_id = letters.replay(client, line, letter)
            console.print(f"{replay} sent back to {letter.stream} as {new_id}")
            return
        if purge:
            console.print(f"line {line}: {letters.purge(client, line, found)} dead letters purged")
            return
    if as_json:
        for d in found:
            typer.echo(json.dumps(d.summary()))
        return
    table = Table("entry", "from", "kind", "reason", title=f"{len(found)} dead letters of {line}")
    for d in found:
        table.add_row(d.entry_id, f"{d.stream}/{d.group}", d.kind, d.reason)
    stdout.print(table)
