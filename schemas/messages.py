"""The messages that cross the streams of an inspection line (see DESIGN in the README).

Timestamps are seconds since the Unix epoch (float, UTC). A product is identified by its line and
the product sequence number every camera counts as products cross its centre:
``make_product_id(line, product_seq)``.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from .base import Message, Part, SchemaError

Name = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
]
Timestamp = Annotated[float, Field(ge=0.0)]
Milliseconds = dict[Name, Annotated[float, Field(ge=0.0)]]
Codec = Literal["jpeg", "png", "raw"]


# A line's decided products are one bit each in Redis: a number past this would make Redis
# allocate a bitmap of hundreds of MB (and past 2^32 refuse it), where 2^30 is 34 years of one
# product a second.
MAX_PRODUCT_SEQ = 2**30


def make_product_id(line: str, product_seq: int) -> str:
    return f"{line}:{product_seq}"


def _names_its_product(message):
    """A message's ``product_id`` must be its line and product number: a stage joins by those,
    QA finds the product by the id."""
    expected = make_product_id(message.line, message.product_seq)
    if message.product_id != expected:
        raise ValueError(
            f"product_id {message.product_id!r} does not match line and product_seq ({expected!r})"
        )
    return message


class BBox(Part):
    """Axis-aligned box in pixels (of the camera frame, unless named otherwise)."""

    x: int = Field(ge=0)
    y: int = Field(ge=0)
    w: int = Field(gt=0)
    h: int = Field(gt=0)


class _ImageMessage(Message):
    """A message carrying one encoded image (``image`` travels raw, outside the JSON)."""

    binary_fields: ClassVar[tuple[str, ...]] = ("image",)
    codec: Codec
    shape: tuple[int, int, int] = Field(description="height, width, channels of the decoded image")
    image: bytes = Field(min_length=1)

    @field_validator("shape")
    @classmethod
    def _positive_shape(cls, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        h, w, c = shape
        if h <= 0 or w <= 0 or c not in (1, 3, 4):
            raise ValueError("must be (height > 0, width > 0, channels in 1, 3, 4)")
        return shape

    @model_validator(mode="after")
    def _raw_size_matches(self):
        if self.codec == "raw" and len(self.image) != math.prod(self.shape):
            raise ValueError(
                f"raw image has {len(self.image)} bytes, shape needs {math.prod(self.shape)}"
            )
        return self


class CameraFrame(_ImageMessage):
    """A frame a camera ingest pushed because a product crossed the centre of the view.

    ``mask`` is the motion gate's composite foreground mask of the product (PNG, frame-sized),
    or empty when the source gives none.
    """

    kind: ClassVar[str] = "frame"
    binary_fields: ClassVar[tuple[str, ...]] = ("image", "mask")
    mask: bytes = b""
    line: Name
    camera: Name
    sequence: int = Field(ge=0, description="frame number within the camera's stream")
    product_seq: int = Field(
        ge=0, lt=MAX_PRODUCT_SEQ, description="products this camera has seen cross its centre"
    )
    timestamp: Timestamp


class ProductView(_ImageMessage):
    """One camera's matted crop of one product."""

    kind: ClassVar[str] = "view"
    product_id: str = Field(min_length=1)
    line: Name
    camera: Name
    product_seq: int = Field(ge=0, lt=MAX_PRODUCT_SEQ)
    captured_at: Timestamp
    bbox: BBox
    mask_coverage: float = Field(
        ge=0.0, le=1.0, description="fraction of the crop kept by the mask"
    )
    mask_shrink: float = Field(ge=0.0, lt=0.5, description="fraction shrunk off each side")
    stage_ms: Milliseconds = Field(default_factory=dict)

    _product_id = model_validator(mode="after")(_names_its_product)


# A view reports at most this many defect regions, and an outline at most this many corners
# (workers.differnet.regions finds them within these bounds).
MAX_REGIONS = 8
MAX_OUTLINE_POINTS = 32

Point = tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]]
Outline = Annotated[list[Point], Field(min_length=1, max_length=MAX_OUTLINE_POINTS)]


class Region(Part):
    """Where a view's defect map rises above its model's region threshold. Version 3 of the
    messages that carry regions added the outlines."""

    box: BBox = Field(description="in the view's pixels")
    frame_box: BBox = Field(description="in the camera frame's pixels")
    area: int = Field(gt=0, description="view pixels above the threshold")
    peak: float = Field(description="the map's highest value in the region")
    outline: Outline | None = Field(
        default=None, description="the region's polygon, [x, y] corners in the view's pixels"
    )
    frame_outline: Outline | None = Field(
        default=None, description="the same polygon in the camera frame's pixels"
    )


Regions = Annotated[list[Region], Field(max_length=MAX_REGIONS)]
# What a scorer tells of a defective view's regions: none (no maps drawn: the cheapest), boxes,
# or boxes and outlines (messages then written as schema version 3).
RegionDetail = Literal["off", "boxes", "outlines"]
_OUTLINES = ("outline", "frame_outline")


def _regions_version(region_lists: list[list[dict]]) -> int:
    """The oldest version that holds these regions' meta (1: none, 2: boxes, 3: outlines);
    the outline fields of regions without one are cut out in place."""
    regions = [r for listed in region_lists for r in listed]
    if any(r.get(name) is not None for r in regions for name in _OUTLINES):
        return 3
    for r in regions:
        for name in _OUTLINES:
            r.pop(name, None)
    return 2 if regions else 1


def _regions_fit(meta: dict, version: int, where: str) -> None:
    """Refuse regions in a version-1 entry, and outlines in one older than version 3."""
    if "regions" not in meta:
        return
    if version < 2:
        raise SchemaError(where, "not in schema version 1 (regions came with version 2)")
    regions = meta["regions"]
    for i, region in enumerate(regions if isinstance(regions, list) else []):
        for name in _OUTLINES:
            if version < 3 and isinstance(region, dict) and name in region:
                raise SchemaError(
                    f"{where}.{i}.{name}", "not before schema version 3 (outlines came with it)"
                )


class NoProduct(Message):
    """A camera's gate fired on something its detector found no product in (a glove, a tool,
    a shadow): the camera's word that this number is no product of its. The detector sends it
    on the scores stream, so that the aggregator decides the number without a verdict."""

    kind: ClassVar[str] = "no_product"
    line: Name
    camera: Name
    product_seq: int = Field(ge=0, lt=MAX_PRODUCT_SEQ)
    captured_at: Timestamp


class ViewScore(Message):
    """A scorer's result for one view. Version 2 added ``regions``, version 3 their outlines;
    each is written at the oldest version that holds it."""

    kind: ClassVar[str] = "score"
    schema_version: ClassVar[int] = 3
    product_id: str = Field(min_length=1)
    line: Name
    camera: Name
    product_seq: int = Field(ge=0, lt=MAX_PRODUCT_SEQ)
    captured_at: Timestamp
    score: float
    threshold: float
    is_defect: bool
    model_version: str = Field(min_length=1)
    defect_map_ref: str | None = None
    regions: Regions = Field(default_factory=list)
    stage_ms: Milliseconds = Field(default_factory=dict)

    _product_id = model_validator(mode="after")(_names_its_product)

    def written_version(self, meta: dict) -> int:
        version = _regions_version([meta["regions"]])
        if version == 1:
            del meta["regions"]
        return version

    @classmethod
    def check_version(cls, meta: dict, version: int) -> None:
        _regions_fit(meta, version, "regions")


class ViewResult(Part):
    """One view's part in a verdict."""

    camera: Name
    score: float
    threshold: float
    is_defect: bool
    model_version: str = Field(min_length=1)
    regions: Regions = Field(default_factory=list)


class Verdict(Message):
    """The product-level decision QA consumes: defective if any view is. Version 2 added the
    views' ``regions``, version 3 their outlines; each verdict is written at the oldest version
    that holds it (one none of whose views has a region, as version 1)."""

    kind: ClassVar[str] = "verdict"
    schema_version: ClassVar[int] = 3
    product_id: str = Field(min_length=1)
    line: Name
    product_seq: int = Field(ge=0, lt=MAX_PRODUCT_SEQ)
    decision: Literal["good", "defect", "unknown"]
    status: Literal["complete", "incomplete", "error"]
    views: list[ViewResult]
    missing_cameras: list[Name] = Field(default_factory=list)
    reason: str | None = None
    captured_at: Timestamp
    decided_at: Timestamp
    latency_ms: Milliseconds = Field(default_factory=dict)

    _product_id = model_validator(mode="after")(_names_its_product)

    def written_version(self, meta: dict) -> int:
        version = _regions_version([view["regions"] for view in meta["views"]])
        if version == 1:
            for view in meta["views"]:
                del view["regions"]
        return version

    @classmethod
    def check_version(cls, meta: dict, version: int) -> None:
        views = meta.get("views")
        for i, view in enumerate(views if isinstance(views, list) else []):
            if isinstance(view, dict):
                _regions_fit(view, version, f"views.{i}.regions")


class Label(Message):
    """QA's judgement of a product (or of one of its views)."""

    kind: ClassVar[str] = "label"
    line: Name
    product_id: str = Field(min_length=1)
    camera: Name | None = Field(default=None, description="None labels every view of the product")
    label: Literal["good", "defect"]
    by: str = Field(min_length=1)
    at: Timestamp
    note: str | None = None


class ModelVersion(Message):
    """A registered model: weights file named by content hash, metadata, lifecycle status."""

    kind: ClassVar[str] = "model_version"
    id: str = Field(min_length=1)
    path: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    metrics: dict[str, float] = Field(default_factory=dict)
    threshold: float
    created: Timestamp
    status: Literal["candidate", "active", "retired"]
    parent: str | None = None


class RetrainRequest(Message):
    """Someone asks the line's trainer to retrain now (`defectflow retrain`)."""

    kind: ClassVar[str] = "retrain_request"
    line: Name
    by: str = Field(min_length=1)
    at: Timestamp


class RetrainOutcome(Message):
    """What one retraining did: the candidate, how it compared with the active model, and why."""

    kind: ClassVar[str] = "retrain_outcome"
    line: Name
    at: Timestamp
    trigger: str
    outcome: Literal["promoted", "candidate", "rejected", "not retrained"]
    why: str
    candidate: str | None = None
    parent: str | None = None
    n_new_good_views: int = Field(ge=0)
    n_validation: int = Field(ge=0)
    candidate_metrics: dict[str, float | None] = Field(default_factory=dict)
    active_metrics: dict[str, float | None] = Field(default_factory=dict)
    retrain_seconds: float | None = Field(default=None, ge=0)


STREAM_MESSAGES: tuple[type[Message], ...] = (
    CameraFrame,
    ProductView,
    ViewScore,
    NoProduct,
    Verdict,
    Label,
    ModelVersion,
    RetrainRequest,
    RetrainOutcome,
)
