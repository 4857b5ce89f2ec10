"""Fault injection: one line inspecting a few hundred products while every fault it is built to
survive is injected; prints JSON.

    python -m bench.chaos --data ../shared/data/mtd --json bench-out/chaos.json \
        [--model demo-out/model]

Once verdicts flow, one fault after another: poison entries of every kind the stages refuse,
SIGKILL of each actor kind (Ray restarts it), SIGKILL of Redis (restarted from its AOF), and
detection stopped (SIGSTOP) until the cameras shed products. Reported: products in, verdicts
out, products without a verdict and duplicate verdicts (both must be 0), poison entries
dead-lettered with their reason (all must be), products shed and counted, and per fault the
seconds until the killed part answered again and until the line's next verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import ray

from bench.report import emit
from cluster.demo import line_config, simulate_test_line, train_line_model
from cluster.runtime.graph import (
    LineResources,
    RunningLine,
    backlog,
    drain_and_stop,
    line_cpus,
    sources_done,
    start_line,
)
from cluster.runtime.settings import LineConfig, LineRun, ReplicaConfig
from cluster.transport.bus import DL_ENTRY, DL_REASON, DL_STREAM, StreamBus
from cluster.transport.connection import EmbeddedRedis
from cluster.transport.streams import Streams, reset_line
from schemas import BBox, CameraFrame, ProductView, Verdict

ACTOR_FAULTS = ("kill-camera", "kill-detect", "kill-score", "kill-aggregate", "kill-trainer")
# The stall early: a camera killed later loses its own count of what it shed (Redis keeps it).
FAULTS = ("poison", "stall-detect", *ACTOR_FAULTS, "kill-redis")
# The chaos line refuses entries over this many bytes: a poison entry just above it is cheap.
MAX_ENTRY_BYTES = 4 * 2**20


@dataclass(frozen=True)
class Poison:
    kind: str
    stream: str
    fields: dict[bytes, bytes]


def png_claiming(width: int, height: int) -> bytes:
    """A few bytes of PNG whose header claims ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


def poison_entries(line: LineConfig, seq: int, frame_hw: tuple[int, int]) -> list[Poison]:
    """One entry of each kind a stage must refuse, for a product the line already numbered (so
    they add no product): each must end in the dead letters with its reason."""
    s, camera = Streams(line.id), line.cameras[0].id
    h, w = frame_hw
    noise = np.random.default_rng(seq).integers(0, 255, (h, w, 3), np.uint8)
    jpeg = cv2.imencode(".jpg", noise)[1].tobytes()
    frame = CameraFrame(
        line=line.id,
        camera=camera,
        sequence=0,
        product_seq=seq,
        timestamp=time.time(),
        codec="jpeg",
        shape=(h, w, 3),
        image=jpeg,
        mask=cv2.imencode(".png", np.zeros((h, w), np.uint8))[1].tobytes(),
    )
    entry = frame.to_entry()
    meta = json.loads(entry[b"meta"])
    view = ProductView(
        product_id=f"{line.id}:{seq}",
        line=line.id,
        camera=camera,
        product_seq=seq,
        captured_at=time.time(),
        codec="png",
        shape=(32, 32, 4),
        image=b"\x89PNG not really",
        bbox=BBox(x=0, y=0, w=32, h=32),
        mask_coverage=0.5,
        mask_shrink=0.1,
    )
    bad_meta = {b"v": b"1", b"meta": b"{not json"}
    frames = s.frames(camera)
    return [
        Poison("malformed frame", frames, {b"kind": b"frame"} | bad_meta),
        Poison(
            "product number past 2^30",
            frames,
            entry | {b"meta": json.dumps(meta | {"product_seq": 2**32}).encode()},
        ),
        Poison("corrupt image", frames, entry | {b"image": jpeg[: len(jpeg) // 3]}),
        Poison(
            "decompression bomb",
            frames,
            entry
            | {
                b"image": png_claiming(40_000, 40_000),
                b"meta": json.dumps(meta | {"codec": "png", "shape": [40_000, 40_000, 1]}).encode(),
            },
        ),
        Poison("entry over max_entry_bytes", frames, entry | {b"image": bytes(MAX_ENTRY_BYTES)}),
        Poison("undecodable view", s.views, view.to_entry()),
        Poison("malformed score", s.scores, {b"kind": b"score"} | bad_meta),
        Poison("malformed label", s.labels, {b"kind": b"label"} | bad_meta),
    ]


class Chaos:
    """The faults, against one running line and its embedded Redis."""

    def __init__(self, running: RunningLine, server: EmbeddedRedis, stall_s: float):
        self.running, self.server, self.stall_s = running, server, stall_s
        self.client = server.access.connect()
        self.streams = Streams(running.config.id)
        self.poisoned: list[tuple[Poison, str]] = []

    def verdicts(self) -> int:
        return self.client.xlen(self.streams.verdicts)

    def inject(self, fault: str) -> dict:
        """Inject ``fault``; how long until the part answered again, and the next verdict."""
        before, started = self.verdicts(), time.monotonic()
        if fault == "poison":
            answered = self._poison()
        elif fault in ACTOR_FAULTS:
            answered = self._kill(self._actor(fault))
        elif fault == "kill-redis":
            answered = self._kill_redis()
        elif fault == "stall-detect":
            answered = self._stall()
            before, started = self.verdicts(), time.monotonic()  # from the stall's end
        else:
            raise ValueError(f"unknown fault {fault!r}; choose from {', '.join(FAULTS)}")
        # None: the line had nothing left to decide (its recordings over, its backlog done).
        while self.verdicts() <= before and not self._finished():
            time.sleep(0.1)
        next_verdict = time.monotonic() - started if self.verdicts() > before else None
        return {"fault": fault, "answered_s": answered, "next_verdict_s": next_verdict}

    def _finished(self) -> bool:
        return sources_done(self.running) and backlog(self.running) == 0

    def _actor(self, fault: str):
        r = self.running
        return {
            "kill-camera": r.ingest[0],
            "kill-detect": r.detect[0],
            "kill-score": r.score[0],
            "kill-aggregate": r.aggregator,
            "kill-trainer": r.trainer,
        }[fault]

    def _kill(self, actor) -> float:
        pid = ray.get(actor.pid.remote(), timeout=60)
        started = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        while ray.get(actor.pid.remote(), timeout=300) == pid:
            time.sleep(0.1)  # the dying instance may still answer once
        return time.monotonic() - started

    def _kill_redis(self) -> float:
        pid = int(self.client.info("server")["process_id"])
        started = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        self.server.stop()  # reaps it
        self.server.start()  # from its AOF, as a supervisor would
        self.client.ping()
        return time.monotonic() - started

    def _stall(self) -> float:
        """Detection stopped (SIGSTOP) for ``stall_s``: the cameras must shed."""
        pids = ray.get([a.pid.remote() for a in self.running.detect], timeout=60)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(self.stall_s)
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        return self.stall_s

    def _poison(self) -> float:
        line = self.running.config
        newest = self.client.xrevrange(self.streams.verdicts, count=1)
        seq = Verdict.from_entry(newest[0][1]).product_seq
        h, w = self._frame_size()
        for poison in poison_entries(line, seq, (h, w)):
            entry_id = self.client.xadd(poison.stream, poison.fields).decode()
            self.poisoned.append((poison, entry_id))
        return 0.0

    def _frame_size(self) -> tuple[int, int]:
        camera = self.running.config.cameras[0].id
        frames = self.client.xrevrange(self.streams.frames(camera), count=1)
        if frames:
            shape = json.loads(frames[0][1][b"meta"])["shape"]
            return shape[0], shape[1]
        return 270, 480


def account(client, line: str, products: int, poisoned, stats: dict) -> dict:
    """What came out: a verdict per product, once; every poison entry dead-lettered."""
    s = Streams(line)
    verdicts = [v for _, v in StreamBus(client).read(s.verdicts, Verdict)]
    seen = Counter(v.product_seq for v in verdicts)
    dead = {
        (f[DL_STREAM].decode(), f[DL_ENTRY].decode()): f[DL_REASON].decode()
        for _, f in client.xrange(s.dead_letters)
    }
    shed = [v for v in verdicts if (v.reason or "").startswith("shed at ingest")]
    reasons = Counter((v.reason or "").split(":")[0] for v in verdicts if v.status != "complete")
    return {
        "products_in": products,
        "verdicts_out": len(verdicts),
        "products_without_verdict": sorted(set(range(products)) - set(seen)),
        "duplicate_verdicts": {seq: n for seq, n in seen.items() if n > 1},
        "verdicts_for_unknown_products": sorted(set(seen) - set(range(products))),
        "complete": sum(v.status == "complete" for v in verdicts),
        "incomplete_by_reason": dict(reasons),
        "poison": [
            {
                "kind": p.kind,
                "stream": p.stream,
                "dead_lettered": (p.stream, i) in dead,
                "reason": dead.get((p.stream, i)),
            }
            for p, i in poisoned
        ],
        "products_shed": len(shed),
        "products_shed_decided": client.bitcount(s.shed),
        # The cameras' own counts (the metric): a camera killed later has lost its count.
        "products_shed_counted": sum(x.get("products_shed", 0) for x in stats["ingest"]),
        "dead_letters": len(dead),
    }


def run_chaos(
    line: LineConfig,
    model_dir: Path,
    work: Path,
    products: int,
    faults: list[str],
    stall_s: float,
    settle_s: float = 5.0,
    resources: LineResources | None = None,
) -> dict:
    """``line`` run once over an embedded Redis in ``work`` with ``faults`` injected in turn
    (``resources``: the actors', default the line's)."""
    run = LineRun(
        max_entry_bytes=MAX_ENTRY_BYTES,
        sample_dir=(work / "samples").resolve(),
        candidates_dir=(work / "candidates").resolve(),
    )
    with EmbeddedRedis(work / "redis") as server:
        client = server.access.connect()
        reset_line(client, line.id, [c.id for c in line.cameras])
        running = start_line(
            line, server.access, model_dir, run, resources=resources, activate=True
        )
        chaos = Chaos(running, server, stall_s)
        deadline = time.monotonic() + 600
        while not chaos.verdicts() and time.monotonic() < deadline:
            time.sleep(0.2)
        injected = []
        for fault in faults:
            injected.append(chaos.inject(fault))
            time.sleep(settle_s)
        stats = drain_and_stop([running], timeout_s=3600)[line.id]
        return {
            "faults": injected,
            **account(client, line.id, products, chaos.poisoned, stats),
            "actors": stats,
        }


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("bench-out/chaos"))
    p.add_argument(
        "--model", type=Path, help="a line model of the demo's recipe (demo-out/model after a demo)"
    )
    p.add_argument("--products", type=int, default=200)
    p.add_argument("--train-products", type=int, default=60, help="accuracy is not measured")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--fps", type=float, default=15.0, help="the cameras' replay rate")
    p.add_argument("--stall-s", type=float, default=20.0, help="detection stopped this long")
    p.add_argument("--max-backlog-products", type=int, default=5)
    p.add_argument("--faults", default=",".join(FAULTS), help="comma-separated, in order")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = _arguments(argv)
    faults = [f for f in args.faults.split(",") if f]
    if unknown := set(faults) - set(FAULTS):
        raise SystemExit(f"unknown faults {sorted(unknown)}; choose from {', '.join(FAULTS)}")
    model_dir = args.model or args.out / "model"
    if not (model_dir / "model.json").exists():
        train_line_model(
            args.data,
            args.out,
            train_products=args.train_products,
            epochs=args.epochs,
            seed=args.seed,
            progress=lambda *a: None,
        )
    manifest = simulate_test_line(args.data, args.out, args.products, args.seed)
    line = line_config(args.out / "line-test", manifest["cameras"], ReplicaConfig(), args.fps)
    line = line.model_copy(
        update={"max_backlog_products": args.max_backlog_products, "view_timeout_s": 60.0}
    )
    ray.init(
        address="local",
        num_cpus=max(2, int(line_cpus(line) + 1)),
        include_dashboard=False,
        logging_level="WARNING",
    )
    started = time.time()
    try:
        report = run_chaos(
            line, model_dir, args.out, len(manifest["products"]), faults, args.stall_s
        )
    finally:
        ray.shutdown()
    return emit(
        {
            "benchmark": "chaos",
            "data": str(args.data),
            "products": len(manifest["products"]),
            "fps": args.fps,
            "max_backlog_products": args.max_backlog_products,
            "seconds": round(time.time() - started, 1),
            **report,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
