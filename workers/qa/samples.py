"""The sample store: the matted views and the verdict of every inspected product, on disk.

QA needs a product's crops long after its stream entries are trimmed: to look at it on the
dashboard, to label it, and for the trainer to learn from the views labelled good. Layout::

    ROOT/<line>/<product seq, 9 digits>/<camera>.png      matted crop (RGBA, alpha = mask)
    ROOT/<line>/<product seq, 9 digits>/<camera>.map.png  defect-map overlay, made on demand
    ROOT/<line>/<product seq, 9 digits>/verdict.json      the verdict's JSON

Files are written to a temporary name and renamed, so a reader never sees half a file. On a
multi-node cluster ROOT must be a shared volume (scorers write crops, the aggregator verdicts).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from schemas.messages import MAX_PRODUCT_SEQ

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")


class SampleError(LookupError):
    """A product or view is not in the store (never inspected, or pruned)."""


def parse_product_id(product_id: str) -> tuple[str, int]:
    """``"line:seq"`` -> ``(line, seq)``; a clear :class:`ValueError` for anything else."""
    line, sep, seq = product_id.rpartition(":")
    if not sep or not _NAME.match(line) or not seq.isdigit() or int(seq) >= MAX_PRODUCT_SEQ:
        raise ValueError(
            f"not a product id: {product_id!r} (expected LINE:SEQUENCE, e.g. line-a:17, the "
            f"sequence below {MAX_PRODUCT_SEQ})"
        )
    return line, int(seq)


@dataclass(frozen=True)
class StoredProduct:
    line: str
    product_seq: int
    folder: Path

    @property
    def product_id(self) -> str:
        return f"{self.line}:{self.product_seq}"

    @property
    def cameras(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.png") if not p.stem.endswith(".map"))

    def verdict(self) -> dict | None:
        path = self.folder / "verdict.json"
        return json.loads(path.read_text()) if path.exists() else None

    def view_path(self, camera: str) -> Path:
        path = self.folder / f"{_checked(camera)}.png"
        if not path.exists():
            raise SampleError(f"{self.product_id}: no view from camera {camera!r}")
        return path

    def map_path(self, camera: str) -> Path:
        return self.folder / f"{_checked(camera)}.map.png"


class SampleStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _folder(self, line: str, product_seq: int) -> Path:
        return self.root / _checked(line) / f"{product_seq:09d}"

    def put_view(self, line: str, product_seq: int, camera: str, png: bytes) -> Path:
        return _write(self._folder(line, product_seq) / f"{_checked(camera)}.png", png)

    def put_verdict(self, line: str, product_seq: int, verdict_json: str) -> Path:
        return _write(self._folder(line, product_seq) / "verdict.json", verdict_json.encode())

    def put_map(self, product: StoredProduct, camera: str, png: bytes) -> Path:
        return _write(product.map_path(camera), png)

    def product(self, product_id: str) -> StoredProduct:
        line, seq = parse_product_id(product_id)
        folder = self._folder(line, seq)
        if not folder.is_dir():
            raise SampleError(f"{product_id}: not in the sample store {self.root}")
        return StoredProduct(line, seq, folder)

    def products(self, line: str) -> list[StoredProduct]:
        """The stored products of ``line``, oldest first."""
        folder = self.root / _checked(line)
        if not folder.is_dir():
            return []
        return [
            StoredProduct(line, int(p.name), p)
            for p in sorted(folder.iterdir())
            if p.is_dir() and p.name.isdigit()
        ]

    def lines(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name))

    def forget_line(self, line: str) -> None:
        shutil.rmtree(self.root / _checked(line), ignore_errors=True)

    def prune(self, line: str, max_products: int | None, max_age_s: float | None) -> int:
        """Delete the oldest products beyond ``max_products`` and those older than ``max_age_s``.

        Returns how many were deleted. Age is the folder's last change (its newest file).
        """
        products = self.products(line)
        doomed = products[: max(0, len(products) - max_products)] if max_products else []
        if max_age_s is not None:
            cutoff = time.time() - max_age_s
            doomed += [p for p in products if p not in doomed and p.folder.stat().st_mtime < cutoff]
        for p in doomed:
            shutil.rmtree(p.folder, ignore_errors=True)
        return len(doomed)


def _checked(name: str) -> str:
    # Names become path components: nothing that could climb out of the store.
    if not _NAME.match(name) or name in (".", ".."):
        raise ValueError(f"not a valid line or camera name: {name!r}")
    return name


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path
