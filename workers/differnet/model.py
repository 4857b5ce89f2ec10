"""DifferNet (Rudolph, Wandt, Rosenhahn, WACV 2021) and its per-position sibling.

Two heads share the backbone and the flow:

* ``differnet``: the paper's. Features of the image at 3 scales, pooled over the product (mean,
  optionally also max) and concatenated; one flow models the vector. Score = mean NLL over the
  test-time transforms; defect map = gradient of that score with respect to the pixels.
* ``local``: a flow over per-position feature vectors (the CFlow-AD / FastFlow / CS-Flow family).
  The NLL map, averaged over transforms and smoothed, is the defect map; its maximum the score.

With ``memory_size > 0`` (the default) the flow's score is fused with a second one, the mean
distance of the image's positions, at its own scale, to their nearest good neighbours
(:mod:`.neighbours`): each score is standardised by its mean and spread on held-out good images,
and the two are weighted by the flow's share, which labelled validation images choose
(:func:`recipes.choose_flow_share`). This departs from the paper, on purpose: see docs/scorer.md
and docs/benchmarks.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import nn

from workers.differnet.backbone import Backbone, build_backbone
from workers.differnet.config import DifferNetConfig
from workers.differnet.flow import build_flow, negative_log_likelihood
from workers.differnet.neighbours import MemoryImage, PatchMemory, memory_image
from workers.differnet.views import (
    Box,
    Letterbox,
    apply_d4,
    crop_to_source,
    letterbox,
    normalised_exposure,
    tile_boxes,
    tile_cores,
    undo_d4,
)

EMBED_CHUNK = 8  # images per backbone pass when scoring
EQUAL_SHARES = 0.5  # the flow's share in the fused score where validation does not choose it


def fused(flow_z, memory_z, flow_share: float):
    """The fused score of standardised flow and memory scores (floats or arrays)."""
    return 2 * (flow_share * flow_z + (1 - flow_share) * memory_z)


@dataclass
class PreparedImage:
    """An image letterboxed to the input square, with its validity mask and placement."""

    pixels: torch.Tensor  # (3, S, S) in [0, 1]
    mask: torch.Tensor  # (1, S, S)
    box: Letterbox
    for_memory: MemoryImage | None = None  # the image as the patch memory compares it


@dataclass
class Tile:
    top: int
    left: int
    core: Box  # the part of the tile it judges, in its own pixels (views.tile_cores)
    image: PreparedImage


@dataclass
class TiledImage:
    """An image much larger than the input, as overlapping tiles cut at its own scale."""

    source_shape: tuple[int, int]
    tiles: list[Tile]


Prepared = PreparedImage | TiledImage


def units(images: list[Prepared]) -> list[PreparedImage]:
    """What the network sees of each image, in order: the image itself, or its tiles."""
    return [
        part
        for im in images
        for part in ([t.image for t in im.tiles] if isinstance(im, TiledImage) else [im])
    ]


@dataclass
class ScoredImage:
    score: float
    defect_map: np.ndarray | None = None  # (H, W) over the source image, larger = more anomalous


@dataclass
class Evidence:
    """What one unit's fused score and memory map are made of, before calibration: the flow's
    raw score and the memory's distance cells."""

    flow: float
    cells: torch.Tensor  # (h, w), NaN off the product
    source_shape: tuple[int, int]


def gathered(images: list[Prepared], results: list[ScoredImage]) -> list[ScoredImage]:
    """Each image's result from its :func:`units`' results: a tiled image scores its worst
    tile, and its map is made of its tiles' cores, each where it was cut."""
    out, at = [], 0
    for im in images:
        if not isinstance(im, TiledImage):
            out.append(results[at])
            at += 1
            continue
        mine = results[at : at + len(im.tiles)]
        at += len(im.tiles)
        defect_map = None
        if all(r.defect_map is not None for r in mine):
            defect_map = np.full(im.source_shape, np.nan, dtype=np.float32)
            for tile, r in zip(im.tiles, mine, strict=True):
                top, left, h, w = tile.core
                y, x = tile.top + top, tile.left + left
                defect_map[y : y + h, x : x + w] = r.defect_map[top : top + h, left : left + w]
            # Tiles with no product in their core were not scored: nothing was found there.
            defect_map = np.nan_to_num(defect_map, nan=float(np.nanmin(defect_map)))
        out.append(ScoredImage(max(r.score for r in mine), defect_map))
    return out


class Embedder(nn.Module):
    """Backbone features in the form each head models."""

    def __init__(self, backbone: Backbone, config: DifferNetConfig):
        super().__init__()
        self.backbone = backbone
        self.config = config
        n_pool = 2 if config.pooling == "mean+max" else 1
        self.pooled_dim = len(config.scales) * n_pool * sum(backbone.channels)
        self.dense_dim = sum(backbone.channels)
        self._grid_sizes: dict[int, list[tuple[int, int]]] = {}

    def pooled(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` in [0, 1] -> ``(B, pooled_dim)``, pooled over the product only."""
        return self.pooled_scaled(*self.scaled(x, mask))

    def scaled(self, x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """The images at each scale, each followed by its mask at each tap's grid (the share of
        each cell that is product). Done before the network, in PyTorch, for every runtime:
        OpenVINO resizes with antialiasing, and averages over cells that do not divide the
        image evenly, otherwise than PyTorch does."""
        out = []
        size = x.shape[-1]
        for scale in self.config.scales:
            s = max(32, round(size * scale))
            xs = x if s == size else F.interpolate(x, size=(s, s), mode="bilinear", antialias=True)
            ms = mask if s == size else F.interpolate(mask, size=(s, s), mode="area")
            out += [xs] + [F.interpolate(ms, size=hw, mode="area") for hw in self._grids(s)]
        return out

    def _grids(self, size: int) -> list[tuple[int, int]]:
        """The taps' feature map sizes for a ``size`` x ``size`` input."""
        if size not in self._grid_sizes:
            probe = torch.zeros(1, 3, size, size, device=self.backbone.mean.device)
            with torch.no_grad():
                self._grid_sizes[size] = [tuple(f.shape[-2:]) for f in self.backbone(probe)]
        return self._grid_sizes[size]

    def pooled_scaled(self, *scaled: torch.Tensor) -> torch.Tensor:
        """:meth:`pooled` of :meth:`scaled`'s images and masks."""
        parts = []
        group = 1 + len(self.backbone.taps)
        for at in range(0, len(scaled), group):
            xs, covers = scaled[at], scaled[at + 1 : at + group]
            for fmap, w in zip(self._features(xs), covers, strict=True):
                keep = (w >= 0.5).float()
                # A sliver of an image may cover no whole cell: fall back to any coverage.
                keep = torch.where(
                    keep.flatten(1).sum(1)[:, None, None, None] > 0, keep, (w > 0).float()
                )
                parts.append((fmap * keep).sum((2, 3)) / keep.sum((2, 3)).clamp_min(1.0))
                if self.config.pooling == "mean+max":
                    parts.append(fmap.masked_fill(keep == 0, float("-inf")).amax((2, 3)))
        return torch.cat(parts, dim=1)

    def dense(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position features at the finest tap: ``(B, C, h, w)`` and a ``(B, 1, h, w)`` mask."""
        fmaps = self._features(x)
        hw = fmaps[0].shape[-2:]
        feats = torch.cat(
            [
                f if f.shape[-2:] == hw else F.interpolate(f, size=hw, mode="bilinear")
                for f in fmaps
            ],
            dim=1,
        )
        return feats, (F.interpolate(mask, size=hw, mode="area") >= 0.5).float()

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.backbone.normalize(x).contiguous(memory_format=torch.channels_last)
        return self.backbone(x)


class DifferNet(nn.Module):
    """Backbone + feature standardisation + flow. Only the flow (and the statistics) are saved."""

    def __init__(self, config: DifferNetConfig, backbone_weights: Path | None = None):
        super().__init__()
        self.config = config
        backbone = build_backbone(config.backbone, backbone_weights, config.taps)
        self.embedder = Embedder(backbone.to(memory_format=torch.channels_last), config)
        dim = self.feature_dim
        self.flow = build_flow(dim, config.flow_blocks, config.subnet_width, config.clamp)
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_std", torch.ones(dim))
        self.memory = PatchMemory(
            build_backbone(config.backbone, backbone_weights, config.memory_taps),
            config.memory_components,
            config.memory_probes,
            config.memory_queries,
            config.memory_spacing,
            config.memory_border,
            config.memory_peak_share,
        )
        # Mean and spread of the flow's score and of the memory's on held-out good images.
        self.register_buffer("calibration", torch.tensor([0.0, 1.0, 0.0, 1.0]))
        # The flow's weight in the fused score (recipes.choose_flow_share); 0.5: equal weights.
        self.register_buffer("flow_share", torch.tensor(EQUAL_SHARES))
        # Exported graphs standing in for the networks (workers.differnet.export): None, PyTorch.
        self.exported = None

    def use_exported(self, exported) -> None:
        """Run the pooled flow and the memory's backbone as ``exported``'s graphs."""
        if self.config.head != "differnet":
            raise ValueError("only the pooled (differnet) head runs as an exported graph")
        self.exported = self.memory.exported = exported

    @property
    def feature_dim(self) -> int:
        local = self.config.head == "local"
        return self.embedder.dense_dim if local else self.embedder.pooled_dim

    @property
    def uses_memory(self) -> bool:
        return self.config.memory_size > 0

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What training made: flow, statistics, patch memory; not the frozen backbones."""
        return {
            k: v
            for k, v in self.state_dict().items()
            if not k.startswith(("embedder.", "memory.backbone."))
        }

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        # Models saved before the flow's share was chosen fused the two scores with equal weights;
        # those saved before the memory's spacing was measured score plain distances.
        bank_size = len(state.get("memory.bank", ()))
        state = {
            "flow_share": torch.tensor(EQUAL_SHARES),
            "memory.spacing": torch.zeros(bank_size, dtype=torch.float16),
        } | state
        missing = set(self.trainable_state()) - set(state)
        unexpected = set(state) - set(self.trainable_state())
        if missing or unexpected:
            raise ValueError(
                f"weights do not fit: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}"
            )
        bank, width = state["memory.bank"], self.memory.basis.shape[1]
        if bank.dim() != 2 or bank.shape[1] != width:
            raise ValueError(f"patch memory of shape {tuple(bank.shape)}, expected (n, {width})")
        for name in self.memory.SIZED_BY_TRAINING:  # their lengths are whatever training made
            setattr(
                self.memory, name, torch.empty_like(state[f"memory.{name}"], device=self.device)
            )
        self.load_state_dict(state, strict=False)

    # -- features ---------------------------------------------------------------------------

    def prepare(self, rgb: np.ndarray, product_mask: np.ndarray | None = None) -> Prepared:
        """Letterbox ``rgb``, or cut it into tiles at its own scale when it is more than
        ``tile_above`` input sizes long; ``product_mask`` (``(H, W)``, >0 = product) limits what
        counts, and a tile without product is left out."""
        cuts = self._tile_cuts(rgb.shape[:2], product_mask)
        if self.config.exposure_target is not None:
            rgb = normalised_exposure(rgb, product_mask, self.config.exposure_target)
        if not cuts:
            return self._letterboxed(rgb, product_mask)
        tiles = []
        for (top, left, h, w), core, judged in cuts:
            cut = (slice(top, top + h), slice(left, left + w))
            mask = None if product_mask is None else product_mask[cut]
            image = self._letterboxed(np.ascontiguousarray(rgb[cut]), mask, judged)
            tiles.append(Tile(top, left, core, image))
        return TiledImage(rgb.shape[:2], tiles)

    def unit_count(self, shape: tuple[int, int], product_mask: np.ndarray | None = None) -> int:
        """How many views :meth:`prepare` makes of an image of ``shape`` (its tiles, or one),
        without preparing it."""
        return len(self._tile_cuts(shape, product_mask)) or 1

    def _tile_cuts(
        self, shape: tuple[int, int], product_mask: np.ndarray | None
    ) -> list[tuple[Box, Box, np.ndarray]]:
        """The tiles of an image of ``shape`` that hold product: each one's box, core and the
        positions it judges (its core of product); none where the image is letterboxed whole
        (short enough, or no product anywhere: judged whole, as a sliver of product is)."""
        if product_mask is not None and product_mask.shape != shape:
            raise ValueError(f"mask shape {product_mask.shape} is not the image's {shape}")
        size, above = self.config.image_size, self.config.tile_above
        if above is None or max(shape) <= above * size:
            return []
        cuts = []
        boxes = tile_boxes(shape, size, self.config.tile_overlap)
        for (top, left, h, w), core in zip(boxes, tile_cores(shape, boxes), strict=True):
            judged = np.zeros((h, w), np.uint8)
            judged[core[0] : core[0] + core[2], core[1] : core[1] + core[3]] = 1
            if product_mask is not None:
                judged &= product_mask[top : top + h, left : left + w] > 0
            if judged.any():
                cuts.append(((top, left, h, w), core, judged))
        return cuts

    def _letterboxed(
        self, rgb: np.ndarray, product_mask: np.ndarray | None, judged: np.ndarray | None = None
    ) -> PreparedImage:
        """``judged``: the positions the memory scores and maps (a tile's core of product; the
        product where None). The flow pools the whole product in view, as it learnt to."""
        pixels, mask, box = letterbox(rgb, self.config.image_size)
        if product_mask is not None:
            m = np.repeat((product_mask > 0).astype(np.uint8)[:, :, None], 3, axis=2) * 255
            mask = mask * letterbox(m, self.config.image_size)[0][:1].round()
        judged = product_mask if judged is None else judged
        side = self.config.memory_side
        for_memory = memory_image(rgb, judged, side) if self.uses_memory else None
        return PreparedImage(pixels, mask, box, for_memory)

    def pooled_nll(self, *scaled: torch.Tensor) -> torch.Tensor:
        """Letterboxed images and masks at every scale (:meth:`Embedder.scaled`) -> ``(B,)``
        NLL of the pooled head."""
        return self.nll(self.embedder.pooled_scaled(*scaled))

    def embed(self, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Raw (unstandardised) features of a batch: ``(B, D)`` or ``(B, D, h, w)``."""
        if self.config.head == "local":
            feats, _ = self.embedder.dense(pixels, mask)
            return feats
        return self.embedder.pooled(pixels, mask)

    def standardize(self, feats: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (feats.dim() - 2)
        return (feats - self.feature_mean.view(shape)) / self.feature_std.view(shape)

    def nll(self, feats: torch.Tensor) -> torch.Tensor:
        """NLL of raw features: ``(B,)`` for pooled, ``(B, h, w)`` for dense feature maps."""
        z = self.standardize(feats)
        if z.dim() == 2:
            return negative_log_likelihood(self.flow, z)
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        return negative_log_likelihood(self.flow, flat).view(b, h, w)

    # -- scoring ----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.feature_mean.device

    def transformed(
        self, images: list[PreparedImage], transforms: range
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch of every image under every transform, image-major: ``(N*T, 3, S, S)``.

        Images are prepared on the CPU; the batch goes to the model's device.
        """
        pix = torch.stack([apply_d4(im.pixels, t) for im in images for t in transforms])
        mask = torch.stack([apply_d4(im.mask, t) for im in images for t in transforms])
        return pix.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def score_batch(self, images: list[Prepared]) -> list[ScoredImage]:
        """Scores (and, for the local head, defect maps) without gradients: the streaming path."""
        flat = units(images)
        scored = self.flow_scores(flat)
        if self.uses_memory:
            scored = [
                ScoredImage(self.fuse(r.score, self.memory.score(im.for_memory)), r.defect_map)
                for r, im in zip(scored, flat, strict=True)
            ]
        return gathered(images, scored)

    def standardised(self, flow_score, memory_score):
        """Both scores (floats or arrays) standardised on held-out good images."""
        flow_mean, flow_std, memory_mean, memory_std = self.calibration.tolist()
        return (flow_score - flow_mean) / flow_std, (memory_score - memory_mean) / memory_std

    def fuse(self, flow_score: float, memory_score: float) -> float:
        """The two scores, standardised, weighted by the flow's share, twice over: at equal
        shares, their sum."""
        return fused(*self.standardised(flow_score, memory_score), float(self.flow_share))

    @torch.no_grad()
    def calibrate(self, good: list[Prepared], owners: list[int] | None = None) -> dict:
        """Standardise both scores on ``good`` images the flow did not learn from, tile by tile.

        ``owners``: when the images are the training images themselves, the index of each of
        their :func:`units` in the memory's training set, so that each is compared with the
        others' positions only.
        """
        return self.calibrate_on(self.evidence(units(good), owners))

    def calibrate_on(self, good: list[Evidence]) -> dict:
        """:meth:`calibrate` from the evidence of good units already drawn."""
        if len(good) < 2:
            raise ValueError(f"calibration needs at least 2 good images, got {len(good)}")
        flow = np.array([e.flow for e in good])
        memory = np.array([self.memory.score_of_map(e.cells) for e in good])
        values = {
            "flow_mean": float(flow.mean()),
            "flow_std": max(float(flow.std()), 1e-6),
            "memory_mean": float(memory.mean()),
            "memory_std": max(float(memory.std()), 1e-6),
        }
        self.calibration.copy_(torch.tensor(list(values.values())))
        return values

    @torch.no_grad()
    def flow_scores(self, images: list[PreparedImage]) -> list[ScoredImage]:
        """The flow's own scores (mean NLL over the transforms, or the local head's map)."""
        self.eval()
        tta = range(self.config.tta)
        pix, mask = self.transformed(images, tta)
        # Backbone passes in chunks: on a CPU, one huge batch runs slower per image than several
        # cache-sized ones.
        step = EMBED_CHUNK
        chunks = [(pix[i : i + step], mask[i : i + step]) for i in range(0, len(pix), step)]
        if self.config.head == "differnet":
            run = self.pooled_nll if self.exported is None else self.exported.pooled_nll
            nll = torch.cat([run(*self.embedder.scaled(p, m)).cpu() for p, m in chunks])
            per_image = nll.view(len(images), len(tta)).mean(1)
            return [ScoredImage(float(s)) for s in per_image]
        nll = self.nll(torch.cat([self.embed(p, m) for p, m in chunks])).cpu()
        return self._local_results(images, nll, mask.cpu())

    def _local_results(self, images, nll: torch.Tensor, mask: torch.Tensor) -> list[ScoredImage]:
        t_count = self.config.tta
        valid = F.interpolate(mask, size=nll.shape[-2:], mode="area") >= 0.5
        out = []
        for i, im in enumerate(images):
            maps = []
            for j in range(t_count):
                k = i * t_count + j
                m = nll[k].masked_fill(~valid[k, 0], float("nan"))
                maps.append(undo_d4(m, j))
            mean_map = torch.stack(maps).mean(0)
            score_map = _smooth_cells(mean_map.numpy(), sigma=1.0)
            out.append(ScoredImage(float(np.nanmax(score_map)), self._to_source(mean_map, im.box)))
        return out

    def _to_source(self, cell_map: torch.Tensor, box: Letterbox) -> np.ndarray:
        size = self.config.image_size
        filled = torch.nan_to_num(cell_map, nan=float(np.nanmin(cell_map.numpy())))
        up = F.interpolate(filled[None, None], size=(size, size), mode="bilinear")[0, 0]
        return crop_to_source(up, box)

    @property
    def map_source(self) -> str:
        """Where defect maps come from (``local``: the local head's own NLL map)."""
        if self.config.head == "local":
            return "local"
        if self.config.map_source is not None:
            return self.config.map_source
        return "memory" if self.uses_memory else "gradient"

    def defect_maps(
        self, images: list[Prepared], source: str | None = None, owners: list[int] | None = None
    ):
        """Scores with defect maps over each source image, from ``source`` (default: the
        model's :attr:`map_source`). ``owners``: as for :meth:`calibrate` (memory maps only)."""
        source = source or self.map_source
        if source == "local":
            return self.score_batch(images)
        if source == "memory":
            return gathered(images, self._memory_maps(units(images), owners))
        if source != "gradient":
            raise ValueError(f"no defect maps from {source!r}: memory, gradient or local")
        return gathered(images, self._gradient_maps(units(images)))

    @torch.no_grad()
    def evidence(self, images: list[PreparedImage], owners=None) -> list[Evidence]:
        """Each unit's :class:`Evidence`, the backbone run once per unit and scale. ``owners``:
        as for :meth:`calibrate`."""
        if not self.uses_memory:
            raise ValueError("this model has no patch memory: its maps come from the gradient")
        owners = owners or [None] * len(images)
        chunks = [images[i : i + EMBED_CHUNK] for i in range(0, len(images), EMBED_CHUNK)]
        flows = [r.score for chunk in chunks for r in self.flow_scores(chunk)]
        return [
            Evidence(flow, self.memory.distance_map(im.for_memory, owner), im.box.source_shape)
            for flow, im, owner in zip(flows, images, owners, strict=True)
        ]

    def scored(self, evidence: Evidence) -> ScoredImage:
        """The fused score and the memory's map of one unit's evidence: every position's
        distance to its nearest good position, over the source image (the memory sees the whole
        image, no letterbox), its cells smoothed as the map_sigma input pixels say at the
        source's scale."""
        cells = evidence.cells
        score = self.fuse(evidence.flow, self.memory.score_of_map(cells))
        filled = torch.nan_to_num(cells, nan=float(np.nanmin(cells.numpy())))
        source = evidence.source_shape
        up = F.interpolate(filled[None, None], size=source, mode="bilinear")[0, 0].numpy()
        sigma = self.config.map_sigma * max(source) / self.config.image_size
        return ScoredImage(score, gaussian_filter(up, sigma) if sigma else up)

    def _memory_maps(self, images: list[PreparedImage], owners=None) -> list[ScoredImage]:
        """Scores with the patch memory's maps (:meth:`scored`)."""
        return [self.scored(e) for e in self.evidence(images, owners)]

    def _gradient_maps(self, images: list[PreparedImage]) -> list[ScoredImage]:
        """Scores with the gradient of each image's score with respect to its pixels."""
        self.eval()
        results = []
        tta = range(self.config.tta)
        for im in images:
            pix, mask = self.transformed([im], tta)
            pix = pix.clone().requires_grad_(True)
            nll = self.nll(self.embed(pix, mask))
            nll.mean().backward()
            # Undo each transform on its gradient, then average |grad| over transforms and colour.
            grads = torch.stack([undo_d4(pix.grad[j], j) for j in tta]).abs().mean((0, 1))
            grad = grads.cpu().numpy()
            if self.config.map_sigma > 0:
                grad = gaussian_filter(grad, sigma=self.config.map_sigma)
            square = torch.from_numpy(grad**2)
            score = float(nll.detach().mean())
            if self.uses_memory:
                score = self.fuse(score, self.memory.score(im.for_memory))
            results.append(ScoredImage(score, crop_to_source(square, im.box)))
        return results


def _smooth_cells(cell_map: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing that ignores NaN (padding) cells."""
    valid = ~np.isnan(cell_map)
    filled = np.where(valid, cell_map, 0.0)
    num = gaussian_filter(filled, sigma)
    den = gaussian_filter(valid.astype(np.float64), sigma)
    out = num / np.maximum(den, 1e-8)
    out[~valid] = np.nan
    return out
