"""The ``defectflow`` command line."""

from __future__ import annotations

import json
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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


@app.command()
def schemas(out: Path = typer.Option(..., "--out", help="folder for the JSON Schema files")):
    """Write the JSON Schema of every stream message, for consumers in other languages."""
    out.mkdir(parents=True, exist_ok=True)
    for message_type in STREAM_MESSAGES:
        path = out / f"{message_type.kind}.v{message_type.schema_version}.schema.json"
        path.write_text(json.dumps(message_type.entry_json_schema(), indent=2) + "\n")
        console.print(f"wrote {path}")


DEVICE = typer.Option("auto", help="auto (CUDA when there is a GPU) | cpu | cuda | cuda:N")


@app.command()
def train(
    data_dir: Path = typer.Argument(..., help="folder in MVTec AD layout (train/good/*)"),
    out: Path = typer.Option(..., "--out", help="model folder to write"),
    backbone: str = typer.Option("efficientnet-lite0", help="efficientnet-lite0 | alexnet"),
    backbone_weights: Path | None = typer.Option(
        None, help="local weights file (alexnet needs one)"
    ),
    head: str = typer.Option(
        "differnet", help="differnet (pooled, the paper's) | local (per position)"
    ),
    image_size: int = typer.Option(320, help="side of the square input (multiple of 32)"),
    epochs: int = typer.Option(40, min=1),
    shots: int | None = typer.Option(None, min=1, help="train on K random good images only"),
    tta: int = typer.Option(1, min=1, max=8, help="test-time transforms"),
    jitter: float = typer.Option(
        0.0, min=0.0, max=0.99, help="colour jitter strength (ZeroBox: 0.5)"
    ),
    memory_size: int = typer.Option(
        262144, min=0, help="good positions the patch memory keeps (0: the flow alone)"
    ),
    target_tpr: float = typer.Option(0.85, min=0.01, max=1.0),
    seed: int = typer.Option(0),
    device: str = DEVICE,
    box_source: str = typer.Option(
        "contour", help="input contract: the crops' boxes came from contour | yolo"
    ),
    box_margin: float = typer.Option(0.05, help="input contract: box grown by this per side"),
    mask_shape: str = typer.Option("silhouette", help="input contract: silhouette | hull | box"),
    mask_shrink: float = typer.Option(0.1, help="input contract: mask shrunk by this per side"),
    view_max_side: int = typer.Option(320, help="input contract: longer side of a view, at most"),
):
    """Train a DifferNet model on good images; validate on DATA_DIR/test when present.

    The crops' settings are the model's input contract: a line that runs it cuts its crops so."""
    from pydantic import ValidationError

    from workers.contract import CropSpec
    from workers.datasets import DatasetError
    from workers.differnet.backbone import DEFAULT_MEMORY_TAPS, DEFAULT_TAPS, BackboneError
    from workers.differnet.model import DifferNetConfig
    from workers.differnet.recipes import train_from_folder
    from workers.differnet.training import TrainingOptions

    try:
        config = DifferNetConfig(
            backbone=backbone,
            taps=DEFAULT_TAPS.get(backbone, ()),
            memory_taps=DEFAULT_MEMORY_TAPS.get(backbone, ()),
            memory_size=memory_size,
            head=head,
            image_size=image_size,
            tta=tta,
            jitter=jitter,
        )
        crops = CropSpec(
            box_source=box_source,
            box_margin=box_margin,
            mask_shape=mask_shape,
            mask_shrink=mask_shrink,
            view_max_side=view_max_side,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        raise fail(
            f"--{'-'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}"
        ) from None
    try:
        with progress_bars() as progress:
            meta = train_from_folder(
                data_dir,
                out,
                config,
                TrainingOptions(epochs=epochs, seed=seed, device=device),
                crops=crops,
                backbone_weights=backbone_weights,
                shots=shots,
                target_tpr=target_tpr,
                progress=progress,
                on_skip=warn_skip,
            )
    except (DatasetError, BackboneError, ValueError) as exc:
        raise fail(str(exc)) from None
    summary = {
        "model_dir": str(out),
        "version": meta["sha256"][:16],
        "threshold": meta["threshold"],
        **meta["metrics"],
        "train_seconds": meta["training"]["train_seconds"],
    }
    typer.echo(json.dumps(summary))


@app.command("eval")
def evaluate(
    model_dir: Path = typer.Argument(...),
    data_dir: Path = typer.Argument(..., help="reads DATA_DIR/test (and ground_truth) only"),
    json_out: Path = typer.Option(..., "--json", help="metrics file to write"),
    target_tpr: float = typer.Option(0.85, min=0.01, max=1.0),
    worst: int = typer.Option(8, min=0, help="defect-map overlays of the worst-scored images"),
    device: str = DEVICE,
):
    """Evaluate a model on DATA_DIR/test: AUROC, per-defect AUROC, threshold, speed."""
    from workers.differnet.recipes import evaluate_folder
    from workers.differnet.store import ModelError, load_model

    try:
        bundle = load_model(model_dir, device)
        with progress_bars() as progress:
            report = evaluate_folder(
                bundle,
                data_dir,
                target_tpr=target_tpr,
                out_dir=json_out.parent / f"{json_out.stem}-plots",
                worst=worst,
                progress=progress,
                on_skip=warn_skip,
            )
    except (ModelError, ValueError) as exc:
        raise fail(str(exc)) from None
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(json.dumps(report))


@app.command()
def score(
    model_dir: Path = typer.Argument(...),
    images: list[Path] = typer.Argument(..., help="image files"),
    maps: Path | None = typer.Option(None, "--maps", help="write defect-map overlays here"),
    device: str = DEVICE,
):
    """Score images: one JSON line each (path, score, threshold, is_defect)."""
    from workers.differnet.reports import overlay_png
    from workers.differnet.store import load_model
    from workers.images import ImageError, load_with_alpha

    try:
        bundle = load_model(model_dir, device)
    except ValueError as exc:  # a ModelError too
        raise fail(str(exc)) from None
    if maps is not None:
        maps.mkdir(parents=True, exist_ok=True)
    failed = 0
    for index, path in enumerate(images):
        try:
            rgb, alpha = load_with_alpha(path)
        except ImageError as exc:
            warn_skip(path, str(exc))
            failed += 1
            continue
        prepared = bundle.model.prepare(rgb, alpha)
        line = {"path": str(path)}
        if maps is not None:
            result = bundle.model.defect_maps([prepared])[0]
            # Numbered: images of the same name from different folders must not collide.
            map_path = maps / f"{index:05d}_{path.stem}_map.png"
            map_path.write_bytes(overlay_png(rgb, result.defect_map))
            line["map"] = str(map_path)
        else:
            result = bundle.model.score_batch([prepared])[0]
        line |= {
            "score": result.score,
            "threshold": bundle.threshold,
            "is_defect": result.score >= bundle.threshold,
            "model_version": bundle.version,
        }
        typer.echo(json.dumps(line))
    if failed:
        raise fail(f"{failed} of {len(images)} images could not be read", code=2)


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
    from .config import ConfigError, load_settings

    try:
        settings = load_settings(config)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    return settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})


@contextmanager
def started_lines(settings, *, replay: bool, activate: bool = False):
    """The lines of ``settings`` running (see ``cluster.launcher``); every way a start fails is
    one clear line and exit 1. Ctrl-C and SIGTERM then drain, as in ``finish_lines``."""
    import signal

    from .launcher import LaunchError, Lines
    from .redis_conn import RedisUnavailable

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
    from .registry import Registry

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
):
    """The main job on the embedded defaults: train, simulate a 4-camera line, inspect it live
    (as `defectflow run` does: the same settings, the same start)."""
    from rich.live import Live
    from rich.table import Table

    from workers.datasets import DatasetError
    from workers.differnet.store import load_model
    from workers.samples import SampleStore

    from . import demo as line_demo
    from .streams import Streams

    if not (data / "train" / "good").is_dir():
        raise fail(f"{data}: no data in MVTec AD layout (train/good); pass --data DIR")
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    bundle = None if retrain else line_demo.reusable_line_model(model_dir)
    if bundle is not None:
        console.print(f"reusing model {bundle.version} from {model_dir} (--retrain to train again)")
    elif not retrain and (model_dir / "model.json").exists():
        # Unreadable, or learned from crops cut another way.
        console.print(f"{model_dir} is not a usable model of this line: training again")
    try:
        if bundle is None:
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
                )
            bundle = load_model(model_dir)
        console.print(f"[bold]2/3 simulating[/] a 4-camera test line of {products} products")
        manifest = line_demo.simulate_test_line(data, out, products, seed)
    except (DatasetError, ValueError) as exc:
        raise fail(str(exc)) from None

    settings = load_cli_settings(None, redis_url=redis_url, ray_address=ray_address).model_copy(
        update=line_demo.demo_settings(out, model_dir, manifest["cameras"], manifest["spec"]["fps"])
    )
    line = settings.lines[0]
    console.print(f"[bold]3/3 inspecting:[/] Ray actors over Redis streams, model {bundle.version}")
    recent: deque = deque(maxlen=16)
    verdicts = []
    truth = {p["seq"]: p["defective"] for p in manifest["products"]}

    def add(verdict) -> None:
        verdicts.append(verdict)
        colour = {"defect": "red", "good": "green"}.get(verdict.decision, "yellow")
        ok = (verdict.decision != "good") == truth.get(verdict.product_seq)
        recent.append(
            (
                verdict.product_id,
                f"[{colour}]{verdict.decision}[/]" + ("" if ok else " [yellow](wrong)[/]"),
                verdict.status,
                " ".join(f"{r.score:.2f}" for r in sorted(verdict.views, key=lambda r: r.camera)),
                f"{verdict.latency_ms['frame_to_verdict'] / 1e3:.2f}",
            )
        )

    def render() -> Table:
        table = Table(
            "product",
            "verdict",
            "status",
            "view scores",
            "latency s",
            title=f"verdicts:{line.id}  ({len(verdicts)}/{products})",
        )
        for row in recent:
            table.add_row(*row)
        return table

    streams = Streams(line.id)
    # Replayed: the demo's recordings number their products from 0 again; its model is active.
    with started_lines(settings, replay=True, activate=True) as lines:
        client = lines.redis(line.id)
        samples = SampleStore(settings.sample_dir)
        web = _serve_dashboard(client, samples, model_dir, line.id, dashboard_port)
        elapsed = line_demo.timer()
        last = "0"
        with Live(render(), console=console, refresh_per_second=4) as live:

            def show_verdicts() -> None:
                nonlocal last
                last = line_demo.watch_verdicts(client, streams.verdicts, last, add)
                live.update(render())

            stats = finish_lines(lines, while_waiting=show_verdicts)
            show_verdicts()
        seconds = elapsed()
        summary = line_demo.summarize(
            manifest, verdicts, seconds, client.xlen(streams.dead_letters)
        )
        line_demo.write_outputs(out, out / "line-test", manifest, verdicts, manifest["spec"]["fps"])
        (out / "summary.json").write_text(
            json.dumps(summary.to_dict() | {"actors": stats}, indent=2) + "\n"
        )
        console.print(f"annotated videos, verdicts.jsonl and summary.json in {out}")
        typer.echo(json.dumps(summary.to_dict()))
        if web is not None:
            console.print(f"dashboard still on http://127.0.0.1:{dashboard_port}/ (Ctrl-C to stop)")
            try:
                while web.is_alive():
                    web.join(0.5)
            except KeyboardInterrupt:
                pass


def _serve_dashboard(client, samples, model_dir: Path, line_id: str, port: int | None):
    """The QA dashboard in a background thread of this process (None without a port)."""
    if port is None:
        return None
    import os
    import secrets
    import threading

    import uvicorn

    from workers.differnet.store import load_model

    from .dashboard import create_app

    token = os.environ.get("DEFECTFLOW_DASHBOARD_TOKEN") or secrets.token_urlsafe(18)
    bundle = load_model(model_dir)
    web = create_app(lambda line: client, samples, token, lambda line: bundle, [line_id])
    server = uvicorn.Server(uvicorn.Config(web, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="dashboard", daemon=True)
    thread.start()
    console.print(f"QA dashboard on http://127.0.0.1:{port}/  labelling token: {token}")
    return thread


@app.command()
def simulate(
    data_dir: Path = typer.Argument(..., help="product images in MVTec AD layout"),
    out: Path = typer.Option(..., "--out", help="folder for the videos and manifest.json"),
    products: int = typer.Option(..., "--products", min=1),
    cameras: int = typer.Option(4, min=1, max=16),
    defect_rate: float = typer.Option(0.2, min=0.0, max=1.0),
    fps: float = typer.Option(15.0, min=1.0, max=120.0),
    size: str = typer.Option("480x270", help="frame size WxH"),
    codec: str | None = typer.Option(
        None, help="recordings: mjpeg (AVI, quality 95) or mp4v (smaller, lossier) [simulator's]"
    ),
    exposure_jitter: float | None = typer.Option(
        None, help="per-view exposure variation: gain 1 +- j [simulator's]"
    ),
    seed: int = typer.Option(0),
):
    """Simulate a multi-camera conveyor: one video per camera and a manifest of the truth."""
    from workers.datasets import DatasetError
    from workers.simulate import LineSpec, parse_frame_size, simulate_line

    try:
        width, height = parse_frame_size(size)
    except ValueError as exc:
        raise fail(f"--size: {exc}") from None
    try:
        spec = LineSpec(
            products=products,
            cameras=cameras,
            defect_rate=defect_rate,
            fps=fps,
            width=width,
            height=height,
            seed=seed,
            **{
                k: v
                for k, v in {"codec": codec, "exposure_jitter": exposure_jitter}.items()
                if v is not None
            },
        )
        manifest = simulate_line(data_dir, out, spec)
    except (DatasetError, ValueError, RuntimeError) as exc:
        raise fail(str(exc)) from None
    defective = sum(p["defective"] for p in manifest["products"])
    console.print(f"wrote {len(manifest['cameras'])} videos and manifest.json to {out}")
    typer.echo(
        json.dumps(
            {
                "out": str(out),
                "products": products,
                "defective": defective,
                "frames": manifest["frames"],
            }
        )
    )


detector_app = typer.Typer(help="Product detectors.", no_args_is_help=True)
app.add_typer(detector_app, name="detector")


@detector_app.command("bootstrap")
def detector_bootstrap(
    videos: list[Path] = typer.Argument(..., help="videos of the line"),
    out: Path = typer.Option(..., "--out", help="YOLO weights file to write (.pt)"),
    epochs: int = typer.Option(10, min=1),
    image_size: int = typer.Option(320, min=64),
):
    """Label products automatically (motion gate + contours) and train a YOLOv8n on them."""
    from workers.detect import bootstrap_yolo

    try:
        report = bootstrap_yolo(videos, out, epochs=epochs, image_size=image_size)
    except (FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from None
    typer.echo(json.dumps(report))


# The QA commands (verdicts, label, dashboard, report), the model lifecycle commands (models,
# retrain) and `status` live in their own modules.
from . import learning_cli, ops_cli, qa_cli  # noqa: E402, F401
