"""The demo: train (or reuse) a DifferNet model, then stream test images through Redis.

Until the Ray cluster exists (issue 5), this is the most complete real path: frames go into a
real Redis stream, a consumer group reads them, the scorer scores them, view scores and verdicts
are published to their streams, and the summary compares the verdicts with the known truth.
Everything runs in this one process on the embedded Redis.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from schemas import CameraFrame, Verdict, ViewResult, ViewScore, make_product_id
from workers.datasets import Sample, test_samples
from workers.differnet.store import ModelBundle
from workers.images import ImageError, decode_image
from workers.threshold import auroc

from .bus import StreamBus

LINE = "demo"
CAMERA = "cam0"
GROUP = "scorers"
BATCH = 8


@dataclass
class DemoSummary:
    products: int
    defects_found: int
    dead_lettered: int
    accuracy: float
    auroc: float | None
    latency_p50_ms: float
    latency_p99_ms: float
    products_per_s: float
    model_version: str

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def pick_products(data_dir: Path, n: int, seed: int) -> list[Sample]:
    """``n`` test images, good and defective in their data set's proportion."""
    samples = test_samples(data_dir)
    if not samples:
        raise ValueError(f"{data_dir}: no test images to stream")
    random.Random(seed).shuffle(samples)
    return samples[:n]


def stream_products(
    bus: StreamBus,
    bundle: ModelBundle,
    products: list[Sample],
    out_dir: Path,
    on_verdict: Callable[[Verdict, Sample], None],
) -> DemoSummary:
    frames, verdicts = f"frames:{LINE}:{CAMERA}", f"verdicts:{LINE}"
    bus.ensure_group(frames, GROUP, start_id="$")  # only this run's frames
    start = time.time()
    results: list[tuple[Verdict, Sample]] = []
    latencies: list[float] = []
    dead = 0
    with (out_dir / "verdicts.jsonl").open("w") as log:
        # Products arrive in small waves, as a line delivers them; each wave is scored as a batch.
        for first in range(0, len(products), BATCH):
            wave = {}
            for seq in range(first, min(first + BATCH, len(products))):
                bus.publish(frames, _frame(seq, products[seq]))
                wave[make_product_id(LINE, seq)] = products[seq]
            done = 0
            while done < len(wave):
                batch = bus.consume(frames, GROUP, "demo-scorer", CameraFrame, count=BATCH)
                if not batch:
                    raise RuntimeError("frames published but none delivered within 1 s")
                verdicts_out, n_dead = _score(bus, bundle, batch, frames)
                dead += n_dead
                done += len(batch)
                for verdict in verdicts_out:
                    bus.publish(verdicts, verdict)
                    sample = wave[verdict.product_id]
                    results.append((verdict, sample))
                    latencies.append(verdict.decided_at - verdict.captured_at)
                    record = verdict.model_dump(mode="json")
                    log.write(
                        json.dumps(record | {"truth": sample.category, "source": str(sample.path)})
                        + "\n"
                    )
                    on_verdict(verdict, sample)
    elapsed = time.time() - start
    labels = [int(s.is_defect) for _, s in results]
    scores = [v.views[0].score for v, _ in results]
    correct = [(v.decision == "defect") == s.is_defect for v, s in results]
    return DemoSummary(
        products=len(results),
        defects_found=sum(v.decision == "defect" and s.is_defect for v, s in results),
        dead_lettered=dead,
        accuracy=float(np.mean(correct)) if correct else 0.0,
        auroc=auroc(scores, labels),
        latency_p50_ms=float(np.percentile(latencies, 50) * 1000) if latencies else 0.0,
        latency_p99_ms=float(np.percentile(latencies, 99) * 1000) if latencies else 0.0,
        products_per_s=len(results) / elapsed if elapsed > 0 else 0.0,
        model_version=bundle.version,
    )


def _frame(seq: int, sample: Sample) -> CameraFrame:
    data = sample.path.read_bytes()
    try:
        h, w = decode_image(data, str(sample.path)).shape[:2]
    except ImageError:
        h, w = 1, 1  # published all the same: the scorer must dead-letter it, not crash
    return CameraFrame(
        line=LINE,
        camera=CAMERA,
        sequence=seq,
        product_seq=seq,
        timestamp=time.time(),
        codec="png" if sample.path.suffix.lower() == ".png" else "jpeg",
        shape=(h, w, 3),
        image=data,
    )


def _score(bus: StreamBus, bundle: ModelBundle, batch, frames: str) -> tuple[list[Verdict], int]:
    """Score one batch of frames; publish view scores; return verdicts and the dead-letter count."""
    prepared, kept, dead = [], [], 0
    for delivery in batch:
        try:
            prepared.append(bundle.model.prepare(decode_image(delivery.message.image)))
            kept.append(delivery)
        except ImageError as exc:
            bus.dead_letter(frames, GROUP, delivery.entry_id, delivery.message.to_entry(), str(exc))
            dead += 1
    t0 = time.perf_counter()
    scored = bundle.model.score_batch(prepared) if prepared else []
    score_ms = (time.perf_counter() - t0) * 1000 / max(1, len(prepared))
    verdicts = []
    for delivery, result in zip(kept, scored, strict=True):
        frame = delivery.message
        pid = make_product_id(LINE, frame.product_seq)
        is_defect = result.score >= bundle.threshold
        bus.publish(
            f"scores:{LINE}",
            ViewScore(
                product_id=pid,
                line=LINE,
                camera=CAMERA,
                product_seq=frame.product_seq,
                captured_at=frame.timestamp,
                score=result.score,
                threshold=bundle.threshold,
                is_defect=is_defect,
                model_version=bundle.version,
                stage_ms={"score": score_ms},
            ),
        )
        now = time.time()
        verdicts.append(
            Verdict(
                product_id=pid,
                line=LINE,
                product_seq=frame.product_seq,
                decision="defect" if is_defect else "good",
                status="complete",
                views=[
                    ViewResult(
                        camera=CAMERA,
                        score=result.score,
                        threshold=bundle.threshold,
                        is_defect=is_defect,
                        model_version=bundle.version,
                    )
                ],
                captured_at=frame.timestamp,
                decided_at=now,
                latency_ms={"frame_to_verdict": (now - frame.timestamp) * 1000},
            )
        )
        bus.ack(delivery)
    return verdicts, dead
