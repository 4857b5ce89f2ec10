"""Weights files that run code as they load (pickled checkpoints, TorchScript archives): used
only when their sha256 is the one the line's settings record for them."""

from __future__ import annotations

import hashlib
from pathlib import Path


class WeightsError(ValueError):
    """A weights file that is not the one recorded, or cannot be loaded safely."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verified(path: Path, sha256: str, what: str) -> Path:
    """``path``, once its content is shown to hash to ``sha256``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    actual = sha256_of(path)
    if actual != sha256:
        raise WeightsError(
            f"{path}: sha256 {actual} is not the {sha256} recorded for this {what}; "
            "refusing to load it (record the new file's sha256 if you replaced it on purpose)"
        )
    return path
