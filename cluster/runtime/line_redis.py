"""Each line's Redis, as the settings name it: the line's own, else the top level's, else an
embedded server under ``data_dir``. Every command reaches Redis through this."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cluster.runtime.settings import Settings
from cluster.transport.connection import EmbeddedRedis, RedisAccess

if TYPE_CHECKING:  # only transport/ talks to Redis; the type is all this needs
    import redis


class LineRedis:
    """The access and a client for each line's Redis (one client per server, made on first use;
    a wrong URL or password raises ``RedisUnavailable`` then). ``close`` stops an embedded
    server this started."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lines = {line.id: line for line in settings.lines}
        self._clients: dict[RedisAccess, redis.Redis] = {}
        self._embedded: EmbeddedRedis | None = None

    def access(self, line_id: str | None = None) -> RedisAccess:
        """How to reach the Redis of ``line_id`` (a line the settings do not name, or None: the
        top level's)."""
        access = self.settings.redis_access(self._lines.get(line_id) if line_id else None)
        if access is not None:
            return access
        if self._embedded is None:
            self._embedded = EmbeddedRedis(self.settings.data_dir / "redis").start()
        return self._embedded.access

    def __call__(self, line_id: str | None = None) -> redis.Redis:
        access = self.access(line_id)
        if access not in self._clients:
            self._clients[access] = access.connect()
        return self._clients[access]

    def close(self) -> None:
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None

    def __enter__(self) -> LineRedis:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
