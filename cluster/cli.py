"""The ``defectflow`` command line."""

from __future__ import annotations

import json
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
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
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def warn_skip(path: Path, reason: str) -> None:
    console.print(f"[yellow]skipped[/] {reason}")


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
    tta: int = typer.Option(4, min=1, max=8, help="test-time transforms"),
    jitter: float = typer.Option(
        0.0, min=0.0, max=0.99, help="colour jitter strength (ZeroBox: 0.5)"
    ),
    target_tpr: float = typer.Option(0.85, min=0.01, max=1.0),
    seed: int = typer.Option(0),
):
    """Train a DifferNet model on good images; validate on DATA_DIR/test when present."""
    from pydantic import ValidationError

    from workers.datasets import DatasetError
    from workers.differnet.backbone import DEFAULT_TAPS, BackboneError
    from workers.differnet.model import DifferNetConfig
    from workers.differnet.recipes import train_from_folder
    from workers.differnet.training import TrainingOptions

    try:
        config = DifferNetConfig(
            backbone=backbone,
            taps=DEFAULT_TAPS.get(backbone, ()),
            head=head,
            image_size=image_size,
            tta=tta,
            jitter=jitter,
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
                TrainingOptions(epochs=epochs, seed=seed),
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
):
    """Evaluate a model on DATA_DIR/test: AUROC, per-defect AUROC, threshold, speed."""
    from workers.differnet.recipes import evaluate_folder
    from workers.differnet.store import ModelError, load_model

    try:
        bundle = load_model(model_dir)
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
):
    """Score images: one JSON line each (path, score, threshold, is_defect)."""
    from workers.differnet.reports import overlay_png
    from workers.differnet.store import ModelError, load_model
    from workers.images import ImageError, load_with_alpha

    try:
        bundle = load_model(model_dir)
    except ModelError as exc:
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


if __name__ == "__main__":
    app()


@app.command()
def demo(
    data: Path = typer.Option(Path("../shared/data/mtd"), help="data in MVTec AD layout"),
    products: int = typer.Option(64, min=1, help="test images streamed as products"),
    out: Path = typer.Option(Path("demo-out"), help="model, verdicts.jsonl and summary go here"),
    epochs: int = typer.Option(20, min=1),
    retrain: bool = typer.Option(False, help="train again even if OUT/model exists"),
    seed: int = typer.Option(0),
):
    """Train (or reuse) a model, stream test images through Redis, show verdicts live."""
    import redis
    from rich.live import Live
    from rich.table import Table

    from workers.datasets import DatasetError
    from workers.differnet.model import DifferNetConfig
    from workers.differnet.recipes import train_from_folder
    from workers.differnet.store import ModelError, load_model
    from workers.differnet.training import TrainingOptions

    from .bus import StreamBus
    from .demo import pick_products, stream_products
    from .redis_conn import EmbeddedRedis

    if not (data / "train" / "good").is_dir():
        raise fail(f"{data}: no data in MVTec AD layout (train/good); pass --data DIR")
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    bundle = None
    if not retrain:
        try:
            bundle = load_model(model_dir)
            console.print(
                f"reusing model {bundle.version} from {model_dir} (--retrain to train again)"
            )
        except ModelError:
            bundle = None
    if bundle is None:
        console.print(f"[bold]1/2 training[/] DifferNet on {data}/train/good ({epochs} epochs)")
        # Four training transforms instead of eight: the demo trains in a few minutes.
        config = DifferNetConfig(train_transforms=4, tta=4)
        try:
            with progress_bars() as progress:
                train_from_folder(
                    data,
                    model_dir,
                    config,
                    TrainingOptions(epochs=epochs, seed=seed),
                    progress=progress,
                    on_skip=warn_skip,
                )
        except (DatasetError, ValueError) as exc:
            raise fail(str(exc)) from None
        bundle = load_model(model_dir)
    console.print(
        f"[bold]2/2 streaming[/] {products} products through Redis "
        f"(frames -> scorer -> scores + verdicts), model {bundle.version}"
    )
    recent: deque[tuple[str, ...]] = deque(maxlen=20)  # the live view shows the latest rows

    def render() -> Table:
        table = Table("product", "truth", "score", "verdict", "ms", title="verdicts:demo")
        for row in recent:
            table.add_row(*row)
        return table

    with EmbeddedRedis(out / "redis") as server, Live(render(), console=console) as live:
        bus = StreamBus(redis.Redis.from_url(server.url))

        def show(verdict, sample) -> None:
            ok = (verdict.decision == "defect") == sample.is_defect
            colour = "red" if verdict.decision == "defect" else "green"
            recent.append(
                (
                    verdict.product_id,
                    sample.category,
                    f"{verdict.views[0].score:.3f}",
                    f"[{colour}]{verdict.decision}[/]" + ("" if ok else " [yellow](wrong)[/]"),
                    f"{verdict.latency_ms['frame_to_verdict']:.0f}",
                )
            )
            live.update(render())

        summary = stream_products(bus, bundle, pick_products(data, products, seed), out, show)
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    console.print(f"verdicts in {out / 'verdicts.jsonl'}, summary in {out / 'summary.json'}")
    typer.echo(json.dumps(summary.to_dict()))


def _parse_size(size: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise fail(f"--size must look like 480x270, got {size!r}") from None
    return w, h


@app.command()
def simulate(
    data_dir: Path = typer.Argument(..., help="product images in MVTec AD layout"),
    out: Path = typer.Option(..., "--out", help="folder for the videos and manifest.json"),
    products: int = typer.Option(..., "--products", min=1),
    cameras: int = typer.Option(4, min=1, max=16),
    defect_rate: float = typer.Option(0.2, min=0.0, max=1.0),
    fps: float = typer.Option(15.0, min=1.0, max=120.0),
    size: str = typer.Option("480x270", help="frame size WxH"),
    seed: int = typer.Option(0),
):
    """Simulate a multi-camera conveyor: one MP4 per camera and a manifest of the truth."""
    from workers.datasets import DatasetError
    from workers.simulate import LineSpec, simulate_line

    width, height = _parse_size(size)
    try:
        spec = LineSpec(
            products=products,
            cameras=cameras,
            defect_rate=defect_rate,
            fps=fps,
            width=width,
            height=height,
            seed=seed,
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
