"""A trained model on disk: weights (tensors only) named by content hash, and metadata JSON.

    MODEL_DIR/model.json                  format version, config, threshold, metrics, provenance,
                                          input contract (how the crops it learned were cut)
    MODEL_DIR/weights-<sha256[:16]>.pt    flow, feature statistics, patch memory, calibration;
                                          torch.load(weights_only=True)
    MODEL_DIR/features.pt                 optional: raw features of the training set (pooled head),
                                          so that retraining embeds only the new images

The frozen backbone is not copied: the metadata names it, and its weights come from their package
(or from the file given at training time).

Torch is imported only where weights are read or written: the registry, and the line's actors
that never score, check model folders without loading it.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from workers.contract import CropSpec, InputContract
from workers.differnet.config import DifferNetConfig

if TYPE_CHECKING:
    import torch

    from workers.differnet.model import DifferNet

# 2: patch memory and score calibration in the weights; 3: the memory compares products at one
# size (memory_side), not at their own
FORMAT_VERSION = 3
METADATA_FILE = "model.json"


class ModelError(ValueError):
    """A model folder that cannot be used; the message says why."""


@dataclass
class ModelBundle:
    model: DifferNet
    threshold: float
    metadata: dict = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.metadata["sha256"][:16]

    @property
    def region_threshold(self) -> float | None:
        """Where the defect map marks a region (None: a model validated before regions)."""
        regions = self.metadata.get("regions") or {}
        return None if regions.get("threshold") is None else float(regions["threshold"])


def save_model(
    model: DifferNet,
    model_dir: Path,
    *,
    threshold: float,
    crops: CropSpec | None,
    backbone_weights: Path | None = None,
    extra: dict | None = None,
) -> dict:
    """Write the weights and the metadata; ``crops``: how the images the model learned from
    were cut (its input contract; None where that is unknown)."""
    import torch

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    # CPU tensors: the file (and its sha256) does not depend on where the model trained.
    torch.save({k: v.cpu() for k, v in model.trainable_state().items()}, buf)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    weights_file = f"weights-{sha[:16]}.pt"
    (model_dir / weights_file).write_bytes(data)
    metadata = {
        "format_version": FORMAT_VERSION,
        "config": model.config.model_dump(mode="json"),
        "backbone_weights": str(backbone_weights) if backbone_weights else None,
        "feature_dim": model.feature_dim,
        "weights_file": weights_file,
        "sha256": sha,
        "threshold": float(threshold),
        "created": time.time(),
        "input_contract": InputContract(
            crops=crops,
            image_size=model.config.image_size,
            tile_above=model.config.tile_above,
            tile_overlap=model.config.tile_overlap,
        ).model_dump(mode="json")
        if crops is not None
        else None,
        **(extra or {}),
    }
    tmp = model_dir / (METADATA_FILE + ".tmp")
    tmp.write_text(json.dumps(metadata, indent=2) + "\n")
    tmp.replace(model_dir / METADATA_FILE)  # Readers never see half a metadata file.
    return metadata


def check_model(model_dir: Path) -> tuple[dict, DifferNetConfig, bytes]:
    """Metadata, config and weights bytes of a model folder whose weights pass the sha256 check.

    Cheap (no network is built): the registry checks a version with it before activating it.
    """
    model_dir = Path(model_dir)
    meta_path = model_dir / METADATA_FILE
    try:
        metadata = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{model_dir}: not a model folder (no {METADATA_FILE})") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{meta_path}: not JSON ({exc.msg})") from None
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelError(
            f"{model_dir}: model format version {version!r}, this defectflow reads {FORMAT_VERSION}"
        )
    try:
        # A model saved before the memory's peak (memory_peak_share) scored by the mean alone.
        config = DifferNetConfig.model_validate({"memory_peak_share": 0.0} | metadata["config"])
        weights_path = model_dir / metadata["weights_file"]
        expected = metadata["sha256"]
        float(metadata["threshold"])
    except (KeyError, TypeError, ValueError, ValidationError) as exc:
        raise ModelError(f"{meta_path}: malformed metadata ({exc})") from None
    try:
        data = weights_path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{weights_path}: weights file missing") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ModelError(
            f"{weights_path}: sha256 {actual[:16]}... does not match the metadata's "
            f"{expected[:16]}...; the file was changed or damaged"
        )
    return metadata, config, data


def load_model(
    model_dir: Path, device: str | torch.device | None = None, runtime: str = "torch"
) -> ModelBundle:
    """Load and check a model folder onto ``device`` (see :func:`choose_device`); with
    ``runtime`` onnx or openvino, its networks run as its export's graphs, on the CPU."""
    import torch

    from workers.devices import choose_device
    from workers.differnet.model import DifferNet

    metadata, config, data = check_model(model_dir)
    if runtime != "torch":
        device = "cpu"  # the views are prepared where the graphs run
    weights_path = Path(model_dir) / metadata["weights_file"]
    threshold = float(metadata["threshold"])
    backbone_weights = metadata.get("backbone_weights")
    model = DifferNet(config, Path(backbone_weights) if backbone_weights else None)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        model.load_trainable_state(state)
    except Exception as exc:  # unpickling and shape errors come in many types
        raise ModelError(f"{weights_path}: weights do not load ({exc})") from None
    model.eval()
    bundle = ModelBundle(model.to(choose_device(device)), threshold, metadata)
    if runtime == "torch":
        return bundle
    from workers.differnet.export import ExportError, use_runtime
    from workers.weights import WeightsError

    try:
        return use_runtime(bundle, Path(model_dir), runtime)
    except (ExportError, WeightsError, FileNotFoundError) as exc:
        raise ModelError(str(exc)) from None


FEATURE_CACHE = "features.pt"


def save_feature_cache(model_dir: Path, cache: torch.Tensor) -> None:
    """Keep the training set's raw features beside the model (float16 halves the file)."""
    import torch

    tmp = Path(model_dir) / (FEATURE_CACHE + ".tmp")
    torch.save(cache.half().contiguous(), tmp)
    tmp.replace(Path(model_dir) / FEATURE_CACHE)


def load_feature_cache(model_dir: Path, feature_dim: int) -> torch.Tensor | None:
    """The training features saved with a model, or None when there are none (or unusable)."""
    import torch

    path = Path(model_dir) / FEATURE_CACHE
    if not path.exists():
        return None
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged cache is only a lost shortcut: embed again
        return None
    if not isinstance(cache, torch.Tensor) or cache.dim() != 2 or cache.shape[1] != feature_dim:
        return None
    return cache


def update_metadata(model_dir: Path, **fields) -> None:
    """Set fields of a saved model's metadata; the weights and their hash stay."""
    path = Path(model_dir) / METADATA_FILE
    metadata = json.loads(path.read_text()) | fields
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(metadata, indent=2) + "\n")
    tmp.replace(path)
