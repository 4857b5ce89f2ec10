"""Front-end tools: `defectflow simulate` and `defectflow detector bootstrap`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cluster.apps.cli.common import (
    app,
    console,
    fail,
    progress_bars,
)


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
    scene: str = typer.Option("easy", help="easy or hard (every option below on) [easy]"),
    close_products: float | None = typer.Option(
        None, help="share of products close behind the one before, up to touching [scene's]"
    ),
    belt_marks: bool | None = typer.Option(
        None, help="seams and stains moving with the belt, glare [scene's]"
    ),
    shadows: bool | None = typer.Option(None, help="shadows sweeping across [scene's]"),
    lighting_drift: float | None = typer.Option(None, help="light drifts by 1 +- d [scene's]"),
    flicker: float | None = typer.Option(None, help="light flickers by 1 +- f [scene's]"),
    distractors: float | None = typer.Option(
        None, help="share of gaps a glove or tool rides through [scene's]"
    ),
    product_scale: str | None = typer.Option(
        None, help="product height as a share of the frame's: LOW,HIGH [scene's]"
    ),
):
    """Simulate a multi-camera conveyor: one video per camera and a manifest of the truth."""
    from workers.datasets import DatasetError
    from workers.simulation.simulate import parse_frame_size, scene_spec, simulate_line

    try:
        width, height = parse_frame_size(size)
    except ValueError as exc:
        raise fail(f"--size: {exc}") from None
    try:
        scale = tuple(float(v) for v in product_scale.split(",")) if product_scale else None
    except ValueError:
        raise fail(f"--product-scale looks like 0.3,0.7, got {product_scale!r}") from None
    options = {
        "codec": codec,
        "exposure_jitter": exposure_jitter,
        "close_products": close_products,
        "belt_marks": belt_marks,
        "shadows": shadows,
        "lighting_drift": lighting_drift,
        "flicker": flicker,
        "distractors": distractors,
        "product_scale": scale,
    }
    try:
        spec = scene_spec(
            scene,
            products=products,
            cameras=cameras,
            defect_rate=defect_rate,
            fps=fps,
            width=width,
            height=height,
            seed=seed,
            **{k: v for k, v in options.items() if v is not None},
        )
        manifest = simulate_line(data_dir, out, spec)
    except (DatasetError, ValueError, RuntimeError) as exc:
        raise fail(str(exc)) from None
    defective = sum(p["defective"] for p in manifest["products"])
    console.print(f"wrote {len(manifest['cameras'])} videos and manifest.json to {out}")
    distractors = len(manifest["distractors"])
    summary = {"out": str(out), "products": products, "defective": defective}
    typer.echo(json.dumps(summary | {"frames": manifest["frames"], "distractors": distractors}))


detector_app = typer.Typer(help="Product detectors.", no_args_is_help=True)
app.add_typer(detector_app, name="detector")


@detector_app.command("bootstrap")
def detector_bootstrap(
    videos: list[Path] = typer.Argument(
        None, help="videos of the line: products labelled where the scene is easy"
    ),
    out: Path = typer.Option(..., "--out", help="YOLO weights file to write (.pt)"),
    labels: list[Path] = typer.Option(
        [], "--labels", help="a labelled folder, YOLO format (CVAT's YOLO 1.1 export); repeatable"
    ),
    epochs: int = typer.Option(40, min=1),
    image_size: int = typer.Option(256, min=64),
    architecture: str = typer.Option(
        "yolov8n.yaml", help="yolov8n.yaml (nano), yolov8s.yaml (small) or a model YAML file"
    ),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 [a GPU where one is]"),
):
    """Train a YOLOv8n on a line's products: labelled automatically where the scene is easy
    (motion gate + contours), and from your corrected labels for the rest."""
    from workers.frontend.detect import bootstrap_yolo

    if not videos and not labels:
        raise fail("give videos, --labels folders, or both")
    with progress_bars() as progress:
        try:
            report = bootstrap_yolo(
                videos or [],
                out,
                labelled=labels,
                epochs=epochs,
                image_size=image_size,
                architecture=architecture,
                device=device,
                on_epoch=lambda done, total: progress("YOLO", done, total),
            )
        except (FileNotFoundError, ValueError) as exc:
            raise fail(str(exc)) from None
    typer.echo(json.dumps(report))


@detector_app.command("labels")
def detector_labels(
    line_dir: Path = typer.Argument(..., help="a simulated line (`defectflow simulate`)"),
    out: Path = typer.Option(..., "--out", help="folder for images/ and labels/"),
    every: int = typer.Option(2, min=1, help="every n-th frame of each camera"),
):
    """A simulated line's true product boxes as a YOLO-format labelled set (for --labels)."""
    from workers.simulation.labels import truth_labels

    try:
        report = truth_labels(line_dir, out, every=every)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise fail(f"{line_dir}: {exc}") from None
    typer.echo(json.dumps(report))
