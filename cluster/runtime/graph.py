"""Starting, draining and stopping the actors of one or more lines on a Ray cluster."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import ray

from cluster.runtime.actors import (
    AggregatorActor,
    CameraIngestActor,
    DetectMatteActor,
    ScorerActor,
    TrainerActor,
)
from cluster.runtime.settings import CameraConfig, LineConfig, LineRun
from cluster.transport.bus import INFRASTRUCTURE_ERRORS, StreamBus
from cluster.transport.connection import RedisAccess
from cluster.transport.registry import Registry, RegistryError
from cluster.transport.streams import JoinSteps, Streams, line_groups, next_product_seq
from workers.contract import InputContract
from workers.differnet.store import ModelError, check_model

if TYPE_CHECKING:  # only transport/ talks to Redis; the type is all this needs
    import redis

# Restarted by Ray when they die, the in-flight `run` call retried on the new instance; a second
# concurrent call (stop) reaches a running loop; replicas spread over the cluster's nodes.
ACTOR_OPTIONS = {
    "max_restarts": -1,
    "max_task_retries": -1,
    "max_concurrency": 2,
    "scheduling_strategy": "SPREAD",
}


@dataclass
class LineResources:
    """Ray resources per actor (see :func:`line_resources` for where they come from)."""

    ingest_cpus: float = 0.25
    ingest_gpus: float = 0.0  # asked by the cameras that run a network only (gpu_camera)
    detect_cpus: float = 0.5
    detect_gpus: float = 0.0
    score_cpus: float = 1.0
    score_gpus: float = 0.0
    aggregate_cpus: float = 0.1
    # Scheduling weight only: a retraining borrows the cores while it runs.
    train_cpus: float = 0.5
    train_gpus: float = 0.0


GPU_SETTINGS = ("score_gpus", "train_gpus", "detect_gpus", "ingest_gpus")


def lines_resources(lines: list[LineConfig], cluster_gpus: float) -> list[LineResources]:
    """Each line's resources: defaults, GPU shares where the cluster has GPUs, then the line's
    own settings. The shares shrink alike until the lines' actors fit in ``cluster_gpus``
    (a scorer and a trainer on one GPU get a third and two thirds of it): Ray would leave an
    actor that does not fit waiting for a GPU that is not there."""
    shares = [_gpu_shares(line) for line in lines] if cluster_gpus else [{} for _ in lines]
    own = [{n: getattr(line.resources, n) for n in GPU_SETTINGS} for line in lines]
    unset = [
        {name: share for name, share in line_shares.items() if line_own[name] is None}
        for line_shares, line_own in zip(shares, own, strict=True)
    ]
    demand = sum(_gpus(line, u) for line, u in zip(lines, unset, strict=True))
    asked = sum(
        _gpus(line, {n: v for n, v in line_own.items() if v is not None})
        for line, line_own in zip(lines, own, strict=True)
    )
    scale = min(1.0, max(0.0, cluster_gpus - asked) / demand) if demand else 1.0
    out = []
    for line, line_shares in zip(lines, shares, strict=True):
        res = LineResources()
        for name, share in line_shares.items():
            # Ray counts GPU fractions to 4 decimals: rounded down, the shares still fit.
            setattr(res, name, math.floor(share * scale * 1e4) / 1e4)
        for name, value in line.resources.model_dump().items():
            if value is not None:
                setattr(res, name, value)
        out.append(res)
    return out


def line_resources(line: LineConfig, cluster_gpus: float) -> LineResources:
    """One line's resources, as :func:`lines_resources` gives them to a line alone."""
    return lines_resources([line], cluster_gpus)[0]


def _gpu_shares(line: LineConfig) -> dict[str, float]:
    """Where the cluster has GPUs: a scorer half of one, the trainer a whole one; a YOLO
    detector and a camera that runs a network (matting, tracking) a quarter (contours and the
    motion gate alone have nothing to run on a GPU)."""
    return {
        "score_gpus": 0.5,
        "train_gpus": 1.0,
        "detect_gpus": 0.25 if line.box_source == "yolo" else 0.0,
        "ingest_gpus": 0.25 if any(gpu_camera(line, c) for c in line.cameras) else 0.0,
    }


def gpu_camera(line: LineConfig, camera: CameraConfig) -> bool:
    """Whether the camera's actor runs a network: a matting model, or YOLO to track products."""
    return camera.matting_model is not None or line.triggered_by == "tracking"


def _gpus(line: LineConfig, per_actor: dict[str, float]) -> float:
    """GPUs the line's actors ask for at these shares (by setting name)."""
    counts = {
        "score_gpus": line.replicas.score,
        "train_gpus": 1 if line.retrain.enabled else 0,
        "detect_gpus": line.replicas.detect,
        "ingest_gpus": sum(1 for c in line.cameras if gpu_camera(line, c)),
    }
    return sum(counts[name] * share for name, share in per_actor.items())


def line_gpus(line: LineConfig, res: LineResources) -> float:
    """GPUs the actors of ``line`` ask for."""
    return _gpus(line, {name: getattr(res, name) for name in GPU_SETTINGS})


def line_cpus(line: LineConfig, res: LineResources | None = None) -> float:
    """Logical CPUs the actors of ``line`` ask for."""
    res = res or line_resources(line, cluster_gpus=0)
    return (
        len(line.cameras) * res.ingest_cpus
        + line.replicas.detect * res.detect_cpus
        + line.replicas.score * res.score_cpus
        + res.aggregate_cpus
        + (res.train_cpus if line.retrain.enabled else 0.0)
    )


@dataclass
class RunningLine:
    config: LineConfig  # its crop settings resolved against its model
    client: redis.Redis  # to the line's Redis, for the driver
    access: RedisAccess  # to the same, for its actors
    run: LineRun
    ingest: list = field(default_factory=list)
    detect: list = field(default_factory=list)
    score: list = field(default_factory=list)
    aggregator: object = None
    trainer: object = None
    runs: dict = field(default_factory=dict)  # actor handle -> ObjectRef of its run()
    cameras: dict = field(default_factory=dict)  # ingest actor -> its camera's id
    retired: dict = field(default_factory=dict)  # finished ingest actors -> their run()
    # camera id -> when frame 0 of its replayed recording was due (a paced replay's frames are
    # stamped from it: what ties a verdict to a moment of the recording)
    replay_epochs: dict = field(default_factory=dict)
    resources: LineResources = field(default_factory=LineResources)

    @property
    def workers(self) -> list:
        return (
            self.detect + self.score + [self.aggregator] + ([self.trainer] if self.trainer else [])
        )


def resolve_line(
    client: redis.Redis, line: LineConfig, model_dir: Path, *, activate: bool = False
) -> tuple[LineConfig, InputContract | None]:
    """``line`` with its crop settings taken from the model it will inspect with (the registry's
    active version, else ``model_dir``; ``model_dir`` itself with ``activate``), and that model's
    input contract (None: a model from before contracts, whose crops nobody can check).

    Raises ``ContractConflict`` (a setting of the line contradicts the model) or
    :class:`StageFailed` (no usable model) before anything starts.
    """
    registry = Registry(client, line.id)
    active = None if activate else registry.active()
    where = Path(active.path) if active else Path(model_dir)
    try:
        metadata, _, _ = check_model(where)
    except ModelError as exc:
        raise StageFailed(f"line {line.id}: {exc}") from None
    contract = InputContract.of(metadata)
    return line.following(contract, f"{metadata['sha256'][:16]} ({where})"), contract


def start_line(
    line: LineConfig,
    access: RedisAccess,
    model_dir: Path,
    run: LineRun | None = None,
    *,
    resources: LineResources | None = None,
    start_timeout_s: float = 300.0,
    activate: bool = False,
) -> RunningLine:
    """Start one line's actors, its crops cut as its model learned them (:func:`resolve_line`).
    ``run``: what its actors share (with a ``sample_dir``, every view and verdict is kept there;
    with ``candidates_dir`` too, a trainer retrains from QA's labels and writes models there).
    ``activate``: inspect with ``model_dir`` even where the registry has another active version.
    Actors still unplaced after ``start_timeout_s`` (the cluster lacks what they ask for) end
    the start with :class:`StageFailed`, the line's actors released."""
    client = access.connect()
    line, _ = resolve_line(client, line, model_dir, activate=activate)
    _activate(Registry(client, line.id), line, model_dir, activate)
    res = resources or line_resources(line, _have("GPU"))
    running = RunningLine(line, client, access, run or LineRun(), resources=res)
    # Every camera numbers from the line's next product again: earlier re-synchronisations are
    # void. (An aggregator Ray restarts later finds the ones made since in Redis.)
    JoinSteps(client, line.id).clear()
    _start_workers(running)
    # Consumers first: their groups exist before the first frame is published.
    _await_started(running, start_timeout_s)
    for actor in running.workers:
        running.runs[actor] = actor.run.remote()
    start_ingest(running, line.cameras)
    return running


def _activate(registry: Registry, line: LineConfig, model_dir: Path, activate: bool) -> None:
    """Record the line's crops, then make sure a model that learned them is active."""
    # Recorded before a version is activated: a model promoted later must match these crops.
    registry.set_line_crops(line.crops)
    try:
        if activate:
            registry.promote(registry.register(model_dir).id)
        else:
            registry.ensure_active(model_dir)
    except RegistryError as exc:
        raise StageFailed(str(exc)) from None


def _start_workers(running: RunningLine) -> None:
    """The aggregator, scorers, trainer (where the line keeps samples and candidates) and
    detectors, each with the line's resources."""
    line, res, access, run = running.config, running.resources, running.access, running.run
    running.aggregator = AggregatorActor.options(
        num_cpus=res.aggregate_cpus, **ACTOR_OPTIONS
    ).remote(access, run, line)
    for i in range(line.replicas.score):
        running.score.append(
            ScorerActor.options(
                num_cpus=res.score_cpus, num_gpus=res.score_gpus, **ACTOR_OPTIONS
            ).remote(access, run, line, i)
        )
    if run.sample_dir and run.candidates_dir and line.retrain.enabled:
        running.trainer = TrainerActor.options(
            num_cpus=res.train_cpus, num_gpus=res.train_gpus, **ACTOR_OPTIONS
        ).remote(access, run, line)
    for i in range(line.replicas.detect):
        running.detect.append(
            DetectMatteActor.options(
                num_cpus=res.detect_cpus, num_gpus=res.detect_gpus, **ACTOR_OPTIONS
            ).remote(access, run, line, i)
        )


def _await_started(running: RunningLine, timeout_s: float) -> None:
    """Every worker answering, else :class:`StageFailed` with the workers released."""
    line, res = running.config, running.resources
    try:
        ray.get([a.ping.remote() for a in running.workers], timeout=timeout_s)
        return
    except ray.exceptions.RayActorError as exc:  # its constructor failed (no Redis, no model)
        why = f"an actor could not start: {_cause(exc)}"
    except ray.exceptions.GetTimeoutError:
        why = (
            f"its actors did not all start within {timeout_s:g} s; they ask for "
            f"{line_cpus(line, res):g} CPUs and {line_gpus(line, res):g} GPUs, the cluster has "
            f"{_have('CPU'):g} and {_have('GPU'):g} (add nodes, or lower the line's replicas or "
            "resources)"
        )
    # Those that did start would hold their resources.
    _release(running.workers)
    raise StageFailed(f"line {line.id}: {why}")


def _cause(exc: ray.exceptions.RayError) -> str:
    """The error an actor's constructor raised: the last line of Ray's report of it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _have(resource: str) -> float:
    return ray.cluster_resources().get(resource, 0.0)


def start_ingest(running: RunningLine, cameras: list[CameraConfig]) -> None:
    """Start ingest actors for ``cameras`` (the line's, or new sources that continue it), with
    the line's resources.

    Ingest actors whose source has ended are retired first: they would hold their CPUs.
    """
    res = running.resources
    line = running.config.id
    refs = [running.runs[a] for a in running.ingest]
    finished = ray.wait(refs, num_returns=len(refs), timeout=0)[0] if refs else []
    for actor in [a for a in running.ingest if running.runs[a] in finished]:
        ray.kill(actor, no_restart=True)
        running.ingest.remove(actor)
        running.cameras.pop(actor)
        running.retired[actor] = running.runs.pop(actor)
    first = next_product_seq(running.client, line, [c.id for c in cameras])
    started = []
    for cam in cameras:
        gpus = res.ingest_gpus if gpu_camera(running.config, cam) else 0.0
        actor = CameraIngestActor.options(
            num_cpus=res.ingest_cpus, num_gpus=gpus, **ACTOR_OPTIONS
        ).remote(running.access, running.run, running.config, cam, first)
        running.ingest.append(actor)
        running.cameras[actor] = cam.id
        started.append(actor)
    # Replayed recordings (``fps`` set) run from one clock, set once every camera is up (Ray
    # starts a line's actors up to seconds apart): a product reaches all the cameras at once, as
    # on a live line, and a verdict's latency is the line's, not the actors' start-up.
    ray.get([a.ping.remote() for a in started], timeout=300)
    epoch = time.time()
    for actor in started:
        running.runs[actor] = actor.run.remote(epoch)
        running.replay_epochs[running.cameras[actor]] = epoch


def sources_done(running: RunningLine) -> bool:
    ready, _ = ray.wait(
        [running.runs[a] for a in running.ingest], num_returns=len(running.ingest), timeout=0
    )
    return len(ready) == len(running.ingest)


def backlog(running: RunningLine) -> int:
    """Entries published but not yet acknowledged by the detect, score and aggregate stages."""
    bus = StreamBus(running.client)
    streams = Streams(running.config.id)
    cameras = [c.id for c in running.config.cameras]
    return sum(bus.lag(stream, group) for stream, group in line_groups(streams, cameras))


class StageFailed(RuntimeError):
    """A stage of a line ended on an error, or (but for a camera) without being asked to."""


def check_stages(running: RunningLine) -> None:
    """Raise :class:`StageFailed` when a stage's loop has ended on its own (an error it does not
    handle, Redis away for longer than the clients wait): the line would otherwise wait forever
    for results that stage no longer makes. A camera may end: its source did.

    (A stage whose process dies is restarted by Ray; an exception inside its loop is not.)
    """
    cameras = {running.runs[a]: f"camera {running.cameras[a]}" for a in running.ingest}
    ended, _ = ray.wait(list(cameras), num_returns=len(cameras), timeout=0)
    for ref in ended:
        _raise_if_failed(running, cameras[ref], ref)
    stages = {running.runs[a]: f"detector {i}" for i, a in enumerate(running.detect)}
    stages |= {running.runs[a]: f"scorer {i}" for i, a in enumerate(running.score)}
    stages[running.runs[running.aggregator]] = "aggregator"
    if running.trainer is not None:
        stages[running.runs[running.trainer]] = "trainer"
    ended, _ = ray.wait(list(stages), num_returns=len(stages), timeout=0)
    for ref in ended:
        _raise_if_failed(running, stages[ref], ref)
        raise StageFailed(f"line {running.config.id}: the {stages[ref]} stopped unasked")


def _raise_if_failed(running: RunningLine, stage: str, run) -> None:
    try:
        ray.get(run)
    except ray.exceptions.RayError as exc:  # its error, or its actor lost for good
        cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
        raise StageFailed(
            f"line {running.config.id}: the {stage} failed: {type(cause).__name__}: {cause}"
        ) from cause


def drain_and_stop(
    lines: list[RunningLine],
    timeout_s: float = 600,
    while_waiting: Callable[[], None] | None = None,
) -> dict:
    """Wait until every published entry has its result, then stop every actor and release its
    resources; return the actors' counters. ``while_waiting`` is called between checks.

    A stage that fails meanwhile raises :class:`StageFailed`, the lines' actors killed: what
    they had not acknowledged stays in Redis for the next start.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            for r in lines:
                check_stages(r)
        except StageFailed:
            # Only the actors: Redis may be what failed (the next start records the crops anew).
            for r in lines:
                _release(r.ingest + r.workers)
            raise
        try:
            drained = all(sources_done(r) for r in lines) and sum(backlog(r) for r in lines) == 0
        except INFRASTRUCTURE_ERRORS:
            # A stream overwritten with another type (Redis's own errors are handled as by the
            # stages): the stage that uses it fails, and says so, at the next check.
            drained = False
        if drained:
            break
        if while_waiting is not None:
            while_waiting()
        time.sleep(0.25)
    stats = {}
    for r in lines:
        for actor in r.ingest:
            actor.stop.remote()
        for actor in r.detect + r.score:
            actor.stop.remote()
        # The aggregator goes last, after the views in flight have been scored.
        done = ray.get([r.runs[a] for a in r.ingest + r.detect + r.score], timeout=120)
        r.aggregator.stop.remote()
        aggregate = ray.get(r.runs[r.aggregator], timeout=max(30.0, r.config.view_timeout_s * 2))
        stats[r.config.id] = {
            "ingest": ray.get(list(r.retired.values())) + done[: len(r.ingest)],
            "detect": done[len(r.ingest) : len(r.ingest) + len(r.detect)],
            "score": done[len(r.ingest) + len(r.detect) :],
            "aggregate": aggregate,
        }
        if r.trainer is not None:
            # A retraining in progress finishes first (it may take minutes).
            r.trainer.stop.remote()
            stats[r.config.id]["trainer"] = ray.get(r.runs[r.trainer], timeout=1800)
        _stopped(r)
    return stats


def _release(actors: list) -> None:
    """Stopped actors would go on holding their CPUs and GPUs: a line started next in the same
    cluster could not be placed."""
    for actor in actors:
        ray.kill(actor, no_restart=True)


def _stopped(running: RunningLine) -> None:
    """A line's actors released, and its crops forgotten: a stopped line checks nothing, so a
    model it will follow at its next start may be promoted meanwhile."""
    _release(running.ingest + running.workers)
    Registry(running.client, running.config.id).set_line_crops(None)
