"""Names of a line's streams, groups and keys: one place, so every stage agrees."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Streams:
    line: str

    def frames(self, camera: str) -> str:
        return f"frames:{self.line}:{camera}"

    @property
    def views(self) -> str:
        return f"views:{self.line}"

    @property
    def scores(self) -> str:
        return f"scores:{self.line}"

    @property
    def verdicts(self) -> str:
        return f"verdicts:{self.line}"

    @property
    def labels(self) -> str:
        return f"labels:{self.line}"

    @property
    def done(self) -> str:
        """Set of product sequence numbers that already have their verdict."""
        return f"verdicts-done:{self.line}"

    detect_group = "detect"
    score_group = "score"
    aggregate_group = "aggregate"


def reset_line(client, line: str, cameras: list[str]) -> None:
    """Forget a previous run of a replayed line: its product numbers start again at 0."""
    s = Streams(line)
    client.delete(*[s.frames(c) for c in cameras], s.views, s.scores, s.verdicts, s.done)
