"""Ray actors of an inspection line: thin loops that read a stream, call a worker, write a stream.

Every consumer has a stable name (its role and replica index). A restarted actor first finishes
the entries it had been given and not acknowledged; every actor also takes over entries left
pending too long by consumers that never came back (XAUTOCLAIM). An entry is acknowledged only
after its result is published, so a crash loses nothing; the decided products' bitmap makes the
redelivered work produce no second verdict.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import ray

from cluster.runtime.metrics import LineMetrics, count_new
from cluster.runtime.registry import Registry, RegistryError
from cluster.runtime.settings import LineConfig
from cluster.transport.bus import StreamBus
from cluster.transport.connection import RedisAccess
from cluster.transport.streams import DecidedProducts, Streams, line_groups, next_product_seq
from schemas import (
    CameraFrame,
    Label,
    ProductView,
    RetrainOutcome,
    RetrainRequest,
    ViewScore,
)
from schemas.base import SchemaError
from workers.contract import ContractConflict, InputContract, resolve_crops
from workers.frontend.sources import is_live
from workers.frontend.stages import CameraIngest, DetectMatte, NoProductFound
from workers.images import ImageError
from workers.line.join import Settled, VerdictJoin
from workers.line.scoring import ViewScorer, shed_score
from workers.qa.samples import SampleError, SampleStore

log = logging.getLogger(__name__)

# Entries pending at one consumer for this long are taken over by another.
RECLAIM_IDLE_MS = 15_000
# The aggregator applies the sample store's retention once per this many verdicts.
PRUNE_EVERY = 256
# ... and refreshes the line's gauges (stream lag, active model) this often.
GAUGE_PERIOD_S = 5.0


def granted_device() -> str:
    """The GPU Ray gave this actor, else the CPU. Ray leaves CUDA_VISIBLE_DEVICES as it is for an
    actor given no GPU: asked for "auto", such an actor would use its node's GPUs unaccounted."""
    return "cuda" if ray.get_gpu_ids() else "cpu"


def _log_to_stderr() -> None:
    """defectflow's own INFO lines and above on stderr (not every library's: Ultralytics and
    torch log too). Each actor is a process of its own; Ray keeps its output in the node's logs
    and shows it on the driver's console."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("cluster", "workers"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.setLevel(logging.INFO)
            logger.addHandler(handler)


class _Loop:
    """Shared plumbing: Redis bus (dead letters to the line's own stream), a stop flag,
    counters."""

    def __init__(self, access: RedisAccess, maxlen: int, line: str):
        _log_to_stderr()
        self.bus = StreamBus(
            access.client(), maxlen=maxlen, dead_letter_stream=Streams(line).dead_letters
        )
        self._stop = threading.Event()
        self.counters: dict[str, int] = {}

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def stop(self) -> None:
        """Finish the batch in hand, acknowledge it, and return from ``run``."""
        self._stop.set()

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

    def ping(self) -> bool:
        return True

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


@ray.remote
class CameraIngestActor(_Loop):
    """One camera: read the source, gate on motion, publish one frame per product."""

    def __init__(
        self,
        access: RedisAccess,
        maxlen: int,
        line: str,
        camera: str,
        source: str,
        fps: float | None,
        matting_model: str | None,
        background: str | None,
        first_product: int,
        frame_stride: int,
    ):
        super().__init__(access, maxlen, line)
        if is_live(source) and ray.get_runtime_context().was_current_actor_reconstructed:
            # A live camera restarted by Ray has missed what passed meanwhile: it numbers on
            # from the line's newest product (the aggregator re-synchronises the rest by capture
            # time). A recording replays from its start and numbers its products as before.
            first_product = max(first_product, next_product_seq(self.bus.client, line, [camera]))
        self.ingest = CameraIngest(
            line,
            camera,
            source,
            fps=fps,
            matting_model=Path(matting_model) if matting_model else None,
            device=granted_device(),
            background=Path(background) if background else None,
            first_product=first_product,
            frame_stride=frame_stride,
        )
        self.stream = Streams(line).frames(camera)
        self.line, self.camera = line, camera

    def run(self, replay_epoch: float | None = None) -> dict:
        """``replay_epoch``: when a replayed recording's first frame is due (see
        ``CameraIngest.frames``); a line's cameras share it."""
        metrics, tags = LineMetrics(self.line), {"line": self.line, "camera": self.camera}
        counted: dict[str, int] = {}

        def export() -> None:
            stats = self.ingest.stats
            count_new(metrics.frames_in, stats.frames, counted, "frames", tags)
            count_new(metrics.camera_reconnects, stats.reconnects, counted, "reconnects", tags)

        for frame in self.ingest.frames(self._stop.is_set, replay_epoch):
            self.bus.publish(self.stream, frame)
            self.count("published")
            export()
        export()
        stats = self.ingest.stats
        self.counters |= {
            "frames": stats.frames,
            "corrupt_frames": stats.corrupt_frames,
            "resolution_changes": stats.resolution_changes,
            "reconnects": stats.reconnects,
        }
        return self.stats()


@ray.remote
class DetectMatteActor(_Loop):
    """Gated frames of every camera of a line -> matted product views."""

    def __init__(self, access: RedisAccess, maxlen: int, line: LineConfig, replica: int):
        super().__init__(access, maxlen, line.id)
        self.streams = Streams(line.id)
        self.inputs = [self.streams.frames(c.id) for c in line.cameras]
        self.consumer = f"detect-{replica}"
        detector = None
        if line.yolo_weights:
            from workers.frontend.detect import YoloDetector

            detector = YoloDetector(line.yolo_weights, device=granted_device())
        self.stage = DetectMatte(detector, line.crops)
        for s in self.inputs:
            self.bus.ensure_group(s, self.streams.detect_group)

    def run(self) -> dict:
        metrics, tags = LineMetrics(self.streams.line), {"line": self.streams.line}
        group = self.streams.detect_group
        batch = self.bus.consume(self.inputs, group, self.consumer, CameraFrame, own_pending=True)
        while not self._stop.is_set():
            if not batch:
                for s in self.inputs:
                    batch += self.bus.reclaim(
                        s, group, self.consumer, CameraFrame, min_idle_ms=RECLAIM_IDLE_MS
                    )
            if not batch:
                batch = self.bus.consume(
                    self.inputs, group, self.consumer, CameraFrame, count=4, block_ms=500
                )
            for d in batch:
                try:
                    view = self.stage.process(d.message)
                except (ImageError, NoProductFound, SchemaError) as exc:
                    self.bus.dead_letter(
                        d.stream, group, d.entry_id, d.message.to_entry(), str(exc)
                    )
                    self.count("dead_lettered")
                    metrics.dead_letters.inc(1, tags | {"stage": "detect"})
                    continue
                self.bus.publish(self.streams.views, view)
                self.bus.ack(d)
                self.count("views")
                metrics.views.inc(1, tags)
                seconds = sum(view.stage_ms.values()) / 1e3
                metrics.stage_seconds.observe(seconds, tags | {"stage": "detect"})
            batch = []
        return self.stats()


@ray.remote
class ScorerActor(_Loop):
    """Product views -> view scores, in batches, with the line's active model."""

    def __init__(
        self,
        access: RedisAccess,
        maxlen: int,
        line: LineConfig,
        replica: int,
        sample_dir: str | None,
        batch_size: int = 8,
    ):
        super().__init__(access, maxlen, line.id)
        self.streams = Streams(line.id)
        self.consumer = f"score-{replica}"
        self.max_backlog = line.max_view_backlog
        self.batch_size = batch_size
        self.threshold = line.threshold
        # A version that learned from crops cut otherwise is refused, however it was activated.
        self.crops = line.crops
        self.samples = SampleStore(Path(sample_dir)) if sample_dir else None
        self.metrics = LineMetrics(line.id)
        self.registry = Registry(self.bus.client, line.id)
        self.scorer: ViewScorer | None = None
        self.shadow: ViewScorer | None = None
        self._refused: str | None = None
        self._follow_registry()
        if self.scorer is None:
            raise RuntimeError(f"line {line.id}: no usable active model in the registry")
        self.bus.ensure_group(self.streams.views, self.streams.score_group)

    def model_version(self) -> str:
        return self.scorer.version

    def _follow_registry(self) -> None:
        """Between batches: switch to a newly active version, start or stop shadow scoring.

        A version that fails to load is refused here too (counted); the current one goes on.
        """
        active, shadow = self.registry.active_id(), self.registry.shadow_id()
        current = self.scorer.version if self.scorer else None
        if active and active not in (current, self._refused):
            loaded = self._load(active)
            if loaded is None:
                self._refused = active  # not tried again until another version is activated
            else:
                self.count("model_swaps" if self.scorer else "model_loads")
                log.info("%s: %s scores with model %s", self.streams.line, self.consumer, active)
                self.scorer = loaded
        if shadow is None:
            self.shadow = None
        elif shadow != self._refused and (self.shadow is None or self.shadow.version != shadow):
            self.shadow = self._load(shadow)
            if self.shadow is None:
                self._refused = shadow

    def _load(self, version_id: str) -> ViewScorer | None:
        from workers.differnet.store import ModelError, load_model

        try:
            path = Path(self.registry.get(version_id).path)
            bundle = load_model(path, granted_device())
            resolve_crops(self.crops.model_dump(), InputContract.of(bundle.metadata), version_id)
        except (ModelError, RegistryError, ContractConflict) as exc:
            self.count("model_load_failures")
            log.warning("%s: model %s refused: %s", self.streams.line, version_id, exc)
            return None
        return ViewScorer(bundle, self.threshold)

    def run(self) -> dict:
        stream, group = self.streams.views, self.streams.score_group
        batch = self.bus.consume(stream, group, self.consumer, ProductView, own_pending=True)
        while not self._stop.is_set():
            if not batch:
                batch = self.bus.reclaim(
                    stream,
                    group,
                    self.consumer,
                    ProductView,
                    min_idle_ms=RECLAIM_IDLE_MS,
                    count=self.batch_size,
                )
            if not batch:
                batch = self.bus.consume(
                    stream, group, self.consumer, ProductView, count=self.batch_size, block_ms=500
                )
            if batch:
                self._score(batch)
            batch = []
            self._follow_registry()
        return self.stats()

    def _score(self, batch) -> None:
        if self.bus.lag(self.streams.views, self.streams.score_group) > self.max_backlog:
            # Too far behind: pass the batch on unscored, so that the backlog (and Redis memory)
            # stays bounded; every shed view is counted and named in its product's verdict.
            for d in batch:
                shed = shed_score(d.message, self.scorer.version, self.scorer.threshold)
                self._publish(d, shed)
            self.count("shed", len(batch))
            self.metrics.shed.inc(len(batch), {"line": self.streams.line})
            log.warning(
                "%s: more than %d views wait for the scorers: %d passed on unscored (shed)",
                self.streams.line,
                self.max_backlog,
                len(batch),
            )
            return
        try:
            scores = self.scorer.score([d.message for d in batch])
        except ImageError:
            # One bad view must not sink the batch: score one by one, dead-letter the bad.
            for d in batch:
                self._score_one(d)
            return
        for d, score in zip(batch, scores, strict=True):
            self._publish(d, score)
        self.count("scored", len(batch))
        tags = {"line": self.streams.line}
        self.metrics.views_scored.inc(len(batch), tags | {"model_version": self.scorer.version})
        for score in scores:
            self.metrics.stage_seconds.observe(
                score.stage_ms["score"] / 1e3, tags | {"stage": "score"}
            )
        if self.shadow is not None:
            # The candidate's opinion is recorded, never acted on.
            for score in self.shadow.score([d.message for d in batch]):
                self.bus.publish(self.streams.shadow_scores, score)
            self.count("shadow_scored", len(batch))

    def _score_one(self, d) -> None:
        try:
            [score] = self.scorer.score([d.message])
        except ImageError as exc:
            self.bus.dead_letter(d.stream, d.group, d.entry_id, d.message.to_entry(), str(exc))
            self.count("dead_lettered")
            self.metrics.dead_letters.inc(1, {"line": self.streams.line, "stage": "score"})
            return
        self._publish(d, score)
        self.count("scored")
        tags = {"line": self.streams.line, "model_version": self.scorer.version}
        self.metrics.views_scored.inc(1, tags)

    def _publish(self, d, score: ViewScore) -> None:
        # The crop is stored before the score is published: whoever sees the verdict finds it.
        if self.samples is not None:
            view = d.message
            self.samples.put_view(view.line, view.product_seq, view.camera, view.image)
        self.bus.publish(self.streams.scores, score)
        self.bus.ack(d)


@ray.remote
class AggregatorActor(_Loop):
    """View scores of all cameras -> one verdict per product, exactly once."""

    def __init__(
        self,
        access: RedisAccess,
        maxlen: int,
        line: str,
        cameras: list[str],
        timeout_s: float,
        max_camera_spread_s: float | None,
        sample_dir: str | None,
        keep_products: int | None,
        keep_seconds: float | None,
        keep_processed_images_s: float,
    ):
        super().__init__(access, maxlen, line)
        self.line = line
        self.cameras = cameras
        self.keep_processed_images_s = keep_processed_images_s
        self.samples = SampleStore(Path(sample_dir)) if sample_dir else None
        self.retention = (keep_products, keep_seconds)
        self.streams = Streams(line)
        self.metrics = LineMetrics(line)
        self.registry = Registry(self.bus.client, line)
        self._gauged_at = 0.0
        self.join = VerdictJoin(line, cameras, timeout_s, max_spread_s=max_camera_spread_s)
        # Restarted by Ray, the aggregator numbers the cameras as before (start_line clears
        # them when the line starts).
        saved = self.bus.client.hgetall(self.streams.join_steps)
        self.join.restore_steps({c.decode(): json.loads(v) for c, v in saved.items()})
        self._resyncs_saved: dict[str, int] = {}
        self.decided = DecidedProducts(self.bus.client, line)
        self._resyncs_exported: dict[str, int] = {}
        self.consumer = "aggregate-0"
        self.bus.ensure_group(self.streams.scores, self.streams.aggregate_group)

    def run(self) -> dict:
        stream, group = self.streams.scores, self.streams.aggregate_group
        batch = self.bus.consume(
            stream, group, self.consumer, ViewScore, own_pending=True, count=10_000
        )
        while True:
            for d in batch:
                self._add(d)
            for settled in self.join.expire():
                self._publish(settled)
            self._export_resyncs()
            if time.monotonic() - self._gauged_at > GAUGE_PERIOD_S:
                self._trim_images()
                self._gauge_line()
            if self._stop.is_set() and not batch:
                # Upstream has drained: a view still missing now will never come.
                for settled in self.join.expire(flush=True):
                    self._publish(settled)
                self._trim_images()
                break
            batch = self.bus.consume(
                stream, group, self.consumer, ViewScore, count=64, block_ms=200
            )
        return self.stats() | {
            "pending_products": len(self.join.pending_products),
            "out_of_step_views": self.join.out_of_step,
            "cameras_resynchronised": dict(self.join.resynchronised),
            "views_of_unknown_cameras": self.join.unknown_camera,
        }

    def _add(self, d) -> None:
        score = d.message
        seq = self.join.line_seq(score.camera, score.product_seq)
        if seq in self.decided:
            self.bus.ack(d)  # redelivered, or arrived after an incomplete verdict
            self.count("late_or_duplicate_views")
            log.info(
                "%s: view of product %d from %s after its verdict: counted, not used",
                self.line,
                seq,
                score.camera,
            )
            return
        before = self.join.duplicates
        settled = self.join.add(score, receipt=d)
        if self.join.duplicates > before:
            self.count("duplicate_views", self.join.duplicates - before)
        self._save_steps()  # before the verdicts that use the re-synchronised views
        for s in settled:
            self._publish(s)

    def _publish(self, settled: Settled) -> None:
        verdict, entries = settled.verdict, settled.receipts
        if verdict is None:  # views dropped: a camera the line lacks, a decided product seen again
            self.bus.ack(*entries)
            return
        if self.samples is not None:
            self.samples.put_verdict(self.line, verdict.product_seq, verdict.model_dump_json())
        self.decided.publish(
            verdict.product_seq,
            verdict.to_entry(),
            self.streams.verdicts,
            self.bus.maxlen,
            (self.streams.scores, self.streams.aggregate_group, [d.entry_id for d in entries]),
        )
        self.count(f"verdicts_{verdict.status}")
        tags = {"line": self.line}
        self.metrics.verdicts.inc(
            1, tags | {"status": verdict.status, "decision": verdict.decision}
        )
        latency = verdict.latency_ms.get("frame_to_verdict")
        if latency is not None:
            self.metrics.stage_seconds.observe(latency / 1e3, tags | {"stage": "frame_to_verdict"})
        if verdict.decision == "defect":
            self.count("defects")
            self.metrics.defects.inc(1, tags)
        if (
            self.samples is not None
            and sum(
                self.counters.get(f"verdicts_{s}", 0) for s in ("complete", "incomplete", "error")
            )
            % PRUNE_EVERY
            == 0
        ):
            self.count("samples_pruned", self.samples.prune(self.line, *self.retention))

    def _save_steps(self) -> None:
        """Keep the cameras' steps in Redis, once a re-synchronisation has changed them."""
        if self.join.resynchronised == self._resyncs_saved:
            return
        steps = {camera: json.dumps(s) for camera, s in self.join.steps.items()}
        self.bus.client.hset(self.streams.join_steps, mapping=steps)
        self._resyncs_saved = dict(self.join.resynchronised)

    def _export_resyncs(self) -> None:
        for camera, n in self.join.resynchronised.items():
            tags = {"line": self.line, "camera": camera}
            count_new(self.metrics.camera_resyncs, n, self._resyncs_exported, camera, tags)

    def _trim_images(self) -> None:
        """Frames and views every stage has processed leave Redis after the line's grace time.
        (Scores and verdicts are small and kept to ``maxlen``: QA and shadow reports read them.)
        """
        for stream in [self.streams.frames(c) for c in self.cameras] + [self.streams.views]:
            trimmed = self.bus.trim_processed(stream, self.keep_processed_images_s)
            if trimmed:
                self.count("images_trimmed", trimmed)

    def _gauge_line(self) -> None:
        """Consumer-group lag of the line's streams and its active model, for Prometheus."""
        self._gauged_at = time.monotonic()
        for stream, group in line_groups(self.streams, self.cameras):
            self.metrics.stream_lag.set(
                self.bus.lag(stream, group), {"line": self.line, "stream": stream, "group": group}
            )
        active = self.registry.active_id()
        if active is not None:
            self.metrics.active_model.set(1, {"line": self.line, "version": active})


@ray.remote
class TrainerActor(_Loop):
    """Learns from QA: collects labelled good views, retrains, judges and publishes candidates.

    Retrains when ``after_good_views`` new good views have been labelled, or when asked on
    ``retrain-requests:{line}`` (`defectflow retrain`). Each outcome goes to
    ``model-events:{line}``. Products whose views a promoted model learned are remembered and
    not learned twice.
    """

    def __init__(
        self,
        access: RedisAccess,
        maxlen: int,
        line: str,
        sample_dir: str,
        candidates_dir: str,
        retrain: dict,
        target_tpr: float,
    ):
        super().__init__(access, maxlen, line)
        from cluster.runtime.settings import RetrainConfig

        self.line = line
        self.streams = Streams(line)
        self.samples = SampleStore(Path(sample_dir))
        self.candidates_dir = Path(candidates_dir)
        self.config = RetrainConfig.model_validate(retrain)
        self.target_tpr = target_tpr
        self.registry = Registry(self.bus.client, line)
        self.consumer = "trainer-0"
        for stream in (self.streams.labels, self.streams.retrain_requests):
            self.bus.ensure_group(stream, "trainer")

    def run(self) -> dict:
        labels, requests = self.streams.labels, self.streams.retrain_requests
        # Entries a crashed instance had counted (the count is in Redis) but not acknowledged.
        for stream, kind in ((labels, Label), (requests, RetrainRequest)):
            self.bus.ack(
                *self.bus.consume(stream, "trainer", self.consumer, kind, own_pending=True)
            )
        while not self._stop.is_set():
            new_labels = self.bus.consume(
                labels, "trainer", self.consumer, Label, count=100, block_ms=250
            )
            asked = self.bus.consume(
                requests, "trainer", self.consumer, RetrainRequest, count=10, block_ms=250
            )
            new_good = sum(
                self._views_of(d.message) for d in new_labels if d.message.label == "good"
            )
            if new_good:
                self.bus.client.incrby(self.streams.retrain_pending, new_good)
            pending = int(self.bus.client.get(self.streams.retrain_pending) or 0)
            if asked:
                self._retrain(f"requested by {asked[-1].message.by}")
            elif self.config.enabled and pending >= self.config.after_good_views:
                self._retrain(f"{pending} new good views labelled")
            self.bus.ack(*new_labels, *asked)
        return self.stats()

    def _views_of(self, label: Label) -> int:
        if label.camera is not None:
            return 1
        try:
            return len(self.samples.product(label.product_id).cameras)
        except (SampleError, ValueError):
            return 0

    def _retrain(self, trigger: str) -> None:
        import time

        from cluster.transport.qa import labels_of
        from workers.differnet.learning import RetrainError, gather_labelled, retrain
        from workers.differnet.store import ModelError
        from workers.differnet.training import TrainingOptions

        event: dict = {"line": self.line, "trigger": trigger, "at": time.time()}
        active = self.registry.active()
        used = {v.decode() for v in self.bus.client.smembers(self.streams.retrain_used)}
        pool = gather_labelled(
            labels_of(self.bus.client, self.line), self.samples, self.config.holdout, used
        )
        event |= {"n_new_good_views": pool.n_train_views, "n_validation": len(pool.validation)}
        try:
            if active is None:
                raise RetrainError("no active model to start from")
            out = self.candidates_dir / time.strftime("%Y%m%d-%H%M%S")
            epochs = self.config.epochs or (10 if self.config.mode == "finetune" else 40)
            result = retrain(
                Path(active.path),
                out,
                [p for views in pool.train_views.values() for p in views],
                pool.validation,
                mode=self.config.mode,
                options=TrainingOptions(epochs=epochs, device=granted_device()),
                target_tpr=self.target_tpr,
            )
        except (RetrainError, ModelError) as exc:
            event |= {"outcome": "not retrained", "why": str(exc)}
        else:
            candidate = self.registry.register(out, parent=active.id)
            judgement = result.judgement
            event |= {
                "candidate": candidate.id,
                "parent": active.id,
                "why": judgement.reason,
                "candidate_metrics": judgement.candidate,
                "active_metrics": judgement.parent,
                "retrain_seconds": round(result.retrain_seconds, 1),
            }
            if judgement.publishable and self.config.auto_promote:
                self.registry.promote(candidate.id)
                self.bus.client.sadd(self.streams.retrain_used, *pool.train_views)
                event["outcome"] = "promoted"
            else:
                event["outcome"] = "candidate" if judgement.publishable else "rejected"
        self.count(f"retrain_{event['outcome'].replace(' ', '_')}")
        self.bus.client.set(self.streams.retrain_pending, 0)
        self.bus.publish(self.streams.model_events, RetrainOutcome(**event))
