"""Starting the lines of a settings file: the one path of `defectflow run` and `defectflow demo`.

    with Lines(settings) as lines:    # connects to each line's Redis (embedded where none is named)
        lines.start(replay=False)     # every line checked against its model, then Ray and actors
        stats = lines.drain()         # until the sources end and every entry has its result

Leaving the block shuts down the Ray this process started and stops an embedded Redis it started.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import ray

from cluster.runtime.graph import (
    RunningLine,
    StageFailed,
    drain_and_stop,
    line_cpus,
    line_gpus,
    lines_resources,
    resolve_line,
    start_line,
)
from cluster.runtime.line_redis import LineRedis
from cluster.runtime.settings import LineConfig, Settings
from cluster.transport.registry import Registry
from cluster.transport.streams import reset_line
from workers.contract import ContractConflict
from workers.qa.samples import SampleStore

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """A line cannot start; the message says which and why (nothing of it has started)."""


class Lines:
    """The Redis servers, the Ray cluster and the running actors of ``settings``' lines."""

    def __init__(self, settings: Settings, on_warning: Callable[[str], None] = log.warning):
        if not settings.lines:
            raise LaunchError("no lines configured")
        self.settings = settings
        self.warn = on_warning
        self.running: list[RunningLine] = []
        self.redis = LineRedis(settings)
        self._started_ray = False

    def __enter__(self) -> Lines:
        try:
            for line in self.settings.lines:
                self.redis(line.id)  # a wrong URL or password: one clear error, before anything
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
        self.redis.close()

    def model_dir(self, line: LineConfig) -> Path:
        return Path(line.model_dir or self.settings.model_dir / line.id)

    def start(self, *, replay: bool = False, activate: bool = False) -> None:
        """Check every line against its model, then start Ray and every line's actors.

        ``replay``: the lines' streams, verdicts and samples of earlier runs are forgotten
        (recordings replayed from their start number their products from 0 again).
        ``activate``: each line inspects with its ``model_dir`` even where its registry has
        another active version (the demo's freshly trained model).
        """
        resolved = [self._resolve(line, replay, activate) for line in self.settings.lines]
        self._start_ray(sum(line_cpus(line) for line in resolved))
        # The lines share the cluster's GPUs: their default shares shrink together until all fit.
        have_gpus = ray.cluster_resources().get("GPU", 0)
        resources = lines_resources(resolved, have_gpus)
        needed = sum(line_gpus(x, r) for x, r in zip(resolved, resources, strict=True))
        if needed > have_gpus:
            self.warn(
                f"the lines' own settings ask for {needed:g} GPUs, the cluster has "
                f"{have_gpus:g}: actors that do not fit wait for a GPU node"
            )
        for line, line_resources in zip(resolved, resources, strict=True):
            try:
                running = start_line(
                    line,
                    self.redis.access(line.id),
                    self.model_dir(line),
                    self.settings.line_run(line),
                    resources=line_resources,
                    activate=activate,
                )
            except StageFailed as exc:  # its actors could not be placed or started
                raise LaunchError(str(exc)) from None
            self.running.append(running)

    def _resolve(self, line: LineConfig, replay: bool, activate: bool) -> LineConfig:
        client, model_dir = self.redis(line.id), self.model_dir(line)
        if replay:
            samples = SampleStore(self.settings.sample_dir)
            reset_line(client, line.id, [c.id for c in line.cameras], samples)
        if (activate or Registry(client, line.id).active() is None) and not (
            model_dir / "model.json"
        ).exists():
            raise LaunchError(
                f"line {line.id}: no model in {model_dir} "
                f"(train one: defectflow train DATA --out {model_dir})"
            )
        try:
            resolved, contract = resolve_line(client, line, model_dir, activate=activate)
        except (ContractConflict, StageFailed) as exc:
            raise LaunchError(f"line {line.id}: {exc}") from None
        if contract is None:
            self.warn(
                f"line {line.id}: its model states no input contract (trained before "
                "defectflow recorded one): the line's crop settings are used unchecked"
            )
        return resolved

    def _start_ray(self, cpus_needed: float) -> None:
        address = self.settings.ray_address
        if address:
            ray.init(address=address, logging_level="WARNING")
            have = ray.cluster_resources().get("CPU", 0)
            if have < cpus_needed:
                self.warn(
                    f"the lines ask for {cpus_needed:g} CPUs, the cluster has {have:g}: actors "
                    "that do not fit wait for a node (add nodes or --num-cpus)"
                )
        else:
            # Logical CPUs only schedule: a laptop runs every actor of a line, however few cores.
            cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed))
            # "local": a fresh Ray even where `ray start` left one running (plain ray.init()
            # would attach to it, and refuse num_cpus); attaching is what an address is for.
            # Its workers inherit this process's environment, Redis passwords included.
            ray.init(
                address="local", num_cpus=cpus, include_dashboard=False, logging_level="WARNING"
            )
        self._started_ray = True

    def drain(
        self, timeout_s: float = float("inf"), while_waiting: Callable[[], None] | None = None
    ) -> dict:
        """Wait until the sources have ended and every entry has its result, then stop every
        actor; the actors' counters by line. ``timeout_s=0`` stops at once (Ctrl-C)."""
        try:
            return drain_and_stop(self.running, timeout_s, while_waiting)
        except StageFailed as exc:
            raise LaunchError(str(exc)) from None
