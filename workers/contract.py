"""A model's input contract: how the crops it learned from were cut and sized.

A model learns the product's border in every crop it sees. Crops cut another way (another mask
shape or shrink, another box margin, another detector's boxes, another size) are out of its
distribution, and it takes every one of them for a defect. So the way the crops were cut is
written into the model's metadata when it trains, and a line takes its front end's settings from
its active model; a line file that contradicts the model is refused (``resolve_crops``).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# What the product's mask is cut from. "silhouette": the composite mask as it is, its holes
# filled (any product shape). "hull": its convex hull, for convex products, whose dark edge
# spots the belt model takes for belt and bites out of the silhouette. "box": the whole detected
# box, for rectangular products (tiles, boards, panels): the belt then shows only where the box
# and the product differ, and the shrink cuts that rim away.
MaskShape = Literal["silhouette", "hull", "box"]
# Where the product's box comes from: the classical contour detector, or YOLO weights.
BoxSource = Literal["contour", "yolo"]
# What runs a model's networks: PyTorch, or its export's graphs (workers.differnet.export).
Runtime = Literal["torch", "onnx", "openvino"]

# Views travel at most this many pixels on their longer side. The scorers use less (the flow
# letterboxes to its input size, 224 or 320 px; the patch memory compares at 160 x 160 px of
# area), and larger crops cost several times as much to encode and decode as PNG.
VIEW_MAX_SIDE = 320


class CropSpec(BaseModel):
    """How the front end cuts a product's view out of a gated frame."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    box_source: BoxSource = "contour"
    box_margin: float = Field(
        default=0.05, ge=0.0, le=0.5, description="the box grows by this share per side"
    )
    mask_shape: MaskShape = "silhouette"
    mask_shrink: float = Field(
        default=0.1, ge=0.0, lt=0.5, description="the mask is shrunk by this share per side"
    )
    view_max_side: int = Field(
        default=VIEW_MAX_SIDE, ge=32, le=4096, description="longer side of a view, at most"
    )


class InputContract(BaseModel):
    """Everything a view must match to be in a model's distribution."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    crops: CropSpec
    # The scorer applies these itself from the model's config; recorded here so that whoever
    # feeds the model (another runtime, another line) reads one place.
    image_size: int = Field(ge=32, description="views are letterboxed to this square")
    resize: Literal["letterbox"] = "letterbox"
    # A view longer than tile_above input sizes is cut into overlapping squares of image_size
    # pixels at its own scale (overlapping by tile_overlap), each letterboxed, and scores its
    # worst one. None: every view is letterboxed whole.
    tile_above: float | None = Field(default=2.0, ge=1.0)
    tile_overlap: float = Field(default=0.25, ge=0.0, le=0.75)
    channels: Literal["rgb"] = "rgb"  # views are RGBA PNGs; the alpha is the product mask

    @classmethod
    def of(cls, metadata: dict) -> InputContract | None:
        """The contract in a model's metadata; None for a model trained before contracts."""
        raw = metadata.get("input_contract")
        if raw is None:
            return None
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ContractConflict(
                f"malformed input_contract in the model's metadata: {exc}"
            ) from None


class ContractConflict(ValueError):
    """A line's front end would cut crops other than those its model learned from."""


def resolve_crops(
    line_values: dict[str, object], contract: InputContract | None, model: str
) -> CropSpec:
    """The crops a line cuts: what it sets itself, each setting it leaves out (None) from the
    model's contract, else the default. A set value the contract contradicts raises
    :class:`ContractConflict` naming the field, the model's value and the line's."""
    unknown = set(line_values) - set(CropSpec.model_fields)
    if unknown:
        raise ValueError(f"not crop settings: {sorted(unknown)}")
    wanted = contract.crops.model_dump() if contract else {}
    conflicts = []
    for name, value in line_values.items():
        if value is None or name not in wanted:
            continue
        theirs = wanted[name]
        same = (
            math.isclose(value, theirs, abs_tol=1e-9)
            if isinstance(value, float) or isinstance(theirs, float)
            else value == theirs
        )
        if not same:
            conflicts.append(
                f"{name} is {value!r} in the line's settings, {theirs!r} in model {model}"
            )
    if conflicts:
        raise ContractConflict(
            "; ".join(conflicts)
            + ": the model learned from crops cut its way (its input_contract). Leave these "
            "settings out to follow the model, or train a model on crops cut the line's way"
        )
    return CropSpec(**(wanted | {k: v for k, v in line_values.items() if v is not None}))
