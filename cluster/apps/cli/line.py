"""Running lines: `defectflow run` and `defectflow demo`, one start for both."""

from __future__ import annotations

import json
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from cluster.apps.cli.common import (
    DASHBOARD_TOKENS,
    RAY_ADDRESS,
    REDIS_URL,
    app,
    console,
    dashboard_tokens,
    fail,
    load_cli_settings,
    progress_bars,
)


@contextmanager
def started_lines(settings, *, replay: bool, activate: bool = False):
    """The lines of ``settings`` running (see ``cluster.runtime.launcher``); every way a start
    fails is one clear line and exit 1. Ctrl-C and SIGTERM then drain, as in ``finish_lines``."""
    import signal

    from cluster.runtime.launcher import LaunchError, Lines
    from cluster.transport.connection import RedisUnavailable

    def warn(message: str) -> None:
        console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)

    try:
        with Lines(settings, on_warning=warn) as lines:
            lines.start(replay=replay, activate=activate)
            for running in lines.running:
                line = running.config
                version = _active_model(lines.redis(line.id), line.id)
                console.print(
                    f"line [bold]{line.id}[/]: {len(line.cameras)} cameras, model {version}, "
                    f"Redis {lines.redis.access(line.id).url}"
                )
            # SIGTERM (Kubernetes, systemd, `ray up` restarts) stops the lines as Ctrl-C does.
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            yield lines
    except (LaunchError, RedisUnavailable) as exc:
        raise fail(str(exc)) from None


def _active_model(client, line_id: str) -> str:
    from cluster.transport.registry import Registry

    active = Registry(client, line_id).active()
    return f"{active.id} ({active.path})" if active else "-"


def finish_lines(lines, while_waiting=None) -> dict:
    """Drain the started lines; Ctrl-C stops them sooner, draining only what is in flight."""
    try:
        return lines.drain(while_waiting=while_waiting)
    except KeyboardInterrupt:
        console.print("stopping: draining in-flight work (Ctrl-C again to abort)")
        return lines.drain(timeout_s=0)


@app.command()
def run(
    config: Path = typer.Option(..., "--config", help="YAML line file"),
    ray_address: str | None = RAY_ADDRESS,
    redis_url: str | None = REDIS_URL,
    replay: bool = typer.Option(False, help="clear the lines' streams first (replayed videos)"),
):
    """Start the actors of every line in CONFIG; Ctrl-C drains in-flight work and exits."""
    settings = load_cli_settings(config, redis_url=redis_url, ray_address=ray_address)
    if not settings.lines:
        raise fail(f"{config}: no lines configured")
    with started_lines(settings, replay=replay) as lines:
        stats = finish_lines(lines)
    typer.echo(json.dumps(stats))


@app.command()
def demo(
    data: Path = typer.Option(Path("../shared/data/mtd"), help="product images, MVTec AD layout"),
    products: int = typer.Option(24, min=1, help="products on the simulated test line"),
    out: Path = typer.Option(Path("demo-out"), help="model, videos, verdicts and summary go here"),
    epochs: int = typer.Option(30, min=1),
    train_products: int | None = typer.Option(
        None, min=4, help="good products the line learns from [default: every training image twice]"
    ),
    retrain: bool = typer.Option(False, help="train again even if OUT/model exists"),
    seed: int = typer.Option(0),
    redis_url: str | None = REDIS_URL,
    ray_address: str | None = RAY_ADDRESS,
    dashboard_port: int | None = typer.Option(
        None, help="also serve the QA dashboard on this port, until Ctrl-C after the run"
    ),
    tokens_file: Path | None = DASHBOARD_TOKENS,
    scene: str = typer.Option(
        "easy",
        help="easy, or hard: close products, marked belt, shadows, changing light, "
        "gloves and tools on the belt, mixed sizes",
    ),
    detector: str = typer.Option(
        "contour", help="contour, or yolo: a YOLOv8n learns the line first (minutes on CPU)"
    ),
):
    """The main job on the embedded defaults: train, simulate a 4-camera line, inspect it live
    (as `defectflow run` does: the same settings, the same start)."""
    from cluster import demo as line_demo
    from workers.datasets import DatasetError
    from workers.simulation.simulate import SCENES

    if not (data / "train" / "good").is_dir():
        raise fail(f"{data}: no data in MVTec AD layout (train/good); pass --data DIR")
    if scene not in SCENES or detector not in ("contour", "yolo"):
        raise fail("--scene is easy or hard, --detector contour or yolo")
    out.mkdir(parents=True, exist_ok=True)
    try:
        weights = _line_detector(data, out, detector, scene, seed)
        version = _line_model(data, out, retrain, train_products, epochs, seed, scene, weights)
        console.print(f"[bold]2/3 simulating[/] a 4-camera {scene} line of {products} products")
        manifest = line_demo.simulate_test_line(data, out, products, seed, scene=scene)
    except (DatasetError, ValueError) as exc:
        raise fail(str(exc)) from None
    settings = load_cli_settings(None, redis_url=redis_url, ray_address=ray_address).model_copy(
        update=line_demo.demo_settings(
            out, out / "model", manifest["cameras"], manifest["spec"]["fps"], weights
        )
    )
    console.print(f"[bold]3/3 inspecting:[/] Ray actors over Redis streams, model {version}")
    tokens = dashboard_tokens(tokens_file) if dashboard_port else None
    _inspect_demo_line(settings, manifest, out, dashboard_port, tokens)


def _line_detector(data: Path, out: Path, detector: str, scene: str, seed: int) -> Path | None:
    """The demo line's YOLO weights (trained, or reused from OUT), or None for contours."""
    from cluster import demo as line_demo

    if detector != "yolo":
        return None
    console.print("[bold]0/3 learning to find the products:[/] YOLOv8n on a labelled run")
    with progress_bars() as progress:
        return line_demo.train_yolo(
            data,
            out,
            scene=scene,
            seed=seed,
            on_epoch=lambda done, total: progress("YOLO", done, total),
        )


def _line_model(
    data: Path,
    out: Path,
    retrain: bool,
    train_products: int | None,
    epochs: int,
    seed: int,
    scene: str,
    yolo_weights: Path | None,
) -> str:
    """The demo line's model in OUT/model: reused where it learned the line as the demo cuts it
    now, else trained. Its version."""
    from cluster import demo as line_demo
    from workers.differnet.store import load_model

    model_dir = out / "model"
    detector = "yolo" if yolo_weights else "contour"
    bundle = None
    if not retrain:
        bundle = line_demo.reusable_line_model(model_dir, "detected", scene, detector)
    if bundle is not None:
        console.print(f"reusing model {bundle.version} from {model_dir} (--retrain to train again)")
        return bundle.version
    if not retrain and (model_dir / "model.json").exists():
        # Unreadable, or learned from crops cut another way.
        console.print(f"{model_dir} is not a usable model of this line: training again")
    console.print(
        "[bold]1/3 learning the line:[/] "
        + (f"{train_products} good products" if train_products else "every image twice")
        + f" through the front end, DifferNet on their crops ({epochs} epochs)"
    )
    with progress_bars() as progress:
        line_demo.train_line_model(
            data,
            out,
            train_products=train_products,
            epochs=epochs,
            seed=seed,
            progress=progress,
            scene=scene,
            yolo_weights=yolo_weights,
        )
    return load_model(model_dir).version


class _VerdictTable:
    """The demo's live table: the newest verdicts, each marked right or wrong by the truth."""

    def __init__(self, line: str, truth):
        self.line = line
        self.truth = truth  # cluster.demo.TruthMatch
        self.verdicts: list = []
        self.recent: deque = deque(maxlen=16)

    def add(self, verdict) -> None:
        self.verdicts.append(verdict)
        colour = {"defect": "red", "good": "green"}.get(verdict.decision, "yellow")
        found = self.truth.nearest(verdict)
        ok = found is None or (verdict.decision != "good") == self.truth.defective[found[0]]
        scores = sorted(verdict.views, key=lambda r: r.camera)
        self.recent.append(
            (
                verdict.product_id,
                f"[{colour}]{verdict.decision}[/]" + ("" if ok else " [yellow](wrong)[/]"),
                verdict.status,
                " ".join(f"{r.score:.2f}" for r in scores),
                f"{verdict.latency_ms['frame_to_verdict'] / 1e3:.2f}",
            )
        )

    def render(self) -> Table:
        title = f"verdicts:{self.line}  ({len(self.verdicts)}/{len(self.truth.defective)})"
        table = Table("product", "verdict", "status", "view scores", "latency s", title=title)
        for row in self.recent:
            table.add_row(*row)
        return table


def _inspect_demo_line(
    settings, manifest: dict, out: Path, dashboard_port: int | None, tokens
) -> None:
    """The demo's line through the one start every line takes, its verdicts shown live, then
    summarised against the simulator's truth."""
    from rich.live import Live

    from cluster import demo as line_demo
    from cluster.transport.bus import StreamBus
    from cluster.transport.streams import Streams
    from workers.qa.samples import SampleStore

    line = settings.lines[0]
    # Replayed: the demo's recordings number their products from 0 again; its model is active.
    with started_lines(settings, replay=True, activate=True) as lines:
        epoch = min(lines.running[0].replay_epochs.values())
        table = _VerdictTable(line.id, line_demo.TruthMatch(manifest, epoch))
        client = lines.redis(line.id)
        samples = SampleStore(settings.sample_dir)
        web = None
        if dashboard_port is not None:
            web = _serve_dashboard(client, samples, line.model_dir, line.id, dashboard_port, tokens)
        elapsed = line_demo.timer()
        last = "0"
        with Live(table.render(), console=console, refresh_per_second=4) as live:

            def show_verdicts() -> None:
                nonlocal last
                last = line_demo.watch_verdicts(client, line.id, last, table.add)
                live.update(table.render())

            stats = finish_lines(lines, while_waiting=show_verdicts)
            show_verdicts()
        dead = StreamBus(client).length(Streams(line.id).dead_letters)
        summary = line_demo.summarize(manifest, table.verdicts, elapsed(), dead, epoch)
        fps = manifest["spec"]["fps"]
        line_demo.write_outputs(out, out / "line-test", manifest, table.verdicts, fps, epoch)
        (out / "summary.json").write_text(
            json.dumps(summary.to_dict() | {"actors": stats}, indent=2) + "\n"
        )
        console.print(f"annotated videos, verdicts.jsonl and summary.json in {out}")
        typer.echo(json.dumps(summary.to_dict()))
        if web is not None:
            console.print(f"dashboard still on http://127.0.0.1:{dashboard_port}/ (Ctrl-C to stop)")
            server, thread = web
            try:
                while thread.is_alive():
                    thread.join(0.5)
            except KeyboardInterrupt:
                pass
            finally:
                # Stopped while Redis still runs: a live feed blocked on it returns within a
                # poll, where with Redis gone it would retry for a minute and hold the exit.
                server.should_exit = True
                thread.join(10)


def _serve_dashboard(client, samples, model_dir: Path, line_id: str, port: int, tokens):
    """The QA dashboard in a background thread of this process."""
    import threading

    import uvicorn

    from cluster.apps.dashboard.app import create_app
    from workers.differnet.store import load_model

    bundle = load_model(model_dir)
    web = create_app(lambda line: client, samples, tokens, lambda line: bundle, [line_id])
    config = uvicorn.Config(
        web, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="dashboard", daemon=True)
    thread.start()
    console.print(f"QA dashboard on http://127.0.0.1:{port}/")
    return server, thread
