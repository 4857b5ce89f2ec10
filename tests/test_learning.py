"""Continuous learning: registry, retraining from labels, hot swap, trainer actor, CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import redis
import torch
from typer.testing import CliRunner

from cluster.apps.cli import app
from cluster.demo import line_config
from cluster.runtime.actors import TrainerActor
from cluster.runtime.graph import LineResources, drain_and_stop, start_line
from cluster.runtime.settings import LineConfig, LineRun, ReplicaConfig, RetrainConfig
from cluster.transport.connection import EmbeddedRedis
from cluster.transport.qa import record_label
from cluster.transport.registry import Registry, RegistryError
from cluster.transport.streams import Streams
from schemas import Label, RetrainOutcome, RetrainRequest, Verdict, ViewScore
from tests.synthetic import LINE_FRAME as FRAME
from tests.synthetic import make_dataset, textured_tile, train_line_models
from workers.datasets import list_test_samples
from workers.differnet.config import DifferNetConfig
from workers.differnet.learning import (
    LabelledProduct,
    RetrainError,
    gather_labelled,
    is_held_out,
    judge,
    retrain,
)
from workers.differnet.recipes import train_from_folder
from workers.differnet.store import FEATURE_CACHE, load_model
from workers.differnet.training import TrainingOptions
from workers.images import encode_png
from workers.qa.samples import SampleStore
from workers.simulation.simulate import LineSpec, render_line

SMALL = LineResources(
    ingest_cpus=0.1, detect_cpus=0.1, score_cpus=0.1, aggregate_cpus=0.1, train_cpus=0.1
)
TINY = DifferNetConfig(image_size=64, train_transforms=2, tta=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two versions of a line model (different seeds) trained on the front end's crops."""
    root = tmp_path_factory.mktemp("learning")
    return train_line_models(root, ("model-a", "model-b"), epochs=10), root


def test_registry_promotes_rolls_back_and_refuses_broken_versions(models, redis_client, tmp_path):
    _, root = models
    registry = Registry(redis_client, "l1")
    a = registry.ensure_active(root / "model-a")
    assert a.status == "active" and registry.active_id() == a.id
    assert registry.register(root / "model-a").id == a.id  # same weights, same version
    b = registry.register(root / "model-b")
    assert b.status == "candidate" and b.id != a.id
    assert registry.promote(b.id).status == "active"
    assert {v.id: v.status for v in registry.versions()} == {a.id: "retired", b.id: "active"}
    assert registry.rollback().id == a.id and registry.active_id() == a.id
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback()
    with pytest.raises(RegistryError, match="no model version"):
        registry.promote("feedface00000000")
    # The history holds each version once, the one most recently left first.
    for version in (b, a, b, a):
        registry.promote(version.id)
    assert [v.decode() for v in redis_client.lrange(registry.history_key, 0, -1)] == [b.id, a.id]

    # A tampered weights file, then a missing one: refused, the active version stays.
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(root / "model-b", broken)
    c = registry.register(broken)  # same weights as b, other folder: b's entry is kept
    assert c.id == b.id
    meta = json.loads((broken / "model.json").read_text())
    weights = broken / meta["weights_file"]
    damaged = bytearray(weights.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    weights.write_bytes(bytes(damaged))
    with pytest.raises(RegistryError, match="sha256"):
        registry.register(broken)
    moved = tmp_path / "moved"
    shutil.copytree(root / "model-b", moved)
    registry.client.hset(
        registry.versions_key,
        b.id,
        registry.get(b.id).model_copy(update={"path": str(moved)}).model_dump_json(),
    )
    shutil.rmtree(moved)
    with pytest.raises(RegistryError, match="refused"):
        registry.promote(b.id)
    with pytest.raises(RegistryError, match="refused"):
        registry.set_shadow(b.id)
    assert registry.active_id() == a.id


def test_labels_are_sorted_into_training_views_and_validation_products(tmp_path):
    store = SampleStore(tmp_path)
    for seq in range(40):
        for cam in ("c0", "c1"):
            store.put_view("l", seq, cam, b"png")
    labels = {f"l:{i}": "good" for i in range(30)}
    labels |= {"l:30": "defect", "l:31/c1": "defect", "l:32/c0": "good", "l:99": "good"}
    pool = gather_labelled(labels, store, holdout=0.3, used={"l:0"})
    held = {f"l:{i}" for i in range(30) if is_held_out(f"l:{i}", 0.3)}
    assert 0 < len(held) < 30
    assert {p.product_id for p in pool.validation if p.label == 0} == held
    assert {p.product_id for p in pool.validation if p.label == 1} == {"l:30", "l:31"}
    assert all(len(p.views) == 2 for p in pool.validation)
    assert set(pool.train_views) == {f"l:{i}" for i in range(1, 30)} - held | {"l:32"}
    assert [p.name for p in pool.train_views["l:32"]] == ["c0.png"]  # only the labelled view
    assert "l:99" not in pool.train_views  # not in the store


def test_judge_rejects_more_false_alarms_or_a_lower_auroc():
    parent = {"fpr": 0.2, "val_auroc": 0.9}
    assert judge({"fpr": 0.1, "val_auroc": 0.95}, parent).publishable
    assert judge({"fpr": 0.2, "val_auroc": 0.895}, parent).publishable  # within tolerance
    worse = judge({"fpr": 0.3, "val_auroc": 0.99}, parent)
    assert not worse.publishable and "more false alarms" in worse.reason
    lower = judge({"fpr": 0.1, "val_auroc": 0.8}, parent)
    assert not lower.publishable and "AUROC" in lower.reason


def _tiles(folder: Path, n: int, seed: int, gain: float = 1.0, defect: bool = False) -> list[Path]:
    from tests.synthetic import add_defect

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        tile = textured_tile(rng, 72, 96).astype(np.float64) * gain
        tile = tile.clip(0, 255).astype(np.uint8)
        if defect:
            tile, _ = add_defect(rng, tile, "spot")
        path = folder / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(tile))
        paths.append(path)
    return paths


def test_retrain_learns_new_goods_from_the_parents_cached_features(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=8, n_good=3, n_defect=2)
    parent = tmp_path / "parent"
    # Its flow learns from a draw of five of the eight images (the memory from all).
    train_from_folder(data, parent, TINY, TrainingOptions(epochs=3, flow_images=5))
    parent_rows = torch.load(parent / FEATURE_CACHE, weights_only=True).shape[0]
    assert parent_rows == 5 * TINY.train_transforms
    brighter = _tiles(tmp_path / "new", 6, seed=7, gain=1.4)
    validation = [
        LabelledProduct(f"l:{i}", (p,), 0) for i, p in enumerate(_tiles(tmp_path / "vg", 3, 8, 1.4))
    ] + [
        LabelledProduct(f"l:{10 + i}", (p,), 1)
        for i, p in enumerate(_tiles(tmp_path / "vd", 3, 9, 1.4, defect=True))
    ]
    result = retrain(
        parent, tmp_path / "cand", brighter, validation, options=TrainingOptions(epochs=2)
    )
    meta = result.metadata
    assert meta["parent"] == load_model(parent).version
    assert meta["training"]["n_new_good"] == 6 and meta["training"]["mode"] == "finetune"
    cache = torch.load(tmp_path / "cand" / FEATURE_CACHE, weights_only=True)
    assert cache.shape[0] == parent_rows + 6 * TINY.train_transforms
    assert set(result.judgement.candidate) >= {"val_auroc", "fpr", "threshold"}
    assert meta["judgement"]["reason"] == result.judgement.reason
    assert load_model(tmp_path / "cand").threshold == result.judgement.candidate["threshold"]

    with pytest.raises(RetrainError, match="labelled good and labelled defective"):
        retrain(parent, tmp_path / "x", brighter, validation[:3])
    with pytest.raises(RetrainError, match="no new good views"):
        retrain(parent, tmp_path / "x", [], validation)
    with pytest.raises(RetrainError, match="two readable views of good products"):
        retrain(parent, tmp_path / "x", brighter, validation[2:4])
    scratch = retrain(
        parent,
        tmp_path / "c3",
        brighter,
        validation,
        mode="scratch",
        options=TrainingOptions(epochs=1),
    )
    assert scratch.metadata["training"]["mode"] == "scratch"
    (parent / FEATURE_CACHE).unlink()  # no cache: the same draw of its training folder embedded
    again = retrain(
        parent, tmp_path / "c2", brighter, validation, options=TrainingOptions(epochs=1)
    )
    assert again.metadata["training"]["n_parent_features"] == parent_rows


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def test_hot_swap_mid_run_then_the_trainer_retrains_from_labels(models, local_ray, tmp_path):
    data, root = models
    samples = list_test_samples(data)
    manifest = render_line(
        [s for s in samples if not s.is_defect],
        [s for s in samples if s.is_defect],
        tmp_path / "line",
        LineSpec(products=10, defect_rate=0.4, seed=3, **FRAME),
    )
    store = SampleStore(tmp_path / "samples")
    with EmbeddedRedis(tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url)
        line = line_config(tmp_path / "line", manifest["cameras"], ReplicaConfig(score=2))
        for cam in line.cameras:
            cam.fps = 40.0  # paced: the swap lands mid-run
        registry = Registry(client, "demo")
        running = start_line(
            line, server.access, root / "model-a", LineRun(sample_dir=store.root), resources=SMALL
        )
        first = registry.active_id()
        # The candidate scores in shadow first, then becomes active mid-run.
        candidate = registry.register(root / "model-b").id
        registry.set_shadow(candidate)
        deadline = time.monotonic() + 120
        while client.xlen(Streams("demo").shadow_scores) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        second = registry.promote(candidate).id
        stats = drain_and_stop([running], timeout_s=300)
        scores = [ViewScore.from_entry(f) for _, f in client.xrange(Streams("demo").scores)]
        verdicts = [Verdict.from_entry(f) for _, f in client.xrange(Streams("demo").verdicts)]

        # Across the swap: every view scored exactly once, by one version or the other.
        views = [(s.product_id, s.camera) for s in scores]
        assert len(views) == len(set(views)) == 10 * 4
        assert {s.model_version for s in scores} == {first, second}
        assert sorted(v.product_seq for v in verdicts) == list(range(10))
        assert sum(s.get("model_swaps", 0) for s in stats["demo"]["score"]) >= 1

        shadow = [ViewScore.from_entry(f) for _, f in client.xrange(Streams("demo").shadow_scores)]
        assert shadow and {s.model_version for s in shadow} == {second}
        assert registry.shadow_id() is None  # promoting the shadow version ends shadow mode

        # QA labels the inspected products; the trainer learns from them on request.
        truth = {p["seq"]: p["defective"] for p in manifest["products"]}
        for seq, bad in truth.items():
            label = Label(
                line="demo",
                product_id=f"demo:{seq}",
                label="defect" if bad else "good",
                by="qa",
                at=time.time(),
            )
            record_label(client, label)
        goods = [f"demo:{s}" for s, bad in truth.items() if not bad]
        holdout = next(
            h
            for h in (0.2, 0.3, 0.4, 0.5)
            if 0 < sum(is_held_out(p, h) for p in goods) < len(goods)
        )
        config = RetrainConfig(after_good_views=10_000, holdout=holdout, epochs=3)
        line = LineConfig(
            id="demo", cameras=[{"id": "cam0", "source": "x.avi"}], retrain=config, target_tpr=0.85
        )
        run = LineRun(sample_dir=store.root, candidates_dir=tmp_path / "cand")
        trainer = TrainerActor.options(max_concurrency=2).remote(server.access, run, line)
        run = trainer.run.remote()
        result = CliRunner().invoke(app, ["retrain", "--line", "demo", "--redis", server.url])
        trainer.stop.remote()
        ray.get(run, timeout=120)
        assert result.exit_code in (0, 2), result.output  # 2: a rejected candidate
        outcome = RetrainOutcome.model_validate_json(result.stdout.strip().splitlines()[-1])
        assert outcome.parent == second and outcome.candidate is not None
        assert outcome.n_new_good_views == 4 * sum(not is_held_out(p, holdout) for p in goods)
        assert registry.get(outcome.candidate).parent == second
        assert (registry.active_id() == outcome.candidate) == (outcome.outcome == "promoted")

        listed = CliRunner().invoke(
            app, ["models", "list", "--line", "demo", "--json", "--redis", server.url]
        )
        assert {json.loads(x)["id"] for x in listed.stdout.splitlines()} >= {
            first,
            second,
            outcome.candidate,
        }
        compared = CliRunner().invoke(
            app, ["models", "compare", "--line", "demo", "--redis", server.url]
        )
        assert compared.exit_code == 0, compared.output
        assert json.loads(compared.stdout)["n_labelled_products"] >= 1
        back = CliRunner().invoke(
            app, ["models", "rollback", "--line", "demo", "--redis", server.url]
        )
        assert back.exit_code == 0, back.output
        bad = CliRunner().invoke(
            app, ["models", "promote", "nope", "--line", "demo", "--redis", server.url]
        )
        assert bad.exit_code == 1 and "stays active" in bad.output
        assert (
            RetrainRequest.from_entry(client.xrange(Streams("demo").retrain_requests)[0][1]).line
            == "demo"
        )


def test_shadow_comparison_reports_agreement_and_labelled_quality():
    from workers.line.shadow import compare_scores

    def score(seq, camera, value, version):
        return ViewScore(
            product_id=f"l:{seq}",
            line="l",
            camera=camera,
            product_seq=seq,
            captured_at=1.0,
            score=value,
            threshold=1.0,
            is_defect=value >= 1.0,
            model_version=version,
        )

    active = [
        score(s, c, v, "a")
        for s, c, v in [
            (0, "c0", 0.5),
            (0, "c1", 1.5),
            (1, "c0", 0.2),
            (1, "c1", 0.3),
            (2, "c0", 2.0),
        ]
    ]
    shadow = [
        score(s, c, v, "b")
        for s, c, v in [(0, "c0", 0.4), (0, "c1", 0.6), (1, "c0", 0.1), (1, "c1", 0.2)]
    ]
    report = compare_scores(active, shadow, {"l:0": "good", "l:1": "good"})
    assert report["n_views"] == 4 and report["agreement"] == 0.75
    assert (report["active_versions"], report["shadow_versions"]) == (["a"], ["b"])
    assert report["active_false_alarm_rate"] == 0.5 and report["shadow_false_alarm_rate"] == 0.0
    assert report["n_labelled_products"] == 2 and report["active_recall"] is None
