"""The model registry of a line: versions in Redis, model folders on disk.

    models:{line}          hash: version id -> ModelVersion (JSON)
    model-active:{line}    the id scorers use; they check it between batches
    model-shadow:{line}    optional candidate id scored beside the active one (shadow mode)
    model-history:{line}   list: ids that were active before, newest first (for rollback)

(the braces are literal: the line is each key's Redis Cluster hash tag, see ``Streams``.)

A version id is the first 16 hex digits of its weights' sha256 (the version every view score
names). Activating a version first checks its files (sha256) and its input contract against
the crops the running line's front end cuts (``crops:{line}``, written when the line starts,
removed when it stops); a failing one is refused and the active version stays active.
"""

from __future__ import annotations

import time
from pathlib import Path

import redis

from cluster.transport.streams import Streams
from schemas import ModelVersion
from workers.contract import ContractConflict, CropSpec, InputContract, resolve_crops
from workers.differnet.store import ModelError, check_model


class RegistryError(ValueError):
    """A registry operation that cannot be done; the active version is unchanged."""


class Registry:
    def __init__(self, client: redis.Redis, line: str):
        self.client = client
        self.line = line
        streams = Streams(line)
        self.versions_key = streams.models
        self.active_key = streams.model_active
        self.shadow_key = streams.model_shadow
        self.history_key = streams.model_history
        self.crops_key = streams.crops

    # -- reading ---------------------------------------------------------------------------

    def versions(self) -> list[ModelVersion]:
        """Every version, oldest first."""
        raw = self.client.hvals(self.versions_key)
        return sorted((ModelVersion.model_validate_json(v) for v in raw), key=lambda m: m.created)

    def get(self, version_id: str) -> ModelVersion:
        raw = self.client.hget(self.versions_key, version_id)
        if raw is None:
            raise RegistryError(f"line {self.line}: no model version {version_id!r}")
        return ModelVersion.model_validate_json(raw)

    def active_id(self) -> str | None:
        raw = self.client.get(self.active_key)
        return raw.decode() if raw else None

    def active(self) -> ModelVersion | None:
        version_id = self.active_id()
        return self.get(version_id) if version_id else None

    def shadow_id(self) -> str | None:
        raw = self.client.get(self.shadow_key)
        return raw.decode() if raw else None

    # -- writing ---------------------------------------------------------------------------

    def register(self, model_dir: Path, parent: str | None = None) -> ModelVersion:
        """Add the model in ``model_dir`` as a candidate (idempotent for the same weights)."""
        model_dir = Path(model_dir).resolve()
        try:
            metadata, _, _ = check_model(model_dir)
        except ModelError as exc:
            raise RegistryError(str(exc)) from None
        version_id = metadata["sha256"][:16]
        existing = self.client.hget(self.versions_key, version_id)
        if existing is not None:
            return ModelVersion.model_validate_json(existing)
        version = ModelVersion(
            id=version_id,
            path=str(model_dir),
            sha256=metadata["sha256"],
            metrics={
                k: float(v)
                for k, v in (metadata.get("metrics") or {}).items()
                if isinstance(v, int | float)
            },
            threshold=float(metadata["threshold"]),
            created=time.time(),
            status="candidate",
            parent=parent or metadata.get("parent"),
        )
        self.client.hset(self.versions_key, version_id, version.model_dump_json())
        return version

    def line_crops(self) -> CropSpec | None:
        """How the line's front end cuts crops, as its last start recorded it."""
        raw = self.client.get(self.crops_key)
        return CropSpec.model_validate_json(raw) if raw else None

    def set_line_crops(self, crops: CropSpec | None) -> None:
        """Record how the running line cuts crops (None: the line stopped, nothing to check)."""
        if crops is None:
            self.client.delete(self.crops_key)
        else:
            self.client.set(self.crops_key, crops.model_dump_json())

    def check(self, version: ModelVersion) -> None:
        """Refuse (:class:`RegistryError`) a version whose files fail their sha256 check, or
        that learned from crops other than those the line cuts. (A model from before input
        contracts states none and is taken as it is.)"""
        try:
            metadata, _, _ = check_model(Path(version.path))
            if metadata["sha256"] != version.sha256:
                raise ModelError(
                    f"{version.path} now holds weights {metadata['sha256'][:16]}, not the "
                    f"registered {version.sha256[:16]}: the folder was replaced"
                )
            contract = InputContract.of(metadata)
            crops = self.line_crops()
            if crops is not None and contract is not None:
                resolve_crops(crops.model_dump(), contract, version.id)
        except (ModelError, ContractConflict) as exc:
            raise RegistryError(
                f"version {version.id} refused for line {self.line}: {exc}"
            ) from None

    def promote(self, version_id: str) -> ModelVersion:
        """Make ``version_id`` the active version; the one it replaces is retired."""
        version = self.get(version_id)
        self.check(version)
        previous = self.active_id()
        if previous == version_id:
            return version
        pipe = self.client.pipeline(transaction=True)
        if previous is not None:
            old = self.get(previous).model_copy(update={"status": "retired"})
            pipe.hset(self.versions_key, previous, old.model_dump_json())
            # Each version once, most recently left first: the transaction, run again after a
            # lost connection, leaves the history as it was.
            pipe.lrem(self.history_key, 0, previous)
            pipe.lpush(self.history_key, previous)
        active = version.model_copy(update={"status": "active"})
        pipe.hset(self.versions_key, version_id, active.model_dump_json())
        pipe.set(self.active_key, version_id)
        if self.shadow_id() == version_id:
            pipe.delete(self.shadow_key)
        pipe.execute()
        return active

    def rollback(self) -> ModelVersion:
        """Go back to the version that was active before the current one."""
        current = self.active_id()
        for previous in [v.decode() for v in self.client.lrange(self.history_key, 0, -1)]:
            if previous == current:
                continue
            version = self.promote(previous)
            # promote pushed the version we left; drop it and the entry we came back to.
            self.client.lrem(self.history_key, 1, current)
            self.client.lrem(self.history_key, 1, previous)
            return version
        raise RegistryError(f"line {self.line}: no earlier version to roll back to")

    def set_shadow(self, version_id: str | None) -> None:
        """Score ``version_id`` beside the active version (None stops shadow scoring)."""
        if version_id is None:
            self.client.delete(self.shadow_key)
            return
        version = self.get(version_id)
        if version_id == self.active_id():
            raise RegistryError(f"version {version_id} is already active")
        self.check(version)
        self.client.set(self.shadow_key, version_id)

    def ensure_active(self, model_dir: Path) -> ModelVersion:
        """The active version; a line starting for the first time activates ``model_dir``."""
        active = self.active()
        if active is not None:
            return active
        return self.promote(self.register(model_dir).id)
