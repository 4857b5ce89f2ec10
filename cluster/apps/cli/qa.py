"""QA commands: `defectflow verdicts`, `label`, `dashboard` and `report`."""

from __future__ import annotations

import getpass
import json
import time
from collections import deque
from pathlib import Path

import typer
from rich.table import Table

from cluster.apps.cli.common import (
    CONFIG,
    DASHBOARD_TOKENS,
    DATA_DIR,
    REDIS_URL,
    app,
    console,
    dashboard_tokens,
    fail,
    qa_session,
    stdout,
)


def _since(text: str | None) -> float | None:
    from cluster.transport.qa import parse_since

    if text is None:
        return None
    try:
        return parse_since(text)
    except ValueError as exc:
        raise fail(f"--since: {exc}") from None


def _verdict_row(line: str, v) -> tuple[str, ...]:
    colour = {"defect": "red", "good": "green"}.get(v.decision, "yellow")
    return (
        time.strftime("%H:%M:%S", time.localtime(v.decided_at)),
        line,
        v.product_id,
        f"[{colour}]{v.decision}[/]",
        v.status,
        " ".join(
            f"{r.camera}:{r.score:.2f}{'!' if r.is_defect else ''}"
            for r in sorted(v.views, key=lambda r: r.camera)
        ),
        ",".join(v.missing_cameras),
        ",".join(sorted({r.model_version for r in v.views})),
    )


def _table(rows, title: str) -> Table:
    table = Table(
        "time", "line", "product", "verdict", "status", "views", "missing", "model", title=title
    )
    for r in rows:
        table.add_row(*r)
    return table


@app.command()
def verdicts(
    line: list[str] = typer.Option(None, "--line", help="line id (repeat; default: every line)"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing new verdicts"),
    since: str | None = typer.Option(None, help="10m, 2h, 1d, ISO time or epoch seconds"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
    limit: int = typer.Option(1000, min=1, help="at most this many (without --follow)"),
    config: Path | None = CONFIG,
    redis_url: str | None = REDIS_URL,
    data_dir: Path | None = DATA_DIR,
):
    """Read the verdict streams: a table, or JSON lines with --json."""
    from cluster.transport.qa import follow_verdicts, line_ids, read_verdicts

    start = _since(since)
    with qa_session(config, redis_url, data_dir) as (settings, redis_of):
        lines = line or line_ids(redis_of()) or [x.id for x in settings.lines]
        if not lines:
            raise fail("no verdict streams yet (no line has decided a product)")
        bad = 0

        def emit_json(line_id: str, entry) -> None:
            nonlocal bad
            if entry.verdict is None:
                bad += 1
                console.print(
                    f"[yellow]skipped[/] malformed verdict {entry.entry_id}: {entry.error}"
                )
                return
            typer.echo(
                json.dumps({"entry_id": entry.entry_id, **entry.verdict.model_dump(mode="json")})
            )

        if not follow:
            entries = [(x, e) for x in lines for e in read_verdicts(redis_of(x), x, start)]
            entries.sort(key=lambda p: p[1].entry_id.split("-")[0].zfill(20))
            entries = entries[-limit:]
            if as_json:
                for x, e in entries:
                    emit_json(x, e)
            else:
                good = [(x, e) for x, e in entries if e.verdict is not None]
                bad = len(entries) - len(good)
                defects = sum(e.verdict.decision == "defect" for _, e in good)
                title = f"{len(good)} verdicts, {defects} defects ({', '.join(lines)})"
                stdout.print(_table([_verdict_row(x, e.verdict) for x, e in good], title))
        else:
            from rich.live import Live

            recent: deque = deque(maxlen=40)
            title = f"following {', '.join(lines)} (Ctrl-C to stop)"
            servers = {redis_of.access(x) for x in lines}
            if len(servers) > 1:
                raise fail("--follow reads lines of one Redis at a time: choose them with --line")
            client = redis_of(lines[0])
            try:
                if as_json:
                    for x, e in follow_verdicts(client, lines, start):
                        emit_json(x, e)
                else:
                    with Live(_table([], title), console=stdout, refresh_per_second=4) as live:
                        for x, e in follow_verdicts(client, lines, start):
                            if e.verdict is None:
                                bad += 1
                                continue
                            recent.append(_verdict_row(x, e.verdict))
                            live.update(_table(recent, title))
            except KeyboardInterrupt:
                pass
        if bad:
            console.print(f"[yellow]{bad} malformed verdict entries skipped[/]")


@app.command()
def label(
    product_id: str = typer.Argument(..., help="LINE:SEQUENCE, as verdicts name products"),
    good: bool = typer.Option(False, "--good", help="the product (or view) is good"),
    defect: bool = typer.Option(False, "--defect", help="the product (or view) is defective"),
    camera: str | None = typer.Option(None, help="label one view only"),
    note: str | None = typer.Option(None),
    by: str = typer.Option(getpass.getuser(), help="who labels"),
    replace: bool = typer.Option(False, help="overrule an earlier, different label"),
    config: Path | None = CONFIG,
    redis_url: str | None = REDIS_URL,
    data_dir: Path | None = DATA_DIR,
):
    """Label an inspected product good or defective (writes the line's label stream)."""
    from cluster.transport.qa import LabelError, record_label
    from cluster.transport.streams import Streams
    from schemas import Label
    from workers.qa.samples import parse_product_id

    if good == defect:
        raise fail("give exactly one of --good and --defect")
    try:
        line_id, _ = parse_product_id(product_id)
        message = Label(
            line=line_id,
            product_id=product_id,
            camera=camera,
            label="good" if good else "defect",
            by=by,
            at=time.time(),
            note=note,
        )
    except ValueError as exc:
        raise fail(str(exc)) from None
    with qa_session(config, redis_url, data_dir) as (_, redis_of):
        try:
            entry_id = record_label(redis_of(line_id), message, replace=replace)
        except LabelError as exc:
            raise fail(str(exc)) from None
    typer.echo(
        json.dumps({"stream": Streams(line_id).labels, "entry_id": entry_id} | message.model_dump())
    )


class ModelCache:
    """The model of each line, loaded once, for drawing defect maps."""

    def __init__(self, settings, override: Path | None):
        self.settings = settings
        self.override = override
        self.loaded: dict[str, object] = {}

    def model_dir(self, line_id: str) -> Path:
        if self.override is not None:
            return self.override
        for line in self.settings.lines:
            if line.id == line_id and line.model_dir:
                return line.model_dir
        return self.settings.model_dir / line_id

    def __call__(self, line_id: str):
        from workers.differnet.store import ModelError, load_model

        if line_id not in self.loaded:
            try:
                self.loaded[line_id] = load_model(self.model_dir(line_id))
            except ModelError:
                self.loaded[line_id] = None
        return self.loaded[line_id]


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@app.command()
def dashboard(
    host: str = typer.Option("127.0.0.1", help="address to bind (default: this machine only)"),
    port: int = typer.Option(8600, min=1, max=65535),
    tokens_file: Path | None = DASHBOARD_TOKENS,
    model: Path | None = typer.Option(
        None, help="model folder for defect maps (default: the line's)"
    ),
    config: Path | None = CONFIG,
    redis_url: str | None = REDIS_URL,
    data_dir: Path | None = DATA_DIR,
):
    """Web dashboard for QA: live verdicts, product pages with maps, labelling."""
    import uvicorn

    from cluster.apps.dashboard.app import create_app
    from workers.qa.samples import SampleStore

    if host not in LOCAL_HOSTS and tokens_file is None:
        raise fail(f"--host {host} opens the dashboard to the network: give it --tokens FILE")
    tokens = dashboard_tokens(tokens_file)
    with qa_session(config, redis_url, data_dir) as (settings, redis_of):
        web = create_app(
            redis_of,
            SampleStore(settings.sample_dir),
            tokens,
            ModelCache(settings, model),
            [x.id for x in settings.lines],
        )
        console.print(f"dashboard on http://{host}:{port}/  (Ctrl-C to stop)")
        uvicorn.run(web, host=host, port=port, log_level="warning")


@app.command("qa-token")
def qa_token(
    name: str = typer.Argument(..., help="who holds it: each label they give names them"),
    tokens_file: Path = typer.Option(..., "--tokens", help="token file (created 0600)"),
    may_replace: bool = typer.Option(False, help="may overwrite a label already given"),
):
    """Add a QA token for the dashboard; prints it, once (the file keeps only its sha256)."""
    from cluster.apps.dashboard.tokens import TokenFileError, add_token

    try:
        token = add_token(tokens_file, name, may_replace)
    except (TokenFileError, OSError) as exc:
        raise fail(str(exc)) from None
    stdout.print(token)


@app.command()
def report(
    line: str = typer.Option(..., "--line", help="line id"),
    out: Path = typer.Option(..., "--out", help="HTML file to write"),
    since: str = typer.Option("1d", help="10m, 2h, 1d, ISO time or epoch seconds"),
    worst: int = typer.Option(8, min=0, help="worst defects shown with their maps"),
    model: Path | None = typer.Option(
        None, help="model folder for defect maps (default: the line's)"
    ),
    config: Path | None = CONFIG,
    redis_url: str | None = REDIS_URL,
    data_dir: Path | None = DATA_DIR,
):
    """HTML report of a line: score distributions, ROC from labels, worst defects with maps."""
    from cluster.transport.qa import labels_of, read_verdicts
    from workers.differnet.recipes import defect_map_overlay
    from workers.qa.report import ReportData, render_report, summarize
    from workers.qa.samples import SampleError, SampleStore

    start = _since(since)
    with qa_session(config, redis_url, data_dir) as (settings, redis_of):
        client = redis_of(line)
        entries = read_verdicts(client, line, start)
        labels = labels_of(client, line)
        samples = SampleStore(settings.sample_dir)
        models = ModelCache(settings, model)

        def images_of(product_id: str) -> list[tuple[str, bytes]]:
            try:
                product = samples.product(product_id)
            except SampleError:
                return []
            bundle = models(line)
            shown = []
            for camera in product.cameras:
                crop = product.view_path(camera)
                if bundle is None:
                    shown.append((camera, crop.read_bytes()))
                    continue
                if not product.map_path(camera).exists():
                    samples.put_map(product, camera, defect_map_overlay(bundle, crop))
                shown.append(
                    (f"{camera} (crop | defect map)", product.map_path(camera).read_bytes())
                )
            return shown

        data = ReportData(
            line,
            start or 0.0,
            [e.verdict.model_dump(mode="json") for e in entries if e.verdict is not None],
            labels,
        )
        if not data.verdicts:
            raise fail(f"line {line}: no verdicts since {since}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_report(data, images_of, worst))
    console.print(f"wrote {out}")
    typer.echo(json.dumps(summarize(data)))
