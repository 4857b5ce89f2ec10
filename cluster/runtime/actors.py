"""Ray actors of an inspection line: thin wrappers that run a stage's worker in the stage loop.

Each actor gets the line's config, how to reach its Redis and what the started line shares
(``LineRun``), and builds its worker from them. Every consumer has a stable name (its role and
replica index) and runs ``StageLoop``: its own pending entries first, then entries idle at dead
consumers, then new ones. An entry is acknowledged only after its result is published, so a
crash loses nothing; the decided products' bitmap makes redelivered work produce no second
verdict.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import ray

from cluster.runtime.loop import StageInput, StageLoop
from cluster.runtime.metrics import LineMetrics, count_new
from cluster.runtime.settings import CameraConfig, LineConfig, LineRun
from cluster.transport.bus import Delivery, StreamBus
from cluster.transport.connection import RedisAccess
from cluster.transport.registry import Registry, RegistryError
from cluster.transport.streams import (
    DecidedProducts,
    JoinSteps,
    ProductAdmission,
    RetrainState,
    Streams,
    line_groups,
    next_product_seq,
)
from schemas import (
    CameraFrame,
    Label,
    NoProduct,
    ProductView,
    RetrainOutcome,
    RetrainRequest,
    ViewScore,
)
from workers.contract import ContractConflict, InputContract, resolve_crops
from workers.frontend.detect import YoloDetector
from workers.frontend.matte import DeepMatter
from workers.frontend.sources import is_live
from workers.frontend.stages import CameraIngest, DetectMatte
from workers.line.admission import Backlog, shed_reason, unjudged_verdict
from workers.line.join import Settled, VerdictJoin, line_number
from workers.qa.samples import SampleError, SampleStore

if TYPE_CHECKING:  # torch: loaded only by the actors that score or train
    from workers.line.scoring import ViewScorer

log = logging.getLogger(__name__)

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

    def __init__(self, access: RedisAccess, run: LineRun, line: str, stage: str):
        _log_to_stderr()
        self.bus = StreamBus(
            access.client(),
            maxlen=run.maxlen,
            max_entry_bytes=run.max_entry_bytes,
            dead_letter_stream=Streams(line).dead_letters,
            dead_letter_maxlen=run.dead_letter_maxlen,
            on_dead_letter=self._dead_lettered,
        )
        self._dead_letter_metric = (LineMetrics(line).dead_letters, {"line": line, "stage": stage})
        self._stop = threading.Event()
        self.counters: dict[str, int] = {}

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def _dead_lettered(self, stream: str, reason: str) -> None:
        """Every entry dead-lettered, undecodable or failed, is counted and in the metric."""
        self.count("dead_lettered")
        metric, tags = self._dead_letter_metric
        metric.inc(1, tags)

    def stop(self) -> None:
        """Finish the batch in hand, acknowledge it, and return from ``run``."""
        self._stop.set()

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

    def ping(self) -> bool:
        return True

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        """The actor's process on its node (to signal it: bench.chaos stops and kills them)."""
        return os.getpid()


def yolo_detector(line: LineConfig) -> YoloDetector:
    """The line's YOLO, on the device Ray granted this actor."""
    return YoloDetector(line.yolo_weights, line.yolo_weights_sha256, device=granted_device())


@ray.remote
class CameraIngestActor(_Loop):
    """One camera: read the source, gate on motion, publish one frame per product."""

    def __init__(
        self,
        access: RedisAccess,
        run: LineRun,
        line: LineConfig,
        camera: CameraConfig,
        first_product: int,
    ):
        super().__init__(access, run, line.id, "ingest")
        if is_live(camera.source) and ray.get_runtime_context().was_current_actor_reconstructed:
            # A live camera restarted by Ray has missed what passed meanwhile: it numbers on
            # from the line's newest product (the aggregator re-synchronises the rest by capture
            # time). A recording replays from its start and numbers its products as before.
            newest = next_product_seq(self.bus.client, line.id, [camera.id])
            first_product = max(first_product, newest)
        self.ingest = CameraIngest(
            line.id,
            camera.id,
            camera.source,
            fps=camera.fps,
            matter=DeepMatter(camera.matting_model, camera.matting_model_sha256, granted_device())
            if camera.matting_model
            else None,
            background=camera.background,
            first_product=first_product,
            frame_stride=camera.frame_stride,
            tracker=yolo_detector(line) if line.triggered_by == "tracking" else None,
        )
        self.streams = Streams(line.id)
        self.stream = self.streams.frames(camera.id)
        self.line, self.camera = line.id, camera.id
        self.cameras = [c.id for c in line.cameras]
        self.max_backlog = line.max_backlog_products
        self.admission = ProductAdmission(self.bus.client, line.id)
        self.decided = DecidedProducts(self.bus.client, line.id)
        self.steps = JoinSteps(self.bus.client, line.id)
        self.metrics = LineMetrics(line.id)

    def run(self, replay_epoch: float | None = None) -> dict:
        """``replay_epoch``: when a replayed recording's first frame is due (see
        ``CameraIngest.frames``); a line's cameras share it."""
        metrics, tags = self.metrics, {"line": self.line, "camera": self.camera}
        counted: dict[str, int] = {}

        def export() -> None:
            stats = self.ingest.stats
            count_new(metrics.frames_in, stats.frames, counted, "frames", tags)
            count_new(metrics.camera_reconnects, stats.reconnects, counted, "reconnects", tags)
            corrupt = {"line": self.line, "kind": "corrupt_frame"}
            count_new(metrics.incidents, stats.corrupt_frames, counted, "corrupt", corrupt)

        for frame in self.ingest.frames(self._stop.is_set, replay_epoch):
            if self._inspected(frame):
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

    def _inspected(self, frame: CameraFrame) -> bool:
        """Whether ``frame``'s product goes on to detection, or is shed: decided by the first
        camera to reach it, from the backlog it finds (``workers.line.admission``)."""
        seq = line_number(self.steps.of(self.camera), frame.product_seq)
        shed = self.admission.decided(seq)
        if shed is None:
            backlog = Backlog(
                frames=self.bus.lag(self.stream, self.streams.detect_group),
                views=self.bus.lag(self.streams.views, self.streams.score_group),
            )
            reason = shed_reason(backlog, len(self.cameras), self.max_backlog)
            shed, decided_here = self.admission.decide(seq, reason is not None)
            if shed and decided_here:
                self._publish_shed(seq, reason, frame.timestamp)
        if shed:
            self.count("frames_shed")
        return not shed

    def _publish_shed(self, seq: int, reason: str, captured_at: float) -> None:
        verdict = unjudged_verdict(self.line, seq, self.cameras, reason, captured_at)
        if self.decided.publish(seq, verdict.to_entry(), self.streams.verdicts, self.bus.maxlen):
            self.count("products_shed")
            tags = {"line": self.line}
            self.metrics.shed.inc(1, tags)
            self.metrics.verdicts.inc(1, tags | {"status": "incomplete", "decision": "unknown"})
            log.warning("%s: product %d shed: %s", self.line, seq, reason.removeprefix("shed "))


@ray.remote
class DetectMatteActor(_Loop):
    """Gated frames of every camera of a line -> matted product views."""

    def __init__(self, access: RedisAccess, run: LineRun, line: LineConfig, replica: int):
        super().__init__(access, run, line.id, "detect")
        self.streams = Streams(line.id)
        self.metrics, self.tags = LineMetrics(line.id), {"line": line.id}
        detector = yolo_detector(line) if line.box_source == "yolo" else None
        self.stage = DetectMatte(detector, line.crops, run.max_image_pixels)
        source = StageInput(
            [self.streams.frames(c.id) for c in line.cameras],
            self.streams.detect_group,
            f"detect-{replica}",
            CameraFrame,
            batch_size=4,
        )
        self.loop = StageLoop(self.bus, source, self._handle, max_deliveries=run.max_deliveries)

    def run(self) -> dict:
        self.loop.run(self._stop.is_set)
        return self.stats()

    def _handle(self, batch: list[Delivery]) -> None:
        views = self.stage.process_batch([d.message for d in batch])
        for d, view in zip(batch, views, strict=True):
            if view is None:  # the gate fired on something that is not a product
                frame = d.message
                notice = NoProduct(
                    line=frame.line,
                    camera=frame.camera,
                    product_seq=frame.product_seq,
                    captured_at=frame.timestamp,
                )
                self.bus.publish(self.streams.scores, notice)
                self.bus.ack(d)
                self.count("not_products")
                continue
            self.bus.publish(self.streams.views, view)
            self.bus.ack(d)
            self.count("views")
            self.metrics.views.inc(1, self.tags)
            seconds = sum(view.stage_ms.values()) / 1e3
            self.metrics.stage_seconds.observe(seconds, self.tags | {"stage": "detect"})


@ray.remote
class ScorerActor(_Loop):
    """Product views -> view scores, in batches, with the line's active model."""

    def __init__(
        self,
        access: RedisAccess,
        run: LineRun,
        line: LineConfig,
        replica: int,
        batch_size: int = 8,
    ):
        super().__init__(access, run, line.id, "score")
        self.streams = Streams(line.id)
        self.threshold = line.threshold
        self.regions = line.regions
        self.max_image_pixels = run.max_image_pixels
        self.runtime = run.runtime
        # A version that learned from crops cut otherwise is refused, however it was activated.
        self.crops = line.crops
        self.samples = SampleStore(run.sample_dir) if run.sample_dir else None
        self.metrics, self.tags = LineMetrics(line.id), {"line": line.id}
        self.registry = Registry(self.bus.client, line.id)
        self.consumer = f"score-{replica}"
        self.scorer: ViewScorer | None = None
        self.shadow: ViewScorer | None = None
        self._refused: str | None = None
        self._why_refused = "none is active"
        self._follow_registry()
        if self.scorer is None:
            raise RuntimeError(
                f"line {line.id}: no usable active model in the registry ({self._why_refused})"
            )
        source = StageInput(
            [self.streams.views],
            self.streams.score_group,
            self.consumer,
            ProductView,
            batch_size=batch_size,
        )
        self.loop = StageLoop(self.bus, source, self._score, max_deliveries=run.max_deliveries)

    def model_version(self) -> str:
        return self.scorer.version

    def run(self) -> dict:
        self.loop.run(self._stop.is_set, between=self._follow_registry)
        return self.stats()

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
        from workers.line.scoring import ViewScorer

        try:
            version = self.registry.get(version_id)
            bundle = load_model(Path(version.path), granted_device(), self.runtime)
            if bundle.metadata["sha256"] != version.sha256:  # the folder replaced since
                raise ModelError(f"{version.path} no longer holds version {version_id}")
            resolve_crops(self.crops.model_dump(), InputContract.of(bundle.metadata), version_id)
        except (ModelError, RegistryError, ContractConflict) as exc:
            self.count("model_load_failures")
            self.metrics.incidents.inc(1, self.tags | {"kind": "model_refused"})
            log.warning("%s: model %s refused: %s", self.streams.line, version_id, exc)
            self._why_refused = f"model {version_id} refused: {exc}"
            return None
        return ViewScorer(bundle, self.threshold, self.max_image_pixels, self.regions)

    def _score(self, batch: list[Delivery]) -> None:
        """All or nothing: an undecodable view raises before any score is published."""
        scores = self.scorer.score([d.message for d in batch])
        for d, score in zip(batch, scores, strict=True):
            self._publish(d, score)
        self.count("scored", len(batch))
        version = {"model_version": self.scorer.version}
        self.metrics.views_scored.inc(len(batch), self.tags | version)
        for score in scores:
            seconds = score.stage_ms["score"] / 1e3
            self.metrics.stage_seconds.observe(seconds, self.tags | {"stage": "score"})
        if self.shadow is not None:
            # The candidate's opinion is recorded, never acted on.
            for score in self.shadow.score([d.message for d in batch]):
                self.bus.publish(self.streams.shadow_scores, score)
            self.count("shadow_scored", len(batch))

    def _publish(self, d: Delivery, score: ViewScore) -> None:
        # The crop is stored before the score is published: whoever sees the verdict finds it.
        if self.samples is not None:
            view = d.message
            self.samples.put_view(view.line, view.product_seq, view.camera, view.image)
        self.bus.publish(self.streams.scores, score)
        self.bus.ack(d)


@ray.remote
class AggregatorActor(_Loop):
    """View scores of all cameras -> one verdict per product, exactly once."""

    def __init__(self, access: RedisAccess, run: LineRun, line: LineConfig):
        super().__init__(access, run, line.id, "aggregate")
        self.line = line.id
        self.cameras = [c.id for c in line.cameras]
        self.keep_processed_images_s = line.keep_processed_images_s
        self.samples = SampleStore(run.sample_dir) if run.sample_dir else None
        max_age_h = run.retention.max_age_h
        self.retention = (run.retention.max_products, max_age_h * 3600 if max_age_h else None)
        self.streams = Streams(line.id)
        self.metrics = LineMetrics(line.id)
        self.registry = Registry(self.bus.client, line.id)
        self._gauged_at = 0.0
        self.join = VerdictJoin(
            line.id, self.cameras, line.view_timeout_s, max_spread_s=line.max_camera_spread_s
        )
        # Restarted by Ray, the aggregator numbers the cameras as before (start_line clears
        # them when the line starts).
        self.steps = JoinSteps(self.bus.client, line.id)
        self.join.restore_steps(self.steps.load())
        self._resyncs_saved: dict[str, int] = {}
        self.decided = DecidedProducts(self.bus.client, line.id)
        self._resyncs_exported: dict[str, int] = {}
        self._trimmed: dict[str, int] = {}  # unread entries trimmed, as exported
        self._gaps: dict[int, float] = {}  # product numbers passed without a verdict -> since
        self._gaps_from = 0  # a line numbers its products from 0; lower ones all decided
        source = StageInput(
            [self.streams.scores],
            self.streams.aggregate_group,
            "aggregate-0",
            (ViewScore, NoProduct),
            batch_size=64,
            block_ms=200,
        )
        self.loop = StageLoop(self.bus, source, self._handle, max_deliveries=run.max_deliveries)

    def run(self) -> dict:
        # Drained: after ``stop``, the loop goes on until the scorers' last scores are in.
        self.loop.run(self._stop.is_set, between=self._between_rounds, drain=True)
        # Upstream has drained: a view still missing now will never come.
        for settled in self.join.expire(flush=True):
            self._publish(settled)
        self._fill_gaps(flush=True)
        self._trim_images()
        return self.stats() | {
            "pending_products": len(self.join.pending_products),
            "out_of_step_views": self.join.out_of_step,
            "cameras_resynchronised": dict(self.join.resynchronised),
            "views_of_unknown_cameras": self.join.unknown_camera,
        }

    def _handle(self, batch: list[Delivery]) -> None:
        for d in batch:
            self._add(d)

    def _between_rounds(self) -> None:
        for settled in self.join.expire():
            self._publish(settled)
        self._export_resyncs()
        if time.monotonic() - self._gauged_at > GAUGE_PERIOD_S:
            self._fill_gaps()
            self._trim_images()
            self._gauge_line()

    def _fill_gaps(self, flush: bool = False) -> None:
        """A product every view of which was lost upstream (each dead-lettered at detection,
        say) never reaches the join. A number the line's verdicts have passed (by the join's
        reorder window) that still has none after ``view_timeout_s`` gets one saying so."""
        newest = self.decided.last()
        if newest is None:
            return
        high = newest - (0 if flush else self.join.reorder_window)
        now, pending = time.time(), set(self.join.pending_products)
        undecided = self.decided.undecided(self._gaps_from, high)
        self._gaps = {seq: self._gaps.get(seq, now) for seq in undecided if seq not in pending}
        for seq, since in list(self._gaps.items()):
            if not (flush or now - since >= self.join.timeout_s):
                continue
            del self._gaps[seq]
            reason = "no view of it reached the aggregator (lost upstream: see deadletters)"
            self._publish(Settled(unjudged_verdict(self.line, seq, self.cameras, reason, since)))
            self.count("products_without_views")
        self._gaps_from = min(self._gaps, default=max(self._gaps_from, high + 1))

    def _add(self, d) -> None:
        score = d.message
        seq = self.join.line_seq(score.camera, score.product_seq)
        if seq in self.decided:
            self.bus.ack(d)  # redelivered, or arrived after an incomplete verdict
            self.count("late_or_duplicate_views")
            self.metrics.incidents.inc(1, {"line": self.line, "kind": "late_or_duplicate_view"})
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
        if settled.no_product is not None:  # every camera saw no product there: no verdict
            ids = [d.entry_id for d in entries]
            acks = (self.streams.scores, self.streams.aggregate_group, ids)
            self.decided.settle(settled.no_product, acks)
            self.count("not_products")
            return
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
        self.steps.save(self.join.steps)
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
        """Consumer-group lag of the line's streams, entries trimmed unread, and the active
        model, for Prometheus."""
        self._gauged_at = time.monotonic()
        verdicts = self.streams.verdicts
        # Outside consumers of the verdicts (QA, an MES) too: their lag is the line's alert.
        groups = line_groups(self.streams, self.cameras)
        groups += [(verdicts, group) for group in self.bus.groups(verdicts)]
        for stream, group in groups:
            tags = {"line": self.line, "stream": stream, "group": group}
            self.metrics.stream_lag.set(self.bus.lag(stream, group), tags)
        for stream in {stream for stream, _ in groups}:
            for group, n in self.bus.unread_trimmed(stream).items():
                tags = {"line": self.line, "stream": stream, "group": group}
                count_new(self.metrics.unread_trimmed, n, self._trimmed, f"{stream} {group}", tags)
        active = self.registry.active_id()
        if active is not None:
            self.metrics.active_model.set(1, {"line": self.line, "version": active})


@ray.remote
class TrainerActor(_Loop):
    """Learns from QA: collects labelled good views, retrains, judges and publishes candidates.

    Retrains when ``after_good_views`` new good views have been labelled, or when asked on
    ``retrain-requests:{line}`` (`defectflow retrain`). Each outcome goes to
    ``model-events:{line}``. Products whose views a promoted model learned are remembered and
    not learned twice. (Labels redelivered after a crash are counted again: a retraining may
    then come a little early.)
    """

    def __init__(self, access: RedisAccess, run: LineRun, line: LineConfig):
        super().__init__(access, run, line.id, "train")
        self.line = line.id
        self.streams = Streams(line.id)
        self.samples = SampleStore(run.sample_dir)
        self.candidates_dir = run.candidates_dir
        self.runtime = run.runtime
        self.config = line.retrain
        self.target_tpr = line.target_tpr
        self.registry = Registry(self.bus.client, line.id)
        self.state = RetrainState(self.bus.client, line.id)
        source = StageInput(
            [self.streams.labels, self.streams.retrain_requests],
            "trainer",
            "trainer-0",
            (Label, RetrainRequest),
            batch_size=100,
            block_ms=250,
        )
        self.loop = StageLoop(self.bus, source, self._handle, max_deliveries=run.max_deliveries)

    def run(self) -> dict:
        self.loop.run(self._stop.is_set)
        return self.stats()

    def _handle(self, batch: list[Delivery]) -> None:
        labels = [d.message for d in batch if isinstance(d.message, Label)]
        asked = [d.message for d in batch if isinstance(d.message, RetrainRequest)]
        pending = self.state.add_good_views(
            sum(self._views_of(label) for label in labels if label.label == "good")
        )
        if asked:
            self._retrain(f"requested by {asked[-1].by}")
        elif self.config.enabled and pending >= self.config.after_good_views:
            self._retrain(f"{pending} new good views labelled")
        self.bus.ack(*batch)

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
        from workers.differnet.export import ExportError, export_folder, export_model
        from workers.differnet.learning import RetrainError, gather_labelled, retrain
        from workers.differnet.store import ModelError, load_model
        from workers.differnet.training import TrainingOptions

        event: dict = {"line": self.line, "trigger": trigger, "at": time.time()}
        active = self.registry.active()
        used = self.state.used()
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
            if self.runtime != "torch":  # the scorers run the candidate's export
                export_model(load_model(out, "cpu"), self.runtime, export_folder(out, self.runtime))
        except (RetrainError, ModelError, ExportError) as exc:
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
                self.state.mark_used(pool.train_views)
                event["outcome"] = "promoted"
            else:
                event["outcome"] = "candidate" if judgement.publishable else "rejected"
        self.count(f"retrain_{event['outcome'].replace(' ', '_')}")
        self.state.reset()
        self.bus.publish(self.streams.model_events, RetrainOutcome(**event))
