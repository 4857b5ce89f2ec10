"""Nearest good neighbours per position: what the pooled flow averages away.

The pooled flow (DifferNet) models a whole product as one vector: a small blowhole or a thin
crack barely moves that vector. Per-position features, compared with a memory of positions seen
on good images (the idea of PatchCore, Roth et al., CVPR 2022), do see them. Every product is
compared at one size (``memory_image``), so that a position covers the same share of any
product. The two err on different images, so the sum of their calibrated scores ranks better
than either (docs/benchmarks.md, "The scorer").

Image score = mean over the product's positions of the distance to the nearest remembered good
position, less a share of that position's own spacing (its distance to the nearest other
remembered position): a good surface that is rare on good products (a long part's seam, a
fixture's edge) lies in a sparse part of the memory, and a product near it differs from it no
more than good products differ from each other there; on a common surface a small distance
already counts (local outlier factors rest on the same idea). A mean wants the memory to follow
the density of good surfaces, so the memory is a uniform random sample of good positions by
default, and a large one (on MTD tiles at their own size: 0.97 from 114,150 random positions,
0.90 from PatchCore's greedy k-centre coreset of 16,384); a draw weighted towards rare positions
(``covering``) keeps more of what a uniform one loses, where good parts vary more than a memory
holds (long parts' seams). What keeps scoring cheap instead: positions are compared in a
principal-component subspace of their features, through an inverted-file index, at a fixed
number of evenly spread positions of the image whatever its size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workers.differnet.backbone import Backbone
from workers.differnet.views import apply_d4

MIN_SIDE = 32  # the backbone needs a few cells of stride 8
PCA_SAMPLE = 65536  # positions the subspace is fitted on
KMEANS_ITERATIONS = 10
# Positions per list, on average. Large lists mean few, large matrix products, which a CPU
# computes better than many small ones.
LIST_SIZE = 2048
CHUNK = 16384  # rows per distance block: bounds the memory a (rows x lists) block takes
# The coverage draw (DifferNetConfig.memory_draw): its pool against the memory's size, the
# random share it measures distances to, and the power of the distance a position is drawn by.
COVERAGE_POOL = 2.5
COVERAGE_SEED_SHARE = 0.25
COVERAGE_POWER = 4
# The farthest positions an image's peak averages (DifferNetConfig.memory_peak_share): of a
# 20 x 20 grid, 13 of the 256 queried, which a defect of 1 % of the image (4 cells, each
# spreading into its 3 x 3 neighbours' patches) fills.
PEAK_FRACTION = 0.05


@dataclass
class MemoryImage:
    """A product's image at the memory's size, and its product mask."""

    pixels: torch.Tensor  # (3, h, w) in [0, 1]
    mask: torch.Tensor  # (1, h, w), 1 = product


def memory_image(rgb: np.ndarray, product_mask: np.ndarray | None, side: int) -> MemoryImage:
    """Resized, aspect kept, to an area of ``side`` squared (and a shorter side of at least
    ``MIN_SIDE``): every product is compared at one size, whatever the camera's distance."""
    h, w = rgb.shape[:2]
    scale = max(side / (h * w) ** 0.5, MIN_SIDE / min(h, w))
    size = (max(MIN_SIDE, round(h * scale)), max(MIN_SIDE, round(w * scale)))
    pixels = torch.tensor(rgb).permute(2, 0, 1).float().div_(255.0)
    mask = torch.ones(1, h, w) if product_mask is None else torch.from_numpy(product_mask > 0)
    mask = mask.float().view(1, h, w)
    if size != (h, w):
        pixels = F.interpolate(pixels[None], size=size, mode="bilinear", antialias=True)[0]
        mask = F.interpolate(mask[None], size=size, mode="area")[0]
    return MemoryImage(pixels.clamp_(0.0, 1.0), mask)


class PatchMemory(nn.Module):
    """Good positions, projected on their principal components, in an inverted-file index.

    The memory is split into lists by k-means; a query is compared with the positions of its
    ``probes`` nearest lists only (an IVF index, as FAISS builds), so that a memory of a few
    hundred thousand positions is searched in milliseconds. Positions are kept in float16.
    """

    def __init__(
        self,
        backbone: Backbone,
        components: int,
        probes: int,
        queries: int,
        spacing_share: float,
        border: str,
        peak_share: float,
    ):
        super().__init__()
        self.backbone = backbone
        self.border = border
        self.peak_share = peak_share
        self.probes = probes
        self.queries = queries
        self.spacing_share = spacing_share
        self.dim = sum(backbone.channels)
        components = min(components, self.dim)
        self.register_buffer("center", torch.zeros(self.dim))
        self.register_buffer("basis", torch.eye(self.dim, components))
        # Sized by training: positions sorted by list, list centroids, where each list starts,
        # and each position's distance to its nearest other position.
        self.register_buffer("bank", torch.zeros(0, components, dtype=torch.float16))
        self.register_buffer("centroids", torch.zeros(0, components))
        self.register_buffer("offsets", torch.zeros(1, dtype=torch.long))
        self.register_buffer("spacing", torch.zeros(0, dtype=torch.float16))
        # Which training image each remembered position came from (not saved: only used to
        # leave an image's own positions out when calibrating on the training images).
        self.owner: torch.Tensor | None = None
        # An exported graph standing in for :meth:`features` (workers.differnet.export).
        self.exported = None

    SIZED_BY_TRAINING = ("bank", "centroids", "offsets", "spacing")

    @property
    def size(self) -> int:
        return len(self.bank)

    @torch.no_grad()
    def view_positions(self, side: int) -> int:
        """Positions of one view of a product that fills its memory image (``side`` squared)."""
        return self.features(torch.zeros(1, 3, side, side, device=self.center.device))[0, 0].numel()

    @torch.no_grad()
    def positions(self, image: MemoryImage, transform: int = 0) -> torch.Tensor:
        """``(n, dim)`` raw features of the product's positions under a D4 ``transform``."""
        feats, valid = self.grid(image, transform)
        return feats[valid]

    @torch.no_grad()
    def grid(self, image: MemoryImage, transform: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, w, dim)`` raw features of every position, and ``(h, w)``: which are the
        product's."""
        device = self.center.device
        pixels = apply_d4(image.pixels, transform)[None].to(device)
        mask = apply_d4(image.mask, transform)[None].to(device)
        run = self.features if self.exported is None else self.exported.memory_features
        feats = run(pixels)[0]
        grid = feats.shape[-2:]
        cover = F.interpolate(mask, size=grid, mode="area")[0, 0]
        valid = cover >= 0.5
        if not valid.any():  # a sliver of product: any coverage counts
            valid = cover > 0 if (cover > 0).any() else torch.ones_like(valid)
        return feats.permute(1, 2, 0), valid

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(1, 3, h, w)`` in [0, 1] -> ``(1, dim, h', w')``: all taps at the finest one's grid."""
        maps = self.backbone(self.backbone.normalize(pixels))
        grid = maps[0].shape[-2:]
        feats = torch.cat([F.interpolate(m, size=grid, mode="bilinear") for m in maps], dim=1)
        # 3 x 3 neighbourhood average: a position describes its patch, not one cell (PatchCore).
        return F.avg_pool2d(feats, 3, 1, 1, count_include_pad=self.border == "zeros")

    def project(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.center) @ self.basis

    @torch.no_grad()
    def fill(self, pool: torch.Tensor, owner: torch.Tensor, size: int, seed: int) -> None:
        """Fit the subspace and the lists on ``pool`` (raw features); keep ``size`` positions."""
        self._fit(pool, owner, size, seed)
        self.spacing = self.measure_spacing()

    @torch.no_grad()
    def _fit(self, pool: torch.Tensor, owner: torch.Tensor, size: int, seed: int) -> None:
        """:meth:`fill` but the spacing, which only scoring reads."""
        generator = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(pool), generator=generator)[:size].to(pool.device)
        pool, owner = pool[keep], owner[keep.to(owner.device)]
        sample = pool[:PCA_SAMPLE]  # already shuffled
        center = sample.mean(0)
        # Randomised PCA: a few power iterations are plenty for the leading components.
        components = self.basis.shape[1]
        _, _, v = torch.pca_lowrank(sample - center, q=components, center=False, niter=4)
        self.center.copy_(center)
        self.basis.copy_(v[:, :components])
        rows = self.project(pool)
        self.centroids = kmeans(rows, -(-len(rows) // LIST_SIZE), generator)
        self._index(rows, owner)

    @torch.no_grad()
    def covering(
        self, pool: torch.Tensor, owner: torch.Tensor, size: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` positions of ``pool`` (raw) and their owners, each drawn the more likely the
        farther it lies from a random share of the pool (its distance to the power
        ``COVERAGE_POWER``): common surfaces stay, rare ones are kept more often than a uniform
        draw keeps them. Leaves this memory holding that random share, its spacing unmeasured:
        ``fill`` follows."""
        if len(pool) <= size:
            return pool, owner
        # The plain distance, so the random share's spacing is never measured.
        self._fit(pool, owner, max(1, round(size * COVERAGE_SEED_SHARE)), seed)
        chunks = [pool[i : i + CHUNK] for i in range(0, len(pool), CHUNK)]
        distance = torch.cat([self.nearest_good(self.project(c))[0] for c in chunks]).cpu()
        # A weighted draw without replacement (Efraimidis and Spirakis): the largest
        # log(u) / weight. The random share itself lies at distance 0: drawn last.
        generator = torch.Generator().manual_seed(seed)
        keys = torch.rand(len(pool), generator=generator).log() / distance.pow(COVERAGE_POWER)
        keep = keys.topk(size).indices.to(pool.device)
        return pool[keep], owner[keep.to(owner.device)]

    def adopt(self, other: PatchMemory) -> None:
        """Take ``other``'s subspace, lists and positions (a retrained model starts from them)."""
        for name in ("center", "basis", *self.SIZED_BY_TRAINING):
            setattr(self, name, getattr(other, name).to(self.center.device, copy=True))
        self.owner = None

    @torch.no_grad()
    def extend(self, pool: torch.Tensor, share: float, size: int, seed: int) -> None:
        """Give new positions (raw) ``share`` of a memory of ``size``; the rest stays as it was.

        The subspace and the lists stay: kept and new positions must be comparable.
        """
        generator = torch.Generator().manual_seed(seed)
        n_new = min(len(pool), max(1, round(share * size)))
        n_kept = min(self.size, size - n_new)
        kept = self.bank[torch.randperm(self.size, generator=generator)[:n_kept]].float()
        new = self.project(pool[torch.randperm(len(pool), generator=generator)[:n_new]])
        self._index(torch.cat([kept, new]), None)
        self.spacing = self.measure_spacing()

    def _index(self, rows: torch.Tensor, owner: torch.Tensor | None) -> None:
        assign = nearest(rows, self.centroids)
        order = torch.argsort(assign, stable=True)
        counts = torch.bincount(assign, minlength=len(self.centroids))
        self.bank = rows[order].half()
        self.offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.owner = None if owner is None else owner.to(order.device)[order]

    @torch.no_grad()
    def measure_spacing(self) -> torch.Tensor:
        """``(size,)`` each remembered position's distance to its nearest other one."""
        if self.size < 2:
            return torch.zeros(self.size, dtype=torch.float16, device=self.bank.device)
        everyone = torch.arange(self.size, device=self.bank.device)
        return torch.cat(
            [
                self.nearest_good(self.bank[i : i + CHUNK].float(), but=everyone[i : i + CHUNK])[0]
                for i in range(0, self.size, CHUNK)
            ]
        ).half()

    def distances(self, queries: torch.Tensor, leave_out: int | None = None) -> torch.Tensor:
        """``(n,)`` each projected query's distance to its nearest remembered position, less
        ``spacing_share`` of that position's spacing. ``leave_out``: as for
        :meth:`nearest_good`."""
        distance, index = self.nearest_good(queries, leave_out)
        return distance - self.spacing_share * self.spacing[index].float()

    def nearest_good(
        self,
        queries: torch.Tensor,
        leave_out: int | None = None,
        but: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n,)`` distance of each projected query to its nearest remembered position, among
        the ``probes`` lists nearest to it (or all, for a query none of them serves), and that
        position's index.

        ``leave_out``: ignore the positions that training image number ``leave_out`` gave.
        ``but``: for each query, a remembered position to ignore (the query itself).
        """
        if self.size == 0:
            raise ValueError("the patch memory is empty: build it from good images first")
        probes = min(self.probes, len(self.centroids))
        probed = squared_distances(queries, self.centroids).topk(probes, largest=False).indices
        # Each list's candidates first, then one reduction: per-list updates of the best so far
        # cost more in PyTorch's per-call overhead than the lists' own distances.
        found = []
        for i in probed.unique().tolist():
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            if lo < hi:
                which = (probed == i).any(1).nonzero()[:, 0]
                skip = None if but is None else but[which]
                found.append((which, *self._nearest(queries[which], lo, hi, leave_out, skip)))
        best = torch.full((len(queries),), float("inf"), device=queries.device)
        index = torch.zeros(len(queries), dtype=torch.long, device=queries.device)
        if found:
            whom, candidates, where = (torch.cat(parts) for parts in zip(*found, strict=True))
            best.scatter_reduce_(0, whom, candidates, "amin")
            won = candidates == best[whom]
            index[whom[won]] = where[won]
        unserved = ~torch.isfinite(best)
        if unserved.any():
            skip = None if but is None else but[unserved]
            best[unserved], index[unserved] = self._nearest(
                queries[unserved], 0, self.size, leave_out, skip
            )
        return best.clamp_min(0.0).sqrt(), index

    def _nearest(
        self,
        queries: torch.Tensor,
        lo: int,
        hi: int,
        leave_out: int | None,
        skip: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distance of each query to its nearest among remembered positions lo..hi,
        and that position's index."""
        d = squared_distances(queries, self.bank[lo:hi].float())
        if leave_out is not None and self.owner is not None:
            d[:, self.owner[lo:hi] == leave_out] = float("inf")
        if skip is not None:
            inside = ((skip >= lo) & (skip < hi)).nonzero()[:, 0]
            d[inside, skip[inside] - lo] = float("inf")
        best = d.min(1)
        return best.values, best.indices + lo

    @torch.no_grad()
    def distance_map(self, image: MemoryImage, leave_out: int | None = None) -> torch.Tensor:
        """``(h, w)``: each product position's distance to its nearest good one (NaN off the
        product): where the image differs from every good product seen, which is the map
        PatchCore draws. ``leave_out``: as for :meth:`distances`."""
        feats, valid = self.grid(image)
        out = torch.full(valid.shape, float("nan"))
        out[valid.cpu()] = self.distances(self.project(feats[valid]), leave_out).cpu()
        return out

    @torch.no_grad()
    def score(self, image: MemoryImage, leave_out: int | None = None) -> float:
        """:meth:`pooled` nearest-good distances of at most ``queries`` evenly spread product
        positions."""
        raw = self.positions(image)
        return self.pooled(self.distances(self.project(raw[self._spread(len(raw))]), leave_out))

    def score_of_map(self, cells: torch.Tensor) -> float:
        """:meth:`score` from a :meth:`distance_map` already drawn (the same positions, in the
        same order): no second pass of the backbone."""
        distances = cells[~torch.isnan(cells)]
        return self.pooled(distances[self._spread(len(distances))])

    def pooled(self, distances: torch.Tensor) -> float:
        """One image's memory score from its positions' distances: their mean, ``peak_share`` of
        it given to the mean of the farthest ``PEAK_FRACTION`` instead, so that a defect on a
        small share of the image counts as well as the image's overall distance."""
        peak = distances.topk(max(1, round(PEAK_FRACTION * len(distances)))).values.mean()
        return float((1 - self.peak_share) * distances.mean() + self.peak_share * peak)

    def _spread(self, n: int) -> torch.Tensor:
        """At most ``queries`` evenly spread indices of ``n`` positions."""
        if n <= self.queries:
            return torch.arange(n)
        return torch.linspace(0, n - 1, self.queries).round().long()


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a**2).sum(1, keepdim=True) - 2 * a @ b.T + (b**2).sum(1)


def nearest(rows: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest centroid."""
    return torch.cat(
        [
            squared_distances(rows[i : i + CHUNK], centroids).argmin(1)
            for i in range(0, len(rows), CHUNK)
        ]
    )


def kmeans(rows: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means from ``k`` random rows; an emptied list keeps its old centroid."""
    centroids = rows[torch.randperm(len(rows), generator=generator)[:k].to(rows.device)].clone()
    for _ in range(KMEANS_ITERATIONS):
        assign = nearest(rows, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, rows)
        counts = torch.bincount(assign, minlength=k)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids
