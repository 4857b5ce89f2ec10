"""Maximum-likelihood training of the flow on features of good images.

Departure from the paper, on purpose: the paper draws a fresh random rotation of every image in
every epoch and so runs the frozen backbone 192 epochs x 4 times per image. Here the backbone runs
once per image and transform: features of a fixed set of ``train_transforms`` exact symmetries
(optionally colour-jittered, with a seeded generator) are cached, and the flow is trained on the
cache. On two CPU cores this turns hours into minutes, and the flow (the only trained part) sees
the same kind of variation.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import torch

from workers.differnet.model import DifferNet, Prepared, ScoredImage, gathered, units
from workers.differnet.neighbours import COVERAGE_POOL
from workers.differnet.views import apply_d4, color_jitter
from workers.threshold import auroc

# progress(task, done, total): lets the CLI draw bars without this module knowing about Rich.
Progress = Callable[[str, int, int], None]


def _no_progress(task: str, done: int, total: int) -> None:
    pass


@dataclass
class TrainingOptions:
    epochs: int = 40
    batch_size: int = 96
    lr: float = 2e-4
    seed: int = 0
    eval_every: int = 5
    embed_batch: int = 16
    # Positions drawn per epoch for the local head (every position of every image is too many).
    positions_per_epoch: int = 200_000
    # The flow learns from a seeded draw of at most this many training images (None: all); the
    # patch memory from every one. Embedding each image under every training transform is most
    # of training's time, and the flow's density is learnt as well from a sample, while the
    # memory's nearest-neighbour evidence gains from each good image it keeps.
    flow_images: int | None = None
    # Where the backbones and the flow run: None picks CUDA when this process sees a GPU.
    device: str | None = None

    def __post_init__(self):
        if self.flow_images is not None and self.flow_images < 1:
            raise ValueError(f"flow_images must be at least 1 (got {self.flow_images})")


@dataclass
class TrainingReport:
    best_epoch: int
    train_seconds: float
    embed_seconds: float
    history: list[dict] = field(default_factory=list)


def embed_training_set(
    model: DifferNet, images: Sequence[Prepared], options: TrainingOptions, progress: Progress
) -> torch.Tensor:
    """Raw features of every image (every tile of a tiled one) under every training transform.

    Pooled head: ``(N * K, D)``. Local head: the valid positions of every map, ``(M, D)``, as
    float16 to keep the cache small. ``images`` are read once, in order, one at a time: they
    may be prepared as they are read (:class:`~workers.differnet.recipes.PreparedOnUse`).
    """
    config = model.config
    generator = torch.Generator().manual_seed(options.seed)
    jobs = (
        (i, unit, t)
        for i, im in enumerate(images)
        for unit in units([im])
        for t in range(config.train_transforms)
    )
    chunks = []
    with torch.no_grad():
        while batch := list(islice(jobs, options.embed_batch)):
            pix = torch.stack(
                [color_jitter(apply_d4(u.pixels, t), config.jitter, generator) for _, u, t in batch]
            ).to(model.device)
            mask = torch.stack([apply_d4(u.mask, t) for _, u, t in batch]).to(model.device)
            if config.head == "local":
                feats, valid = model.embedder.dense(pix, mask)
                d = feats.shape[1]
                keep = valid.permute(0, 2, 3, 1).reshape(-1) > 0
                chunks.append(feats.permute(0, 2, 3, 1).reshape(-1, d)[keep].half().cpu())
            else:
                chunks.append(model.embedder.pooled(pix, mask).cpu())
            progress("embed", batch[-1][0] + 1, len(images))
    return torch.cat(chunks)


@torch.no_grad()
def build_memory(
    model: DifferNet, images: Sequence[Prepared], options: TrainingOptions, progress: Progress
) -> None:
    """Fill the model's patch memory with positions of the good ``images``, evenly per image,
    drawn as the config's ``memory_draw`` says."""
    pool, owner = memory_pool(model, images, options, progress)
    size = model.config.memory_size
    if model.config.memory_draw == "coverage":
        pool, owner = model.memory.covering(pool, owner, size, options.seed)
    model.memory.fill(pool, owner, size, options.seed)


@torch.no_grad()
def memory_pool(
    model: DifferNet, images: Sequence[Prepared], options: TrainingOptions, progress: Progress
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw features of about ``memory_size`` positions (``COVERAGE_POOL`` times that for a
    coverage draw) drawn evenly from the images' views (a tiled image's tiles count as images),
    and the index of the tile or image each came from. ``images`` are read once, one at a
    time; a set prepared on use counts its tiles beforehand from the images' sizes.

    Each image is taken as it is, and under more of the training transforms only where one
    view has fewer positions than the memory keeps of each image (a few shots): a turned view
    shows the memory surfaces the line never does (a long part's seams turned across it, its
    grain turned), which a defect then finds itself near. A coverage draw's larger pool comes
    from the same views."""
    config = model.config
    size = config.memory_size
    wanted = size * (COVERAGE_POOL if config.memory_draw == "coverage" else 1)
    n_units = images.unit_count() if hasattr(images, "unit_count") else len(units(images))
    views_wanted = size / (n_units * model.memory.view_positions(config.memory_side))
    views = max(1, min(config.train_transforms, math.ceil(views_wanted)))
    per_view = math.ceil(wanted / (n_units * views))
    generator = torch.Generator().manual_seed(options.seed)
    parts, owners = [], []
    unit_index = 0
    for done, im in enumerate(images, 1):
        for unit in units([im]):
            for t in range(views):
                positions = model.memory.positions(unit.for_memory, t)
                keep = torch.randperm(len(positions), generator=generator)[:per_view]
                parts.append(positions[keep.to(positions.device)])
                owners.append(torch.full((len(keep),), unit_index))
            unit_index += 1
        progress("memory", done, len(images))
    return torch.cat(parts), torch.cat(owners)


def train_flow(
    model: DifferNet,
    cache: torch.Tensor,
    options: TrainingOptions,
    validation: tuple[list[Prepared], list[int]] | None = None,
    progress: Progress = _no_progress,
    *,
    fine_tune: bool = False,
    started: float | None = None,
) -> TrainingReport:
    """Train the flow on cached raw features; keep the epoch of best validation AUROC.

    ``fine_tune`` continues from the model's current flow and feature statistics (a retrained
    line model starts from the active one); otherwise the statistics come from ``cache``.
    """
    torch.manual_seed(options.seed)
    t0 = time.perf_counter() if started is None else started
    val_feats = val_masks = None
    if validation is not None and len(set(validation[1])) == 2:
        with torch.no_grad():
            val_pix, val_masks = model.transformed(units(validation[0]), range(model.config.tta))
            val_feats = torch.cat(
                [
                    model.embed(
                        val_pix[i : i + options.embed_batch], val_masks[i : i + options.embed_batch]
                    )
                    for i in range(0, len(val_pix), options.embed_batch)
                ]
            )
    embed_seconds = time.perf_counter() - t0

    if not fine_tune:
        stats = cache.float()
        model.feature_mean.copy_(stats.mean(0).to(model.device))
        # Max-pooled ReLU6 features can be constant: keep their scale finite.
        model.feature_std.copy_(stats.std(0).clamp_min(1e-3).to(model.device))
        del stats

    optimizer = torch.optim.Adam(
        model.flow.parameters(), lr=options.lr, betas=(0.8, 0.8), eps=1e-4, weight_decay=1e-5
    )
    generator = torch.Generator().manual_seed(options.seed)
    history: list[dict] = []
    best = (-1.0, 0, None)  # (val auroc, epoch, flow state)
    for epoch in range(1, options.epochs + 1):
        loss_value = _epoch(model, cache, optimizer, options, generator)
        if not np.isfinite(loss_value):
            raise FloatingPointError(f"training diverged at epoch {epoch} (loss {loss_value})")
        record = {"epoch": epoch, "loss": loss_value}
        if val_feats is not None and (epoch % options.eval_every == 0 or epoch == options.epochs):
            scores = validation_scores(model, validation[0], val_feats, val_masks)
            record["val_auroc"] = auroc(scores, validation[1])
            if record["val_auroc"] > best[0]:
                best = (record["val_auroc"], epoch, copy.deepcopy(model.flow.state_dict()))
        history.append(record)
        progress("train", epoch, options.epochs)

    best_epoch = options.epochs
    if best[2] is not None:
        model.flow.load_state_dict(best[2])
        best_epoch = best[1]
    model.eval()
    return TrainingReport(
        best_epoch=best_epoch,
        train_seconds=time.perf_counter() - t0,
        embed_seconds=embed_seconds,
        history=history,
    )


def _epoch(model, cache, optimizer, options: TrainingOptions, generator) -> float:
    """One pass over the cached features (the local head: a draw of positions); its mean loss."""
    model.flow.train()
    n = len(cache)
    if model.config.head == "local":
        order = torch.randint(0, n, (min(n, options.positions_per_epoch),), generator=generator)
        batch_size = options.batch_size * 16  # positions are cheap samples
    else:
        order = torch.randperm(n, generator=generator)
        batch_size = options.batch_size
    losses = []
    for start in range(0, len(order), batch_size):
        feats = cache[order[start : start + batch_size]].float().to(model.device)
        loss = model.nll(feats).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses))


@torch.no_grad()
def validation_scores(
    model: DifferNet, images, feats: torch.Tensor, masks: torch.Tensor
) -> list[float]:
    """Scores from cached raw features, exactly as :meth:`DifferNet.score_batch` computes them."""
    model.eval()
    nll = model.nll(feats).cpu()
    flat = units(images)
    if model.config.head == "differnet":
        scored = [ScoredImage(s) for s in nll.view(len(flat), model.config.tta).mean(1).tolist()]
    else:
        scored = model._local_results(flat, nll, masks.cpu())
    return [r.score for r in gathered(images, scored)]
