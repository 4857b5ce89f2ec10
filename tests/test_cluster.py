"""The inspection cluster end to end: real Ray actors over a real embedded Redis."""

import io
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import ray
import redis
from PIL import Image

from cluster.demo import line_config
from cluster.runtime.actors import CameraIngestActor
from cluster.runtime.graph import (
    ACTOR_OPTIONS,
    LineResources,
    StageFailed,
    drain_and_stop,
    start_line,
)
from cluster.runtime.settings import CameraConfig, LineConfig, LineRun, ReplicaConfig
from cluster.transport.bus import StreamBus
from cluster.transport.connection import EmbeddedRedis
from cluster.transport.streams import Streams
from schemas import CameraFrame, ProductView, Verdict, ViewScore
from tests.synthetic import LINE_FRAME as FRAME
from tests.synthetic import one_camera_video, train_line_models
from workers.datasets import list_test_samples
from workers.differnet.store import load_model, update_metadata
from workers.simulation.simulate import LineSpec, camera_videos, render_line

SMALL = LineResources(ingest_cpus=0.1, detect_cpus=0.1, score_cpus=0.1, aggregate_cpus=0.1)


@pytest.fixture(scope="module")
def line_model(tmp_path_factory):
    """A model trained on crops the front end cut from a simulated line of good products."""
    root = tmp_path_factory.mktemp("cluster")
    return train_line_models(root), root


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def simulate(data, out, products, seed):
    samples = list_test_samples(data)
    good = [s for s in samples if not s.is_defect]
    bad = [s for s in samples if s.is_defect]
    return render_line(
        good, bad, out, LineSpec(products=products, defect_rate=0.5, seed=seed, **FRAME)
    )


def good_score(camera: str, seq: int, captured_at: float) -> ViewScore:
    """A good view's score of product ``seq`` of line ``l``, as a scorer publishes it."""
    return ViewScore(
        product_id=f"l:{seq}",
        line="l",
        camera=camera,
        product_seq=seq,
        captured_at=captured_at,
        score=0.0,
        threshold=1.0,
        is_defect=False,
        model_version="v1",
    )


def verdicts(client, line):
    return [Verdict.from_entry(f) for _, f in client.xrange(Streams(line).verdicts)]


def inspect(line_model, tmp_path, products: int, seed: int, model_dir=None, **line_changes):
    """A simulated line through the cluster, unpaced: manifest, actor stats, verdicts, scores,
    views."""
    data, root = line_model
    model_dir = model_dir or root / "model"
    manifest = simulate(data, tmp_path / "line", products, seed=seed)
    with EmbeddedRedis(tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url)
        line = line_config(tmp_path / "line", manifest["cameras"], ReplicaConfig())
        line = line.model_copy(update=line_changes)
        running = start_line(line, server.access, model_dir, resources=SMALL)
        stats = drain_and_stop([running], timeout_s=300)
        scores = [ViewScore.from_entry(f) for _, f in client.xrange(Streams("demo").scores)]
        views = [ProductView.from_entry(f) for _, f in client.xrange(Streams("demo").views)]
        return manifest, stats, verdicts(client, "demo"), scores, views


def test_every_product_gets_one_verdict_and_defects_are_found(line_model, local_ray, tmp_path):
    manifest, stats, got, _, _ = inspect(line_model, tmp_path, 6, seed=5)
    assert sorted(v.product_seq for v in got) == list(range(6))
    assert all(v.status == "complete" and len(v.views) == 4 for v in got)
    truth = {p["seq"]: p["defective"] for p in manifest["products"]}
    found = [v.product_seq for v in got if v.decision == "defect"]
    assert set(found) >= {seq for seq, bad in truth.items() if bad}  # spotted and scratched tiles
    assert stats["demo"]["aggregate"]["verdicts_complete"] == 6


def test_an_entry_that_kills_its_actor_each_time_is_dead_lettered_and_the_line_goes_on(
    local_ray, tmp_path
):
    """The frame's processing kills the detect actor (here: killed while it decodes, as an out
    of memory would); Ray restarts it, it takes its own pending entry first, and after
    ``max_deliveries`` the entry is dead-lettered with that reason instead of tried again."""
    from cluster.runtime.actors import DetectMatteActor

    noise = np.random.default_rng(0).integers(0, 255, (6000, 6000, 3), np.uint8)
    poison = CameraFrame(
        line="l",
        camera="cam0",
        sequence=0,
        product_seq=0,
        timestamp=1.0,
        codec="jpeg",
        shape=noise.shape,
        image=cv2.imencode(".jpg", noise)[1].tobytes(),  # about a second to decode
    )
    streams = Streams("l")
    with EmbeddedRedis(tmp_path / "redis") as server:
        client = server.access.connect()
        client.xgroup_create(streams.frames("cam0"), streams.detect_group, id="0", mkstream=True)
        entry = client.xadd(streams.frames("cam0"), poison.to_entry()).decode()
        line = LineConfig(id="l", cameras=[{"id": "cam0", "source": "cam0.avi"}])
        line = line.following(None, "no model")  # the default crops
        detect = DetectMatteActor.options(num_cpus=0.1, **ACTOR_OPTIONS).remote(
            server.access, LineRun(max_deliveries=2), line, 0
        )
        run = detect.run.remote()
        kills, deadline = 0, time.monotonic() + 120
        while not client.xlen(streams.dead_letters) and time.monotonic() < deadline:
            rows = client.xpending_range(streams.frames("cam0"), "detect", "-", "+", 1)
            if rows and rows[0]["times_delivered"] > kills and kills < 2:
                ray.kill(detect, no_restart=False)  # mid-decode
                kills += 1
            time.sleep(0.02)
        [(_, dead)] = client.xrange(streams.dead_letters)
        detect.stop.remote()
        stats = ray.get(run, timeout=60)
        lag = StreamBus(client).lag(streams.frames("cam0"), "detect")
    assert kills == 2 and dead[b"_dl_entry"].decode() == entry
    assert dead[b"_dl_reason"].decode().startswith("delivered 3 times without being processed")
    assert lag == 0 and stats["dead_lettered"] == 1  # acknowledged: the line goes on


def blank_product(video: Path, frames: list[int]) -> None:
    """Show the empty belt in ``frames`` of an MJPEG recording: its camera misses that product."""
    capture = cv2.VideoCapture(str(video))
    fps = capture.get(cv2.CAP_PROP_FPS)
    recorded = []
    while (frame := capture.read()[1]) is not None:
        recorded.append(frame)
    capture.release()
    h, w = recorded[0].shape[:2]
    writer = cv2.VideoWriter(
        str(video), cv2.CAP_OPENCV_MJPEG, cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h)
    )
    for i, frame in enumerate(recorded):
        writer.write(recorded[0] if i in frames else frame)  # frame 0: the belt, empty
    writer.release()


def test_a_camera_that_missed_a_product_is_re_synchronised_by_capture_time(
    line_model, local_ray, tmp_path
):
    data, root = line_model
    manifest = simulate(data, tmp_path / "line", 8, seed=7)
    missed = manifest["products"][3]["views"]["cam3"]["bboxes"]
    blank_product(camera_videos(tmp_path / "line")["cam3"], [int(f) for f in missed])
    with EmbeddedRedis(tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url)
        line = line_config(tmp_path / "line", manifest["cameras"], ReplicaConfig())
        # Paced at 60 frames a second, a product every 0.43 s: views of one product within 0.15 s.
        line = line.model_copy(update={"max_camera_spread_s": 0.15, "view_timeout_s": 60.0})
        for cam in line.cameras:
            cam.fps = 60.0
        running = start_line(line, server.access, root / "model", resources=SMALL)
        stats = drain_and_stop([running], timeout_s=300)
        got = {v.product_seq: v for v in verdicts(client, "demo")}
    # cam3 numbered product 4 as its 3rd, and so on: without re-synchronising, every verdict
    # from product 3 on would join (or leave out) another product's view.
    assert sorted(got) == list(range(8))
    assert got[3].status == "incomplete" and got[3].missing_cameras == ["cam3"]
    assert "cam3 did not see it" in got[3].reason
    assert all(got[q].status == "complete" for q in got if q != 3), [v.reason for v in got.values()]
    assert stats["demo"]["aggregate"]["cameras_resynchronised"] == {"cam3": 1}


def test_a_restarted_live_camera_numbers_on_from_the_line_not_from_its_first_product(
    local_ray, embedded_redis, redis_client, http_server, tmp_path
):
    # A recording served over HTTP is a live stream to the camera (it drops at its end and
    # comes back): products 0, 1, 2, ... at about two a second.
    video = one_camera_video(tmp_path, 2)
    url = f"http://127.0.0.1:{http_server.server_port}/{video.relative_to(tmp_path)}"
    line = LineConfig(id="live", cameras=[CameraConfig(id="cam0", source=url)])
    camera = CameraIngestActor.options(num_cpus=0.1, **ACTOR_OPTIONS).remote(
        embedded_redis.access, LineRun(maxlen=1000), line, line.cameras[0], 0
    )
    run = camera.run.remote()
    stream = Streams("live").frames("cam0")

    def numbers() -> list[int]:
        return [CameraFrame.from_entry(f).product_seq for _, f in redis_client.xrange(stream)]

    def wait_for(n: int) -> None:
        deadline = time.monotonic() + 60
        while len(numbers()) < n and time.monotonic() < deadline:
            time.sleep(0.05)

    wait_for(3)
    ray.kill(camera, no_restart=False)  # Ray restarts it and runs `run` again
    before = len(numbers())
    wait_for(before + 3)
    camera.stop.remote()
    ray.get(run, timeout=60)
    seen = numbers()
    assert len(seen) >= before + 3
    assert seen == sorted(set(seen)), seen  # no number given twice: none taken for a late view


def test_a_stage_that_fails_ends_the_drain_with_its_error_and_frees_the_line(
    line_model, local_ray, tmp_path
):
    data, root = line_model
    manifest = simulate(data, tmp_path / "line", 2, seed=8)
    with EmbeddedRedis(tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url)
        line = line_config(tmp_path / "line", manifest["cameras"], ReplicaConfig())
        running = start_line(line, server.access, root / "model", resources=SMALL)
        # Someone overwrites the score stream: the scorer cannot publish, nor the aggregator read.
        # One SET replaces the stream at once (DEL then SET lets the aggregator see no key).
        client.set(Streams("demo").scores, "not a stream")
        with pytest.raises(
            StageFailed, match=r"line demo: the (scorer 0|aggregator) failed: .*WRONGTYPE"
        ):
            drain_and_stop([running], timeout_s=120)
    # Its actors are gone (rather than holding their CPUs, waiting for nothing).
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2


def test_a_line_whose_actors_cannot_be_placed_fails_to_start_saying_what_they_ask(
    line_model, local_ray, tmp_path
):
    data, root = line_model
    manifest = simulate(data, tmp_path / "line", 1, seed=8)
    line = line_config(tmp_path / "line", manifest["cameras"], ReplicaConfig())
    no_gpu_here = LineResources(**{**SMALL.__dict__, "score_gpus": 0.5})
    with EmbeddedRedis(tmp_path / "redis") as server:
        with pytest.raises(StageFailed, match=r"did not all start within 3 s.* 0.5 GPUs"):
            start_line(
                line, server.access, root / "model", resources=no_gpu_here, start_timeout_s=3
            )
    # The actors that did start are gone again.
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2


def test_a_line_far_behind_sheds_whole_products_at_ingest_each_with_its_verdict(
    line_model, local_ray, tmp_path
):
    # Unpaced cameras outrun a backlog of one product. (And the line's views are cut as whole
    # boxes: the line sets no mask_shape, and the detect + matte actors follow its model's.)
    boxed = tmp_path / "box-model"
    shutil.copytree(line_model[1] / "model", boxed)
    contract = load_model(boxed).metadata["input_contract"]
    update_metadata(
        boxed, input_contract=contract | {"crops": contract["crops"] | {"mask_shape": "box"}}
    )
    _, stats, got, scores, views = inspect(
        line_model, tmp_path, 8, seed=7, model_dir=boxed, max_backlog_products=1
    )
    for view in views:
        alpha = np.asarray(Image.open(io.BytesIO(view.image)))[:, :, 3] > 0
        rows, cols = np.nonzero(alpha)
        assert alpha[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
    assert sorted(v.product_seq for v in got) == list(range(8))  # still one verdict each
    shed = {v.product_seq for v in got if v.reason and v.reason.startswith("shed at ingest")}
    counted = sum(s.get("products_shed", 0) for s in stats["demo"]["ingest"])
    assert 1 <= len(shed) < 8 and counted == len(shed)
    for v in got:
        if v.product_seq in shed:
            assert v.status == "incomplete" and v.decision == "unknown" and v.views == []
            assert v.missing_cameras == ["cam0", "cam1", "cam2", "cam3"]
    # Whole products: no view of a shed product went on, every view of the others did.
    by_product = {}
    for view in views:
        by_product.setdefault(view.product_seq, set()).add(view.camera)
    assert not shed & set(by_product)
    assert all(len(cams) == 4 for cams in by_product.values())
    assert {s.product_seq for s in scores} == set(range(8)) - shed


def test_a_product_whose_every_view_was_lost_still_gets_a_verdict(local_ray, tmp_path):
    """All views of product 3 were dead-lettered upstream: the line's verdicts pass it by, and
    the aggregator gives it an incomplete verdict saying so (once, after view_timeout_s)."""
    from cluster.runtime.actors import AggregatorActor

    cams = ["cam0", "cam1"]
    with EmbeddedRedis(tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url)
        line = LineConfig(
            id="l", cameras=[{"id": c, "source": f"{c}.avi"} for c in cams], view_timeout_s=1.0
        )
        aggregator = AggregatorActor.options(num_cpus=0.1, **ACTOR_OPTIONS).remote(
            server.access, LineRun(), line
        )
        run = aggregator.run.remote()
        for seq in [n for n in range(15) if n != 3]:
            for cam in cams:
                client.xadd(Streams("l").scores, good_score(cam, seq, 1000.0 + seq).to_entry())
        deadline = time.monotonic() + 30
        while len(verdicts(client, "l")) < 15 and time.monotonic() < deadline:
            time.sleep(0.2)
        filled = len(verdicts(client, "l"))  # before the stop's flush
        aggregator.stop.remote()
        stats = ray.get(run, timeout=60)
        got = {v.product_seq: v for v in verdicts(client, "l")}
    assert filled == 15 and sorted(got) == list(range(15))
    lost = got[3]
    assert lost.status == "incomplete" and lost.views == [] and lost.missing_cameras == cams
    assert "no view of it reached the aggregator" in lost.reason
    assert stats["products_without_views"] == 1


def test_a_restarted_aggregator_numbers_a_re_synchronised_camera_as_before(local_ray, tmp_path):
    """cam3 missed product 1, so its n-th view is of product n + 1 from then on. The aggregator,
    killed and restarted by Ray after re-synchronising it, must still know that."""
    from cluster.runtime.actors import AggregatorActor

    cams = ["cam0", "cam1", "cam2", "cam3"]
    with EmbeddedRedis(tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url)
        line = LineConfig(
            id="l",
            cameras=[{"id": c, "source": f"{c}.avi"} for c in cams],
            view_timeout_s=30.0,
            max_camera_spread_s=0.1,
            keep_processed_images_s=3600.0,
        )
        aggregator = AggregatorActor.options(num_cpus=0.1, **ACTOR_OPTIONS).remote(
            server.access, LineRun(), line
        )
        run = aggregator.run.remote()

        def product(seq: int) -> None:  # one a second; cam3's numbers one behind from 2 on
            for cam in cams:
                number = seq - 1 if cam == "cam3" and seq >= 2 else seq
                if cam == "cam3" and seq == 1:
                    continue
                score = good_score(cam, number, captured_at=1000.0 + seq)
                client.xadd(Streams("l").scores, score.to_entry())

        def wait_for(n: int) -> dict[int, Verdict]:
            deadline = time.monotonic() + 60
            while len(got := verdicts(client, "l")) < n and time.monotonic() < deadline:
                time.sleep(0.1)
            return {v.product_seq: v for v in got}

        for seq in range(4):
            product(seq)
        assert sorted(wait_for(4)) == [0, 1, 2, 3]
        ray.kill(aggregator, no_restart=False)
        time.sleep(1.0)  # the kill is asynchronous: the old instance must not see what follows
        ray.get(aggregator.ping.remote(), timeout=60)  # answered by the restarted instance
        for seq in range(4, 7):
            product(seq)
        got = wait_for(7)
        aggregator.stop.remote()
        ray.get(run, timeout=60)
        published = len(verdicts(client, "l"))
    assert sorted(got) == list(range(7)) and published == 7
    assert got[1].status == "incomplete" and got[1].missing_cameras == ["cam3"]
    assert all(got[q].status == "complete" for q in got if q != 1), [v.reason for v in got.values()]


def test_chaos_every_product_one_verdict_under_every_fault(line_model, local_ray, tmp_path):
    """bench.chaos, short: every fault in turn on a small paced line (Redis killed early, so
    that it lands mid-run on so short a line): SIGKILL of every actor kind and of Redis, poison
    entries of every kind, a detection stall that sheds."""
    from bench.chaos import ACTOR_FAULTS, FAULTS, run_chaos

    data, root = line_model
    manifest = simulate(data, tmp_path / "line", 14, seed=4)
    line = line_config(tmp_path / "line", manifest["cameras"], ReplicaConfig(), fps=7.0)
    # Processed frames and views leave Redis at once: never one a killed actor still held.
    line = line.model_copy(
        update={"max_backlog_products": 1, "view_timeout_s": 60.0, "keep_processed_images_s": 0}
    )
    small = LineResources(**vars(SMALL) | {"train_cpus": 0.1})
    faults = ["poison", "kill-redis", "stall-detect", *ACTOR_FAULTS]
    assert sorted(faults) == sorted(FAULTS)
    report = run_chaos(
        line, root / "model", tmp_path / "chaos", 14, faults, 12.0, 0.5, resources=small
    )
    assert report["products_without_verdict"] == [], report
    assert report["duplicate_verdicts"] == {} and report["verdicts_for_unknown_products"] == []
    assert [p["kind"] for p in report["poison"] if not p["dead_lettered"]] == []
    assert all(p["reason"] for p in report["poison"])
    assert 1 <= report["products_shed"] == report["products_shed_decided"]
    assert [f["fault"] for f in report["faults"]] == faults
    # Each one landed mid-run: the line still had products to decide after it.
    assert [f["fault"] for f in report["faults"] if f["next_verdict_s"] is None] == []
    assert report["actors"]["aggregate"]["images_trimmed"] > 0


def test_a_yolo_line_tracks_its_products_and_gives_gloves_and_tools_no_view(
    touching_scene, local_ray, tmp_path
):
    from workers.contract import CropSpec
    from workers.differnet.config import DifferNetConfig
    from workers.differnet.recipes import train_from_folder
    from workers.differnet.training import TrainingOptions
    from workers.frontend.detect import YoloDetector, iou
    from workers.simulation.harvest import harvest_crops

    line_dir, manifest, report = touching_scene
    weights = Path(report["weights"])
    # The line's model learned from crops its YOLO cut (its input contract says so).
    crops = CropSpec(box_source="yolo")
    yolo = YoloDetector(weights, report["sha256"])
    harvest_crops(line_dir, tmp_path / "crops", "train", crops, detector=yolo)
    tiny = DifferNetConfig(image_size=96, train_transforms=2, tta=1)
    train_from_folder(
        tmp_path / "crops", tmp_path / "model", tiny, TrainingOptions(epochs=2), crops=crops
    )
    line = line_config(line_dir, manifest["cameras"], ReplicaConfig()).model_copy(
        update={"yolo_weights": weights, "yolo_weights_sha256": report["sha256"]}
    )

    # The line as it runs by default, tracking its products with the YOLO, and beside it the
    # same line counting the motion gate's blobs.
    blobs = line.model_copy(update={"id": "blobs", "trigger": "motion"})
    with EmbeddedRedis(tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url)
        running = [
            start_line(x, server.access, tmp_path / "model", resources=SMALL) for x in (line, blobs)
        ]
        stats = drain_and_stop(running, timeout_s=300)
        out = {
            x.id: (
                [ProductView.from_entry(f) for _, f in client.xrange(Streams(x.id).views)],
                verdicts(client, x.id),
            )
            for x in (line, blobs)
        }

    def best(kind: str, box: tuple) -> float:
        boxes = [b for t in manifest[kind] for b in t["views"]["cam0"]["bboxes"].values()]
        return max((iou(box, tuple(b)) for b in boxes), default=0.0)

    # Tracking counts products, not the blobs the gate sees: gloves and tools are never sent on.
    tracked = stats["demo"]
    assert line.triggered_by == "tracking" and tracked["ingest"][0]["published"] >= 3
    assert sum(s.get("not_products", 0) for s in tracked["detect"]) == 0
    # The motion gate fires on gloves and tools too; the detectors said so, and the aggregator
    # decided those numbers without a verdict.
    not_products = sum(s.get("not_products", 0) for s in stats["blobs"]["detect"])
    assert not_products >= 2 and stats["blobs"]["aggregate"]["not_products"] == not_products
    for views, got in out.values():
        assert views and sorted(v.product_seq for v in got) == sorted(v.product_seq for v in views)
        assert all(v.status == "complete" for v in got)
        for view in views:  # each view is a product's, none a glove's or a tool's
            box = (view.bbox.x, view.bbox.y, view.bbox.w, view.bbox.h)
            assert best("products", box) > 0.6 and best("distractors", box) < 0.4, box
