"""Front-end tools: `defectflow simulate` and `defectflow detector bootstrap`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cluster.apps.cli.common import (
    app,
    console,
    fail,
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
):
    """Simulate a multi-camera conveyor: one video per camera and a manifest of the truth."""
    from workers.datasets import DatasetError
    from workers.simulation.simulate import LineSpec, parse_frame_size, simulate_line

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
    from workers.frontend.detect import bootstrap_yolo

    try:
        report = bootstrap_yolo(videos, out, epochs=epochs, image_size=image_size)
    except (FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from None
    typer.echo(json.dumps(report))
