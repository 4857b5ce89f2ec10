"""Prometheus metrics through Ray's metrics API.

Every Ray node serves the metrics of the actors on it at ``http://NODE:<metrics-export-port>/
metrics`` (names get Ray's ``ray_`` prefix; counters a ``_total`` suffix). Metric objects are
made inside the actors: Ray's metrics need a worker process. docs/operations.md lists them;
deploy/grafana/defectflow.json charts them.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

# Seconds: a stage takes milliseconds; frame to verdict, seconds (minutes under a backlog).
LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300]


def count_new(counter: Counter, total: int, counted: dict, key: str, tags: dict) -> None:
    """Add to ``counter`` what ``total`` (a running count kept elsewhere) gained since the last
    call for ``key``: Ray's counters take positive increments only."""
    new = total - counted.get(key, 0)
    if new > 0:
        counter.inc(new, tags)
        counted[key] = total


class LineMetrics:
    """The metrics of one line, tagged with its id (and camera, stage, ... where they apply)."""

    def __init__(self, line: str):
        self.frames_in = Counter(
            "defectflow_frames_in", "Frames read from the cameras", tag_keys=("line", "camera")
        )
        self.views = Counter("defectflow_views", "Product views matted", tag_keys=("line",))
        self.views_scored = Counter(
            "defectflow_views_scored", "Views scored", tag_keys=("line", "model_version")
        )
        self.verdicts = Counter(
            "defectflow_verdicts", "Verdicts published", tag_keys=("line", "status", "decision")
        )
        self.defects = Counter("defectflow_defects", "Defective products", tag_keys=("line",))
        self.shed = Counter(
            "defectflow_shed",
            "Products shed at ingest: the line too far behind",
            tag_keys=("line",),
        )
        self.camera_reconnects = Counter(
            "defectflow_camera_reconnects",
            "Times a live camera stream dropped and was reopened",
            tag_keys=("line", "camera"),
        )
        self.camera_resyncs = Counter(
            "defectflow_camera_resyncs",
            "Times the aggregator re-synchronised a camera's product numbers by capture time",
            tag_keys=("line", "camera"),
        )
        self.dead_letters = Counter(
            "defectflow_dead_letters",
            "Entries moved to the dead letters",
            tag_keys=("line", "stage"),
        )
        self.incidents = Counter(
            "defectflow_incidents",
            "What the line survived and counted: corrupt_frame, late_or_duplicate_view, "
            "model_refused",
            tag_keys=("line", "kind"),
        )
        self.stage_seconds = Histogram(
            "defectflow_stage_seconds",
            "Time per view in a stage; frame_to_verdict: camera frame to published verdict",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("line", "stage"),
        )
        self.stream_lag = Gauge(
            "defectflow_stream_lag",
            "Entries of a stream its consumer group has not handled yet",
            tag_keys=("line", "stream", "group"),
        )
        self.unread_trimmed = Counter(
            "defectflow_unread_trimmed",
            "Entries a stream's maxlen trimmed before its consumer group acknowledged them",
            tag_keys=("line", "stream", "group"),
        )
        self.active_model = Gauge(
            "defectflow_active_model",
            "1 for the line's active model version",
            tag_keys=("line", "version"),
        )
        # Every series carries its line, whether or not the caller names it.
        for metric in vars(self).values():
            metric.set_default_tags({"line": line})
