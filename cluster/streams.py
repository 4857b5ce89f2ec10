"""Names of a line's streams, groups and keys: one place, so every stage agrees."""

from __future__ import annotations

from dataclasses import dataclass

from workers.samples import SampleStore


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
    def shadow_scores(self) -> str:
        """Scores of the shadow (candidate) model, beside the active one's."""
        return f"shadow-scores:{self.line}"

    @property
    def retrain_requests(self) -> str:
        return f"retrain-requests:{self.line}"

    @property
    def model_events(self) -> str:
        """What the trainer did: each retraining's candidate, judgement and promotion."""
        return f"model-events:{self.line}"

    @property
    def retrain_used(self) -> str:
        """Set of products whose views a promoted model has learned (never learned twice)."""
        return f"retrain-used:{self.line}"

    @property
    def retrain_pending(self) -> str:
        """Good views labelled since the last retraining."""
        return f"retrain-pending:{self.line}"

    @property
    def label_index(self) -> str:
        """Hash: ``product_id`` or ``product_id/camera`` -> the label QA gave it."""
        return f"labels-latest:{self.line}"

    @property
    def done(self) -> str:
        """Set of product sequence numbers that already have their verdict."""
        return f"verdicts-done:{self.line}"

    detect_group = "detect"
    score_group = "score"
    aggregate_group = "aggregate"


def line_groups(streams: Streams, cameras: list[str]) -> list[tuple[str, str]]:
    """Every (stream, consumer group) pair that carries a line's work, in stage order."""
    pairs = [(streams.frames(c), streams.detect_group) for c in cameras]
    return pairs + [
        (streams.views, streams.score_group),
        (streams.scores, streams.aggregate_group),
    ]


def reset_line(client, line: str, cameras: list[str], samples: SampleStore | None = None) -> None:
    """Forget a previous run of a replayed line: its product numbers start again at 0.

    Its labels and stored samples go too: they would name the new run's products.
    """
    s = Streams(line)
    client.delete(
        *[s.frames(c) for c in cameras],
        s.views,
        s.scores,
        s.verdicts,
        s.done,
        s.labels,
        s.label_index,
        s.shadow_scores,
        s.retrain_used,
        s.retrain_pending,
        s.retrain_requests,
    )
    if samples is not None:
        samples.forget_line(line)
