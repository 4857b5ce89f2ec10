"""Scorer commands: `defectflow train`, `eval`, `score`, `schemas`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cluster.apps.cli.common import (
    DEVICE,
    RUNTIME,
    app,
    console,
    fail,
    progress_bars,
    warn_skip,
)
from schemas import STREAM_MESSAGES

BACKBONE = typer.Option("efficientnet-lite0", help="efficientnet-lite0 | -lite1 | -lite2 | alexnet")
MEMORY_SIZE = typer.Option(
    262144, min=0, help="good positions the patch memory keeps (0: the flow alone)"
)
MEMORY_BORDER = typer.Option(
    "zeros", help="zeros | valid (edge positions averaged over the image: finds edge defects)"
)
MEMORY_PEAK_SHARE = typer.Option(
    0.5, min=0.0, max=1.0, help="share of an image's memory score from its farthest 5 % (0: mean)"
)
EXPOSURE_TARGET = typer.Option(
    None, help="bring each image to this median product luminance (0-255) first"
)


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
    backbone: str = BACKBONE,
    backbone_weights: Path | None = typer.Option(None, help="local weights (alexnet needs them)"),
    head: str = typer.Option("differnet", help="differnet (pooled) | local (per position)"),
    image_size: int = typer.Option(320, help="side of the square input (multiple of 32)"),
    epochs: int = typer.Option(40, min=1),
    shots: int | None = typer.Option(None, min=1, help="train on K random good images only"),
    flow_images: int | None = typer.Option(
        None, min=1, help="the flow learns from a draw of this many (the memory from all)"
    ),
    tta: int = typer.Option(1, min=1, max=8, help="test-time transforms"),
    jitter: float = typer.Option(0.0, min=0.0, max=0.99, help="colour jitter (ZeroBox: 0.5)"),
    memory_size: int = MEMORY_SIZE,
    memory_draw: str = typer.Option("random", help="random | coverage (keeps rare good patterns)"),
    memory_spacing: float = typer.Option(0.5, help="share of a good position's spacing taken off"),
    memory_side: int = typer.Option(160, help="memory compares products at this side squared, px"),
    memory_border: str = MEMORY_BORDER,
    memory_peak_share: float = MEMORY_PEAK_SHARE,
    exposure_target: float | None = EXPOSURE_TARGET,
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
    from workers.contract import CropSpec
    from workers.datasets import DatasetError
    from workers.differnet.backbone import BackboneError
    from workers.differnet.recipes import train_from_folder
    from workers.differnet.training import TrainingOptions

    config = _network(
        backbone,
        memory_size=memory_size,
        memory_draw=memory_draw,
        memory_spacing=memory_spacing,
        memory_side=memory_side,
        memory_border=memory_border,
        memory_peak_share=memory_peak_share,
        head=head,
        image_size=image_size,
        tta=tta,
        jitter=jitter,
        exposure_target=exposure_target,
    )
    crops = _validated(
        CropSpec,
        box_source=box_source,
        box_margin=box_margin,
        mask_shape=mask_shape,
        mask_shrink=mask_shrink,
        view_max_side=view_max_side,
    )
    try:
        with progress_bars() as progress:
            meta = train_from_folder(
                data_dir,
                out,
                config,
                TrainingOptions(epochs=epochs, seed=seed, device=device, flow_images=flow_images),
                crops=crops,
                backbone_weights=backbone_weights,
                shots=shots,
                target_tpr=target_tpr,
                progress=progress,
                on_skip=warn_skip,
            )
    except (DatasetError, BackboneError, ValueError) as exc:
        raise fail(str(exc)) from None
    typer.echo(json.dumps(_trained_summary(out, meta)))


def _trained_summary(out: Path, meta: dict) -> dict:
    """The line `defectflow train` prints: where the model is, its version, how it scored."""
    version, seconds = meta["sha256"][:16], meta["training"]["train_seconds"]
    summary = {"model_dir": str(out), "version": version, "threshold": meta["threshold"]}
    return summary | meta["metrics"] | {"train_seconds": seconds}


def _network(backbone: str, **options):
    """The network's config: the backbone (with its own taps) and the options given (validated)."""
    from workers.differnet.config import DifferNetConfig

    return _validated(DifferNetConfig, backbone=backbone, **options)


def _validated(model, **options):
    """``model(**options)``; a wrong value is a clear error naming its option."""
    from pydantic import ValidationError

    try:
        return model(**options)
    except ValidationError as exc:
        err = exc.errors()[0]
        option = "-".join(str(p) for p in err["loc"]).replace("_", "-")
        raise fail(f"--{option}: {err['msg']}") from None


@app.command("eval")
def evaluate(
    model_dir: Path = typer.Argument(...),
    data_dir: Path = typer.Argument(..., help="reads DATA_DIR/test (and ground_truth) only"),
    json_out: Path = typer.Option(..., "--json", help="metrics file to write"),
    target_tpr: float = typer.Option(0.85, min=0.01, max=1.0),
    worst: int = typer.Option(8, min=0, help="defect-map overlays of the worst-scored images"),
    maps_from: list[str] = typer.Option(
        [], "--maps-from", help="also measure maps from memory or gradient (repeatable)"
    ),
    device: str = DEVICE,
    runtime: str = RUNTIME,
):
    """Evaluate a model on DATA_DIR/test: image AUROC per defect type, threshold, speed, and
    with ground_truth masks pixel AUROC and AUPRO of its defect maps."""
    from workers.differnet.recipes import evaluate_folder
    from workers.differnet.store import ModelError, load_model

    try:
        bundle = load_model(model_dir, device, runtime)
        with progress_bars() as progress:
            report = evaluate_folder(
                bundle,
                data_dir,
                target_tpr=target_tpr,
                out_dir=json_out.parent / f"{json_out.stem}-plots",
                worst=worst,
                map_sources=maps_from,
                progress=progress,
                on_skip=warn_skip,
            )
    except (ModelError, ValueError) as exc:
        raise fail(str(exc)) from None
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(json.dumps(report))


@app.command()
def export(
    model_dir: Path = typer.Argument(..., help="a model folder"),
    fmt: str = typer.Option(..., "--format", help="onnx | openvino"),
    out: Path | None = typer.Option(None, "--out", help="default: MODEL_DIR/export-FORMAT"),
):
    """Export a model's networks for ONNX Runtime or OpenVINO (`--runtime` of the scorers),
    each file's sha256 recorded beside them."""
    from workers.differnet.export import ExportError, export_folder, export_model
    from workers.differnet.store import ModelError, load_model

    try:
        bundle = load_model(model_dir, "cpu")
        # An OpenVINO export converts the model's ONNX export where there is one.
        onnx = export_folder(model_dir, "onnx")
        folder = export_model(bundle, fmt, out or export_folder(model_dir, fmt), onnx)
    except (ExportError, ModelError) as exc:
        raise fail(str(exc)) from None
    console.print(f"wrote {folder}")
    typer.echo(str(folder))


@app.command()
def score(
    model_dir: Path = typer.Argument(...),
    images: list[Path] = typer.Argument(..., help="image files"),
    maps: Path | None = typer.Option(None, "--maps", help="write defect-map overlays here"),
    device: str = DEVICE,
    runtime: str = RUNTIME,
):
    """Score images: one JSON line each (path, score, threshold, is_defect; with --maps, the
    map's file and a defective image's regions)."""
    from dataclasses import asdict

    from workers.differnet.regions import find_regions
    from workers.differnet.reports import overlay_png
    from workers.differnet.store import load_model
    from workers.images import ImageError, load_with_alpha

    try:
        bundle = load_model(model_dir, device, runtime)
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
        is_defect = result.score >= bundle.threshold
        line |= {
            "score": result.score,
            "threshold": bundle.threshold,
            "is_defect": is_defect,
            "model_version": bundle.version,
        }
        if maps is not None and is_defect and bundle.region_threshold is not None:
            found = find_regions(result.defect_map, bundle.region_threshold)
            line["regions"] = [asdict(r) for r in found]  # in the image's pixels
        typer.echo(json.dumps(line))
    if failed:
        raise fail(f"{failed} of {len(images)} images could not be read", code=2)
