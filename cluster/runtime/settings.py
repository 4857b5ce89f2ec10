"""Configuration: a YAML file describing the lines, overridable by ``DEFECTFLOW_*`` variables.

Precedence, highest first: environment (``DEFECTFLOW_REDIS_URL``, ``DEFECTFLOW_RAY_ADDRESS``, ...;
nested fields with ``__``), then the YAML file, then the defaults below. Ops can thus point a
checked-in line file at another Redis without editing it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from cluster.transport.bus import (
    DEFAULT_DEAD_LETTER_MAXLEN,
    DEFAULT_MAX_ENTRY_BYTES,
    LAG_COUNT_LIMIT,
)
from cluster.transport.connection import RedisAccess, line_password_env, split_credentials
from schemas import RegionDetail
from workers.contract import BoxSource, CropSpec, InputContract, MaskShape, Runtime, resolve_crops
from workers.frontend.sources import is_live, shown
from workers.images import DEFAULT_MAX_PIXELS, MAX_PIXELS_LIMIT

Name = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# How a camera counts its products (``workers.frontend.tracking``).
Trigger = Literal["motion", "tracking"]

# Weights files run code as they load: a line uses one only with the sha256 recorded for it.
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


def _require_sha256(path: Path | None, sha256: str | None, field: str) -> None:
    if path is not None and sha256 is None:
        raise ValueError(
            f"{field} needs {field}_sha256, the file's sha256 (`sha256sum {path}`): weights run "
            "code as they load, so only the file recorded is used"
        )


class CameraConfig(_Strict):
    """One camera of a line."""

    id: Name = Field(description="letters, digits, - and _; unique in its line")
    source: str = Field(
        min_length=1,
        description="video file, folder of frames, or live stream URL (rtsp://, http://); "
        "`defectflow simulate` records a simulated line's videos",
    )
    fps: float | None = Field(
        default=None,
        gt=0,
        le=1000,
        description="replay a recording (file or folder) at this rate, as its camera filmed it; "
        "a live stream comes at its own",
    )
    frame_stride: int = Field(
        default=1,
        ge=1,
        le=30,
        description="the motion gate sees every n-th frame, the rest are skipped (undecoded for "
        "MJPEG and folders): for a camera faster than the products need",
    )
    matting_model: Path | None = Field(
        default=None, description="TorchScript background-matting model (BGMv2-style); optional"
    )
    matting_model_sha256: Sha256 | None = Field(
        default=None, description="the matting model file's sha256 (`sha256sum FILE`): required"
    )
    background: Path | None = Field(
        default=None, description="image of the empty belt; default: learned from the video"
    )

    @model_validator(mode="after")
    def _matting_model_recorded(self) -> CameraConfig:
        _require_sha256(self.matting_model, self.matting_model_sha256, "matting_model")
        return self

    @model_validator(mode="after")
    def _fps_paces_recordings_only(self) -> CameraConfig:
        if self.fps is not None and is_live(self.source):
            raise ValueError(
                f"fps paces the replay of a recording; {shown(self.source)} is a live stream, "
                "which comes at its own rate: leave fps out"
            )
        return self


class ReplicaConfig(_Strict):
    """How many actors of each stage a line runs (the cameras have one each)."""

    detect: int = Field(default=1, ge=1, le=256, description="detect + matte actors")
    score: int = Field(default=1, ge=1, le=256, description="scorers (one per core on CPUs)")


class RetrainConfig(_Strict):
    """When and how a line's trainer learns from QA's labels."""

    enabled: bool = Field(default=True, description="run a trainer for the line")
    after_good_views: int = Field(default=100, ge=1, description="new good views that trigger it")
    mode: Literal["finetune", "scratch"] = Field(
        default="finetune", description="from the active model, or afresh"
    )
    epochs: int | None = Field(default=None, ge=1, le=1000, description="default 10 / 40 by mode")
    holdout: float = Field(
        default=0.2, ge=0.05, le=0.5, description="labelled good products kept for validation"
    )
    auto_promote: bool = Field(default=True, description="activate a candidate that passes")


class ResourceConfig(_Strict):
    """Ray resources per actor of the line. Unset GPU shares follow the cluster: where it has
    GPUs, a scorer takes half of one, a YOLO detect+matte a quarter, a camera that runs a network
    (matting, or YOLO to track products) a quarter, the trainer a whole one, all shrunk alike
    where the lines would not fit."""

    ingest_cpus: float | None = Field(default=None, gt=0, le=64, description="per camera [0.25]")
    ingest_gpus: float | None = Field(
        default=None, ge=0, le=8, description="per camera with a matting network or tracking"
    )
    detect_cpus: float | None = Field(default=None, gt=0, le=64, description="per detector [0.5]")
    detect_gpus: float | None = Field(default=None, ge=0, le=8, description="per YOLO detector")
    score_cpus: float | None = Field(default=None, gt=0, le=64, description="per scorer [1]")
    score_gpus: float | None = Field(default=None, ge=0, le=8, description="per scorer")
    train_gpus: float | None = Field(default=None, ge=0, le=8, description="the trainer's")

    @field_validator("ingest_gpus", "detect_gpus", "score_gpus", "train_gpus")
    @classmethod
    def _whole_above_one(cls, v: float | None) -> float | None:
        # Ray gives an actor part of one GPU or whole GPUs: it refuses 1.5 only when the actor
        # is started; the config says so at once.
        if v is not None and v > 1 and not float(v).is_integer():
            raise ValueError(f"a GPU share above 1 must be a whole number of GPUs, got {v}")
        return v


class LineConfig(_Strict):
    """One inspection line: its cameras, its model, how its stages run."""

    id: Name = Field(description="letters, digits, - and _; every Redis key of the line has it")
    cameras: list[CameraConfig] = Field(min_length=1, description="at least one")
    replicas: ReplicaConfig = Field(default_factory=ReplicaConfig, description="see below")
    model_dir: Path | None = Field(default=None, description="defaults to <model_dir>/<line id>")
    target_tpr: float = Field(
        default=0.85, gt=0.0, le=1.0, description="recall the trainer's threshold rule keeps"
    )
    threshold: float | None = Field(default=None, description="overrides the model's threshold")
    regions: RegionDetail = Field(
        default="outlines",
        description="where a defective view's defect is, in its score and verdict: `outlines` "
        "(boxes and polygons, schema version 3), `boxes` (version 2, for consumers not yet "
        "reading version 3) or `off` (no defect maps drawn in the line)",
    )
    view_timeout_s: float = Field(
        default=10.0, gt=0, le=3600, description="a product missing a view this long: incomplete"
    )
    max_camera_spread_s: float | None = Field(
        default=None,
        gt=0,
        le=60,
        description="a view captured further than this from its product's other views belongs "
        "to another product: its camera is re-synchronised by capture time, or the view left "
        "out and named; set it under half the time between two products, for live cameras or "
        "paced replays",
    )
    max_backlog_products: int = Field(
        default=500,
        ge=1,
        description="products waiting for detection at a camera, or for the scorers, beyond "
        "which the products seen next are shed whole (each gets an incomplete verdict)",
    )
    keep_processed_images_s: float = Field(
        default=300.0,
        ge=0,
        le=7 * 24 * 3600,
        description="frames and views stay in Redis this long once processed (QA's copies are "
        "in the sample store)",
    )
    # How the front end cuts crops: by default as the line's model learned them (its input
    # contract, workers/contract.py); a value set here must agree with the model's.
    box_margin: float | None = Field(
        default=None,
        ge=0.0,
        le=0.5,
        description="crop: the box grows by this share per side [default: the model's input "
        "contract, else 0.05]",
    )
    mask_shrink: float | None = Field(
        default=None,
        ge=0.0,
        lt=0.5,
        description="matting: the mask is cut by this share per side [the model's, else 0.1]",
    )
    mask_shape: MaskShape | None = Field(
        default=None,
        description="matting: the product's mask is its silhouette, the silhouette's convex hull "
        "(convex products) or the whole detected box (rectangular products) [the model's, else "
        "silhouette]",
    )
    view_max_side: int | None = Field(
        default=None,
        ge=32,
        le=4096,
        description="views are scaled down to this many pixels on their longer side [the "
        "model's, else 320]",
    )
    detector: BoxSource | None = Field(
        default=None,
        description="what finds the product in a gated frame: `contour` (the largest foreground "
        "region) or `yolo` (needs `yolo_weights`) [yolo where yolo_weights are given]",
    )
    yolo_weights: Path | None = Field(
        default=None,
        description="Ultralytics weights (`defectflow detector bootstrap` trains them)",
    )
    trigger: Trigger | None = Field(
        default=None,
        description="what counts the products: `motion` (one per foreground blob crossing the "
        "view's centre: cheap, but products that touch count as one) or `tracking` (the YOLO "
        "detector on every frame with motion, each product tracked across the centre: products "
        "that touch count apart; about 13 ms per such frame and camera on a CPU, a GPU share "
        "per camera where the cluster has GPUs) [tracking where the detector is yolo]",
    )
    yolo_weights_sha256: Sha256 | None = Field(
        default=None,
        description="the YOLO weights file's sha256 (`defectflow detector bootstrap` prints it): "
        "required",
    )
    redis_url: str | None = Field(
        default=None,
        description="this line's own Redis (redis://, rediss://, unix://) [default: the top "
        "level's]",
    )
    redis_username: str | None = Field(default=None, description="ACL user on the line's Redis")
    redis_password_file: Path | None = Field(
        default=None, description="file holding the password of the line's Redis"
    )
    retrain: RetrainConfig = Field(default_factory=RetrainConfig, description="see below")
    resources: ResourceConfig = Field(default_factory=ResourceConfig, description="see below")

    @model_validator(mode="after")
    def _unique_cameras(self):
        ids = [c.id for c in self.cameras]
        if len(set(ids)) != len(ids):
            raise ValueError(f"camera ids must be unique, got {ids}")
        return self

    @model_validator(mode="after")
    def _yolo_weights_recorded(self):
        _require_sha256(self.yolo_weights, self.yolo_weights_sha256, "yolo_weights")
        if self.detector == "yolo" and self.yolo_weights is None:
            raise ValueError(
                "detector: yolo needs yolo_weights (and yolo_weights_sha256): `defectflow "
                "detector bootstrap` trains them"
            )
        if self.detector == "contour" and self.yolo_weights is not None:
            raise ValueError("yolo_weights are given but detector is contour: leave one out")
        if self.trigger == "tracking" and self.box_source != "yolo":
            raise ValueError(
                "trigger: tracking needs the yolo detector (yolo_weights): contours do not "
                "tell touching products apart"
            )
        return self

    @model_validator(mode="after")
    def _countable_backlog(self):
        # The bus counts a backlog up to LAG_COUNT_LIMIT entries: a limit at or above it would
        # never be reached, and nothing ever shed.
        if self.max_backlog_products * len(self.cameras) >= LAG_COUNT_LIMIT:
            raise ValueError(
                f"max_backlog_products x cameras must stay under {LAG_COUNT_LIMIT:,}, got "
                f"{self.max_backlog_products} x {len(self.cameras)}"
            )
        return self

    @property
    def box_source(self) -> BoxSource:
        return self.detector or ("yolo" if self.yolo_weights else "contour")

    @property
    def triggered_by(self) -> Trigger:
        return self.trigger or ("tracking" if self.box_source == "yolo" else "motion")

    def following(self, contract: InputContract | None, model: str) -> LineConfig:
        """This line with its crop settings resolved against its model's input contract: the
        ones left out taken from the model, the ones set checked against it (a
        ``ContractConflict`` names each that differs)."""
        asked = {
            name: getattr(self, name) for name in CropSpec.model_fields if name != "box_source"
        }
        crops = resolve_crops(asked | {"box_source": self.box_source}, contract, model)
        return self.model_copy(
            update={k: v for k, v in crops.model_dump().items() if k != "box_source"}
        )

    @property
    def crops(self) -> CropSpec:
        """How this line cuts its crops (its settings resolved by :meth:`following`)."""
        values = {
            name: getattr(self, name) for name in CropSpec.model_fields if name != "box_source"
        }
        if None in values.values():
            raise RuntimeError(f"line {self.id}: crop settings not resolved against a model")
        return CropSpec(box_source=self.box_source, **values)


class SampleConfig(_Strict):
    """Where the views and verdicts of inspected products are kept for QA, and for how long."""

    dir: Path | None = Field(default=None, description="default: <data_dir>/samples")
    max_products: int | None = Field(default=100_000, ge=1, description="per line")
    max_age_h: float | None = Field(default=24 * 14, gt=0, description="hours kept")


class LineRun(_Strict):
    """What a started line's actors share beyond its config (from the top-level settings)."""

    maxlen: int = Field(default=100_000, ge=100, description="entries a stream keeps")
    max_deliveries: int = Field(
        default=5, ge=1, le=1000, description="an entry delivered more often is dead-lettered"
    )
    max_image_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=10_000, le=MAX_PIXELS_LIMIT)
    max_entry_bytes: int = Field(default=DEFAULT_MAX_ENTRY_BYTES, ge=65_536, le=512 * 2**20)
    dead_letter_maxlen: int = Field(default=DEFAULT_DEAD_LETTER_MAXLEN, ge=10)
    runtime: Runtime = "torch"
    sample_dir: Path | None = Field(default=None, description="None: no sample store")
    retention: SampleConfig = Field(default_factory=SampleConfig)
    candidates_dir: Path | None = Field(
        default=None, description="where the trainer writes candidates; None: no trainer"
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DEFECTFLOW_", env_nested_delimiter="__", extra="forbid"
    )

    redis_url: str | None = Field(
        default=None, description="redis://, rediss:// or unix:// URL; none starts an embedded one"
    )
    redis_username: str | None = Field(default=None, description="ACL user (Redis 6+)")
    redis_password: SecretStr | None = Field(
        default=None, description="better given as DEFECTFLOW_REDIS_PASSWORD or a password file"
    )
    redis_password_file: Path | None = Field(
        default=None, description="file holding the password (a container secret)"
    )
    redis_tls_ca_file: Path | None = Field(default=None, description="rediss://: CA bundle")
    redis_tls_cert_file: Path | None = Field(default=None, description="rediss://: client cert")
    redis_tls_key_file: Path | None = Field(default=None, description="rediss://: client key")
    ray_address: str | None = Field(default=None, description="none starts a local Ray")
    data_dir: Path = Field(
        default=Path(".defectflow"), description="the embedded Redis and the sample store"
    )
    model_dir: Path = Field(
        default=Path(".defectflow/models"),
        description="each line's model in <model_dir>/<line id>, its trainer's candidates beside",
    )
    stream_maxlen: int = Field(
        default=100_000, ge=100, description="entries a stream keeps at most"
    )
    max_deliveries: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="an entry delivered more often than this (it failed, or killed its actor, "
        "each time) is dead-lettered with that reason",
    )
    max_image_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS,
        ge=10_000,
        le=MAX_PIXELS_LIMIT,
        description="a frame or view whose header claims more pixels is dead-lettered undecoded",
    )
    max_entry_bytes: int = Field(
        default=DEFAULT_MAX_ENTRY_BYTES,
        ge=65_536,
        le=512 * 2**20,
        description="a stream entry larger than this is dead-lettered unread",
    )
    dead_letter_maxlen: int = Field(
        default=DEFAULT_DEAD_LETTER_MAXLEN,
        ge=10,
        description="dead letters a line keeps, newest first (whole entries, frames included, "
        "so that they can be replayed)",
    )
    runtime: Runtime = Field(
        default="torch",
        description="what runs the scorers' networks: torch, or onnx / openvino, which run each "
        "model's export (defectflow export; the trainer exports its candidates)",
    )
    samples: SampleConfig = Field(default_factory=SampleConfig, description="see below")
    lines: list[LineConfig] = Field(default_factory=list, description="see below")

    @model_validator(mode="after")
    def _unique_lines(self):
        ids = [line.id for line in self.lines]
        if len(set(ids)) != len(ids):
            raise ValueError(f"line ids must be unique, got {ids}")
        return self

    @property
    def sample_dir(self) -> Path:
        return self.samples.dir or self.data_dir / "samples"

    def line_run(self, line: LineConfig) -> LineRun:
        """What the actors of ``line`` share, its paths absolute (actors run elsewhere)."""
        return LineRun(
            maxlen=self.stream_maxlen,
            max_deliveries=self.max_deliveries,
            max_image_pixels=self.max_image_pixels,
            max_entry_bytes=self.max_entry_bytes,
            dead_letter_maxlen=self.dead_letter_maxlen,
            runtime=self.runtime,
            sample_dir=self.sample_dir.resolve(),
            retention=self.samples,
            candidates_dir=(self.model_dir / line.id / "candidates").resolve(),
        )

    def redis_access(self, line: LineConfig | None = None) -> RedisAccess | None:
        """How to reach the Redis of ``line`` (its own, else the top level's), None for the
        embedded one. A password written inline (in the URL or as ``redis_password``) is moved
        into this process's environment, where the access reads it, and where the actors of a
        local Ray started afterwards find it: it never travels as an actor's argument."""
        own = line is not None and line.redis_url is not None
        url = line.redis_url if own else self.redis_url
        if url is None:
            return None
        url, url_user, url_password = split_credentials(url)
        envs = (line_password_env(line.id),) if own else ()
        access = RedisAccess(
            url=url,
            username=url_user or (line.redis_username if own else None) or self.redis_username,
            password_file=(line.redis_password_file if own else None) or self.redis_password_file,
            password_envs=envs + (RedisAccess.model_fields["password_envs"].default),
            tls_ca_file=self.redis_tls_ca_file,
            tls_cert_file=self.redis_tls_cert_file,
            tls_key_file=self.redis_tls_key_file,
        )
        inline = url_password or (
            None if own or self.redis_password is None else self.redis_password.get_secret_value()
        )
        if inline:
            os.environ[access.password_envs[0]] = inline
        return access

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init kwargs; the environment must win over it.
        return env_settings, init_settings, file_secret_settings


def load_settings(path: Path | None = None) -> Settings:
    """Settings from ``path`` (YAML) and the environment, or a :class:`ConfigError`."""
    source = str(path) if path else "environment"
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    try:
        return Settings(**data)
    except ValidationError as exc:
        problems = "; ".join(
            f"field '{'.'.join(str(p) for p in err['loc']) or '<top>'}': {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None
