"""Continuous-learning benchmark: a lighting shift, QA labels, retraining, a live swap (JSON).

    python -m bench.learning --data ../shared/data/mtd --model demo-out/model \\
        --json bench-out/learning.json

One line runs throughout (Ray actors over the embedded Redis, the trainer among them):
1. phase A: products under new, warmer lamps are inspected by the line's model;
2. QA labels them (the simulator's truth stands in for QA): good ones good, defective ones
   defective; the bench asks the trainer to retrain (`defectflow retrain` does the same);
3. the trainer fine-tunes on the parent's cached features plus the new good views, judges the
   candidate on held-out labelled products and promotes it; the scorers swap between batches;
4. phase B: more shifted products continue the same line (product numbers go on).

``fpr_before`` / ``fpr_after``: false alarms among good products scored by the old / new
version; ``recall_*`` the same for defective products; ``views_lost``: views never scored;
``views_double_scored``: views scored twice (both must be 0).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import ray

from bench.report import emit
from cluster.demo import line_config, split_halves, train_line_model
from cluster.runtime.graph import drain_and_stop, line_cpus, start_ingest, start_line
from cluster.runtime.settings import LineRun, ReplicaConfig, RetrainConfig
from cluster.transport.bus import StreamBus
from cluster.transport.connection import EmbeddedRedis
from cluster.transport.qa import record_label
from cluster.transport.registry import Registry
from cluster.transport.streams import Streams, reset_line
from schemas import Label, RetrainOutcome, RetrainRequest, Verdict, ViewScore
from workers.qa.samples import SampleStore
from workers.simulation.simulate import LineSpec, render_line

# Warmer, brighter lamps (B, G, R gains of the whole scene).
WARM_LIGHT = (0.8, 1.0, 1.25)


def wait_verdicts(bus: StreamBus, line: str, count: int, timeout_s: float) -> list[Verdict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if bus.length(Streams(line).verdicts) >= count:
            break
        time.sleep(0.5)
    return [v for _, v in bus.read(Streams(line).verdicts, Verdict)]


def rates(products: list[tuple[bool, bool]]) -> dict:
    """(called defect, truly defective) pairs -> false-alarm rate and recall."""
    goods = [called for called, bad in products if not bad]
    bads = [called for called, bad in products if bad]
    return {
        "fpr": sum(goods) / len(goods) if goods else None,
        "recall": sum(bads) / len(bads) if bads else None,
        "n_good": len(goods),
        "n_defect": len(bads),
    }


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("bench-out/learning"))
    p.add_argument("--model", type=Path, help="the line's model (default: train one as the demo)")
    p.add_argument("--products-a", type=int, default=40, help="shifted products QA labels")
    p.add_argument("--products-b", type=int, default=40, help="shifted products after retraining")
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _line_model(args) -> Path:
    """``--model``, else a model trained as the demo trains its line's."""
    if args.model is not None:
        return args.model
    model_dir = args.out / "model"
    if not (model_dir / "model.json").exists():
        train_line_model(
            args.data, args.out, train_products=120, epochs=30, seed=args.seed, progress=_quiet
        )
    return model_dir


def _quiet(*_) -> None:
    pass


def _shifted_lines(args) -> dict[str, dict]:
    """Two simulated lines under warmer lamps: phase A (QA labels it), phase B (after)."""
    _, (test_good, test_bad) = split_halves(args.data, args.seed)
    lines = {}
    for phase, products, seed in (("a", args.products_a, 11), ("b", args.products_b, 12)):
        spec = LineSpec(
            products=products, defect_rate=0.2, seed=args.seed + seed, lighting=WARM_LIGHT
        )
        lines[phase] = render_line(test_good, test_bad, args.out / f"line-{phase}", spec)
    return lines


def _label_all(client, line: str, verdicts: list[Verdict], truth: dict[int, bool]) -> None:
    """QA labels every decided product by the simulator's truth."""
    for v in verdicts:
        label = "defect" if truth[v.product_seq] else "good"
        message = Label(line=line, product_id=v.product_id, label=label, by="bench", at=time.time())
        record_label(client, message, replace=True)


def _wait_outcome(bus: StreamBus, streams: Streams) -> RetrainOutcome | None:
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        events = bus.wait(streams.model_events, RetrainOutcome, "0", block_ms=1000)
        if events:
            return events[0][1]
    return None


def _run(args, model_dir: Path, lines: dict[str, dict]) -> dict:
    """Phase A through the line, QA's labels, a retraining on request, then phase B on the
    same running line. What happened, for the report."""
    line = line_config(args.out / "line-a", lines["a"]["cameras"], ReplicaConfig())
    line = line.model_copy(
        update={"retrain": RetrainConfig(after_good_views=10**9, epochs=args.epochs)}
    )
    phase_b = line_config(args.out / "line-b", lines["b"]["cameras"], ReplicaConfig()).cameras
    samples = SampleStore(args.out / "samples")
    with EmbeddedRedis(args.out / "redis") as server:
        client = server.access.connect()
        bus, streams = StreamBus(client), Streams(line.id)
        reset_line(client, line.id, [c.id for c in line.cameras], samples)
        client.delete(streams.models, streams.model_history, streams.model_events)
        cpus = max(2, int(line_cpus(line) + 1))
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
        try:
            run = LineRun(
                sample_dir=samples.root.resolve(),
                candidates_dir=(args.out / "candidates").resolve(),
            )
            running = start_line(line, server.access, model_dir, run, activate=True)
            before = Registry(client, line.id).active_id()
            got = wait_verdicts(bus, line.id, args.products_a, timeout_s=1800)
            _label_all(
                client, line.id, got, {p["seq"]: p["defective"] for p in lines["a"]["products"]}
            )
            bus.publish(
                streams.retrain_requests, RetrainRequest(line=line.id, by="bench", at=time.time())
            )
            outcome = _wait_outcome(bus, streams)
            start_ingest(running, phase_b)
            got = wait_verdicts(bus, line.id, args.products_a + args.products_b, timeout_s=1800)
            stats = drain_and_stop([running], timeout_s=600)
        finally:
            ray.shutdown()
        scores = [score for _, score in bus.read(streams.scores, ViewScore)]
    swaps = sum(s.get("model_swaps", 0) for s in stats[line.id]["score"])
    return {"before": before, "outcome": outcome, "verdicts": got, "scores": scores, "swaps": swaps}


def main(argv: list[str] | None = None) -> dict:
    args = _arguments(argv)
    model_dir = _line_model(args)
    lines = _shifted_lines(args)
    ran = _run(args, model_dir, lines)
    return emit(_report(args, lines, ran), args.json)


def _report(args, lines: dict[str, dict], ran: dict) -> dict:
    outcome, got, scores, before = ran["outcome"], ran["verdicts"], ran["scores"], ran["before"]
    truth = {p["seq"]: p["defective"] for p in lines["a"]["products"]}
    truth |= {args.products_a + p["seq"]: p["defective"] for p in lines["b"]["products"]}
    by_version: dict[str, list[tuple[bool, bool]]] = {}
    versions_of = {}
    for s in scores:
        versions_of.setdefault(s.product_seq, set()).add(s.model_version)
    for v in got:
        [version] = (
            versions_of[v.product_seq] if len(versions_of[v.product_seq]) == 1 else ["mixed"]
        )
        by_version.setdefault(version, []).append((v.decision == "defect", truth[v.product_seq]))
    views = [(s.product_id, s.camera) for s in scores]
    expected = 4 * (args.products_a + args.products_b)
    after = outcome.candidate if outcome and outcome.outcome == "promoted" else None
    old, new = rates(by_version.get(before, [])), rates(by_version.get(after, []))
    return {
        "data": str(args.data),
        "lighting_bgr_gain": WARM_LIGHT,
        "products_a": args.products_a,
        "products_b": args.products_b,
        "verdicts": len(got),
        "retrain_outcome": outcome.outcome if outcome else "no outcome",
        "retrain_why": outcome.why if outcome else None,
        "retrain_seconds": outcome.retrain_seconds if outcome else None,
        "n_new_good_views": outcome.n_new_good_views if outcome else None,
        "n_validation_products": outcome.n_validation if outcome else None,
        "candidate_metrics": outcome.candidate_metrics if outcome else None,
        "active_metrics_on_validation": outcome.active_metrics if outcome else None,
        "model_before": before,
        "model_after": after,
        "fpr_before": old["fpr"],
        "fpr_after": new["fpr"],
        "recall_before": old["recall"],
        "recall_after": new["recall"],
        "products_scored_before": old["n_good"] + old["n_defect"],
        "products_scored_after": new["n_good"] + new["n_defect"],
        "products_scored_by_both": len(by_version.get("mixed", [])),
        "views_expected": expected,
        "views_lost": expected - len(set(views)),
        "views_double_scored": len(views) - len(set(views)),
        "model_swaps": ran["swaps"],
    }


if __name__ == "__main__":
    main()
