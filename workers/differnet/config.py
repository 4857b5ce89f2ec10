"""What a DifferNet is made of: its backbone, taps, heads and input sizes (stored with a model).

Plain data, without torch: model folders are checked and a line's actors that never score read
models' settings without loading it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

BackboneName = Literal["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "alexnet"]

# Taps index the backbone's stages: EfficientNet-Lite's MBConv blocks (``_blocks[i]``), AlexNet's
# ``features[i]``. Lite0's later-middle blocks beat its head on MTD (docs/scorer.md): the last
# block at stride 16 and the last but one at stride 32. Lite1 and 2 are deeper (21 blocks against
# 16); their taps end the same stages.
DEFAULT_TAPS: dict[str, tuple[int, ...]] = {
    "efficientnet-lite0": (10, 14),
    "efficientnet-lite1": (14, 19),
    "efficientnet-lite2": (14, 19),
    "alexnet": (12,),
}
# The patch memory's taps: a fine (stride 8) and a coarser (stride 16) stage, as PatchCore takes.
DEFAULT_MEMORY_TAPS: dict[str, tuple[int, ...]] = {
    "efficientnet-lite0": (4, 10),
    "efficientnet-lite1": (6, 14),
    "efficientnet-lite2": (6, 14),
    "alexnet": (4, 7),
}

# (quarter turns, mirrored). The first 4 are the rotations, the default test-time set.
D4: tuple[tuple[int, bool], ...] = tuple((k, False) for k in range(4)) + tuple(
    (k, True) for k in range(4)
)


class DifferNetConfig(BaseModel):
    """Everything needed to rebuild the network (stored in the model's metadata)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: BackboneName = "efficientnet-lite0"
    taps: tuple[int, ...] = DEFAULT_TAPS["efficientnet-lite0"]
    head: Literal["differnet", "local"] = "differnet"
    image_size: int = Field(default=320, ge=64, le=1024)
    scales: tuple[float, ...] = (1.0, 0.5, 0.25)
    pooling: Literal["mean", "mean+max"] = "mean+max"
    flow_blocks: int = Field(default=8, ge=1, le=32)
    subnet_width: int = Field(default=256, ge=16, le=4096)
    clamp: float = Field(default=3.0, gt=0)
    train_transforms: int = Field(default=8, ge=1, le=len(D4))
    jitter: float = Field(default=0.0, ge=0.0, lt=1.0)
    tta: int = Field(default=1, ge=1, le=len(D4))
    map_sigma: float = Field(default=3.0, ge=0.0, description="Gaussian sigma, input pixels")
    # What a defect map shows: each position's distance to the patch memory's nearest good one,
    # or the gradient of the score (the paper's); None: the memory's where there is one.
    map_source: Literal["memory", "gradient"] | None = None
    # The patch memory (0 positions: the flow alone), its subspace and the positions queried.
    memory_size: int = Field(default=262144, ge=0, le=4_000_000)
    # How training draws the memory's positions: "random", uniformly, so the memory follows the
    # density of good surfaces; "coverage", from a pool 2.5 times larger, drawing a position the
    # more often the farther it lies from a random quarter of the memory (PatchCore's coreset
    # aims the same way), so rare good patterns (a long part's seams) are kept at the same size.
    memory_draw: Literal["random", "coverage"] = "random"
    memory_taps: tuple[int, ...] = DEFAULT_MEMORY_TAPS["efficientnet-lite0"]
    memory_components: int = Field(default=64, ge=1, le=4096)
    memory_probes: int = Field(default=4, ge=1, le=4096)
    memory_queries: int = Field(default=256, ge=1, le=65536)
    # The share of the nearest remembered position's spacing (its distance to its own nearest
    # remembered neighbour) taken off a position's distance: good surfaces rare among good
    # products (a long part's seams) then count less against a product. 0: PatchCore's distance.
    memory_spacing: float = Field(default=0.5, ge=0.0, le=1.0)
    # Products are compared at an area of memory_side squared pixels: a position then covers
    # the same share of any product, and sees more of its surroundings (docs/benchmarks.md).
    memory_side: int = Field(default=160, ge=32, le=4096)
    # How a position at the image's edge averages its 3 x 3 neighbourhood: with the zero padding
    # counted in ("zeros"), which shrinks the edge's features and their distances, so defects at
    # a part's edge score low in the map; or over its cells inside the image ("valid"): the maps
    # find edge defects (docs/benchmarks.md, "The edge"), but an edge or corner position averages
    # fewer cells, so its distance is noisier: with few training images a good corner can
    # outscore a small defect, and products never seen score a little worse.
    memory_border: Literal["zeros", "valid"] = "zeros"
    # An image's memory score: the mean of its positions' distances, this share of it given to
    # the mean of its farthest 5 % instead: a small defect then counts beside the overall
    # distance, which on products never seen is high everywhere. 0: the mean alone, as models
    # saved before this setting (workers.differnet.store loads them so).
    memory_peak_share: float = Field(default=0.5, ge=0.0, le=1.0)
    # An image whose longer side exceeds tile_above input sizes is scored as overlapping tiles of
    # image_size pixels at its own scale, and scores its worst tile: letterboxed whole, a long
    # part shrinks several times and a thin crack on it vanishes. None: always letterboxed.
    tile_above: float | None = Field(default=2.0, ge=1.0)
    tile_overlap: float = Field(default=0.25, ge=0.0, le=0.75)
    # Each image is first brought, by one gain, to this median luminance of its product (0 to
    # 255): a line's light drifts and its cameras and products differ in exposure, and the
    # model then learns the product's texture rather than its brightness. None: as captured
    # (brightness itself is then part of what a good product looks like).
    exposure_target: float | None = Field(default=None, gt=0.0, lt=255.0)

    @model_validator(mode="before")
    @classmethod
    def _backbone_taps(cls, data):
        """A backbone's own taps where none are given: Lite2's blocks are not Lite0's."""
        if isinstance(data, dict) and data.get("backbone") in DEFAULT_TAPS:
            name = data["backbone"]
            data = {"taps": DEFAULT_TAPS[name], "memory_taps": DEFAULT_MEMORY_TAPS[name]} | data
        return data

    @field_validator("image_size")
    @classmethod
    def _multiple_of_32(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"must be a multiple of 32, got {v}")
        return v

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not 0 < s <= 1 for s in v):
            raise ValueError("scales must be in (0, 1]")
        return v
