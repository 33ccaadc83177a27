"""One validated configuration, shared by the CLI, the jobs, Tune and Serve.

A config is built from the embedded defaults, then a YAML preset (``configs/*.yaml``),
then ``--set section.key=value`` overrides, and validated once. Unknown keys and
out-of-range values are rejected with the offending key named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hotdog_ray import zoo
from hotdog_ray.errors import ConfigError
from hotdog_ray.images import MAX_PIXELS


class _Section(BaseModel):
    # extra="forbid" is what turns a typo in a preset into an error instead of a silent default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentSettings(_Section):
    """Training-split augmentation, in the terms of Keras' ImageDataGenerator used by the recipes."""

    horizontal_flip: bool = False
    vertical_flip: bool = False
    rotation: float = Field(0.0, ge=0, le=180, description="max rotation, degrees either way")
    shear: float = Field(0.0, ge=0, le=45, description="max shear, degrees either way")
    zoom: float = Field(0.0, ge=0, lt=1, description="zoom in [1-zoom, 1+zoom]")
    width_shift: float = Field(0.0, ge=0, le=1, description="max horizontal shift, fraction of width")
    height_shift: float = Field(0.0, ge=0, le=1, description="max vertical shift, fraction of height")
    brightness: tuple[float, float] | None = Field(
        None, description="brightness factor range, e.g. [0.1, 0.9] as in the Food-101 recipe"
    )

    @model_validator(mode="after")
    def _check_brightness(self) -> "AugmentSettings":
        if self.brightness is not None:
            lo, hi = self.brightness
            if not 0 <= lo <= hi:
                raise ValueError("brightness must be [low, high] with 0 <= low <= high")
        return self

    @property
    def enabled(self) -> bool:
        return any(
            (
                self.horizontal_flip,
                self.vertical_flip,
                self.rotation,
                self.shear,
                self.zoom,
                self.width_shift,
                self.height_shift,
                self.brightness is not None,
            )
        )


class CacheSettings(_Section):
    """The decoded-image cache that training, validation and evaluation read (``hotdog cache``)."""

    root: str | None = Field(
        None, description="folder of the caches: local path or s3:// URI (None: <train.storage_path>/cache)"
    )
    device_share: float = Field(
        0.5, ge=0, le=0.95, description="a GPU worker holds its shard in GPU memory up to this share of it"
    )
    host_share: float = Field(
        0.25,
        ge=0,
        le=0.95,
        description="else in host memory up to this share of the node's RAM; a larger shard streams "
        "from the cache files every epoch",
    )
    shard_images: int = Field(2048, ge=1, le=1_000_000, description="images per cache file")


class DataSettings(_Section):
    """Where the images are and how they become tensors."""

    root: str = Field("data/sample", description="dataset root: local path, file://, s3:// or gs:// URI")
    image_size: int = Field(32, ge=8, le=1024, description="square side the images are resized to")
    rescale: Literal["unit", "symmetric"] = Field(
        "unit", description="unit: x/255 in [0, 1]; symmetric: x/127.5-1 in [-1, 1]"
    )
    classes: list[str] | None = Field(None, description="use only these classes (default: all)")
    max_classes: int | None = Field(
        None, ge=2, description="use the first N classes in sorted order (the Food-101 recipe uses 10)"
    )
    augment: AugmentSettings = Field(default_factory=AugmentSettings)
    files_per_task: int = Field(
        256, ge=1, le=100_000, description="images per Ray Data read task (small tasks cost more to schedule)"
    )
    max_image_pixels: int = Field(
        MAX_PIXELS, ge=1, description="larger images are rejected as decompression bombs"
    )
    cache: CacheSettings = Field(default_factory=CacheSettings)

    @model_validator(mode="after")
    def _one_subset(self) -> "DataSettings":
        if self.classes is not None and self.max_classes is not None:
            raise ValueError("set data.classes or data.max_classes, not both")
        if self.classes is not None and len(set(self.classes)) < 2:
            raise ValueError("data.classes needs at least two distinct classes")
        return self


class ModelSettings(_Section):
    """Which architecture to build and its searchable width and dropout.

    Widths mean one thing per family (``hotdog models`` lists which key each model takes): the
    recipe CNNs' convolution width is ``filters``; the transfer models keep their backbone and take
    the width of their new dense head as ``head_units``.
    """

    name: str = Field("first_cnn", description="a model of the zoo (`hotdog models`)")
    filters: int | None = Field(
        None, ge=1, le=4096, description="recipe CNNs: base convolution width (None: the recipe's)"
    )
    head_units: int | None = Field(
        None,
        ge=1,
        le=65536,
        description="transfer models: units of the head's first dense layer (None: the recipe's)",
    )
    dropout: float | None = Field(
        None, ge=0, lt=1, description="dropout before the dense layer(s) (None: the recipe's)"
    )
    conv_dropout: float | None = Field(
        None, ge=0, lt=1, description="recipe CNNs: dropout after the convolution blocks (None: the recipe's)"
    )
    pretrained_weights: str | None = Field(
        None, description="transfer learning: 'torchvision' (download) or a local/S3 state-dict file"
    )
    unfreeze_top: bool = Field(False, description="transfer learning: also train the backbone's top block")

    @model_validator(mode="after")
    def _known(self) -> "ModelSettings":
        zoo.check_settings(
            self.name, filters=self.filters, head_units=self.head_units, conv_dropout=self.conv_dropout
        )
        return self

    @property
    def width_key(self) -> str:
        """The config key of this model's searchable width (``filters`` or ``head_units``)."""
        return zoo.entry(self.name).width_key


class TrainSettings(_Section):
    """Ray Train settings; defaults run on a 2-core laptop."""

    num_workers: int | tuple[int, int] = Field(
        1,
        description="0 runs the loop in the driver; [min, max] trains elastically: Ray Train starts with as "
        "many workers as fit, keeps going on at least min when nodes go, and grows back towards max",
    )
    elastic_resize_interval_s: float = Field(
        60.0, gt=0, description="with a [min, max] range: how often a running group checks for room to grow"
    )
    use_gpu: bool = False
    cpus_per_worker: float = Field(
        1.0, gt=0, description="leave CPUs for Ray Data ingest: 2 workers x 1 CPU on 2 cores hang"
    )
    gpus_per_worker: float = Field(1.0, gt=0, description="below 1: workers share GPUs")
    placement_strategy: Literal["PACK", "SPREAD"] = Field(
        "PACK",
        description="PACK: workers on as few nodes as fit (less network); SPREAD: one per node where possible "
        "(a lost node takes fewer workers with it)",
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto",
        description="torch.distributed backend; auto: nccl when every worker has a whole GPU, else gloo "
        "(NCCL refuses two ranks on one GPU)",
    )
    batch_size: int = Field(64, ge=1, le=65536, description="global batch, split across workers")
    epochs: int = Field(10, ge=1, le=10000)
    optimizer: Literal["adam", "sgd", "rmsprop"] = "adam"
    learning_rate: float = Field(1e-3, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd and rmsprop")
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["none", "step", "plateau"] = Field(
        "none", description="step: multiply by lr_gamma every lr_step_epochs; plateau: when val_loss stalls"
    )
    lr_step_epochs: int = Field(10, ge=1)
    lr_gamma: float = Field(0.1, gt=0, lt=1, description="the snacks chapter divides by 10")
    lr_patience: int = Field(2, ge=0, description="plateau: epochs without improvement before a cut")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many epochs without a better val_loss (None: off)"
    )
    max_loss: float = Field(
        1e3, gt=0, description="a batch loss above this (or NaN/inf) counts as exploded and stops the run"
    )
    restore_best: bool = Field(True, description="end with the weights of the best val_loss epoch")
    num_to_keep: int = Field(2, ge=1, description="checkpoints kept, best val_loss first")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the latest checkpoint")
    mixed_precision: bool = Field(True, description="bf16 autocast on GPU (ignored on CPU)")
    channels_last: bool = Field(True, description="NHWC memory format on GPU (ignored on CPU)")
    seed: int = 42
    storage_path: str = Field("ray_results", description="checkpoints: local path or s3:// URI")
    shared_storage: bool = Field(
        False,
        description="a local storage_path is a disk every node mounts (allowed on a multi-node cluster)",
    )
    run_name: str | None = Field(None, description="rerunning a name resumes it (default: a new name)")

    @field_validator("num_workers")
    @classmethod
    def _worker_count(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        if isinstance(v, int):
            if not 0 <= v <= 1024:
                raise ValueError("must be between 0 and 1024")
            return v
        low, high = v
        if not 1 <= low <= high <= 1024:
            raise ValueError(f"a range [min, max] needs 1 <= min <= max <= 1024, got [{low}, {high}]")
        return low if low == high else (low, high)

    @property
    def min_workers(self) -> int:
        """The fewest workers the run trains on (``num_workers``, or a range's min)."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        """The most workers the run trains on (``num_workers``, or a range's max)."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        return not isinstance(self.num_workers, int)

    @model_validator(mode="after")
    def _nccl_needs_gpus(self) -> "TrainSettings":
        if self.backend == "nccl" and not self.use_gpu:
            raise ValueError("train.backend=nccl needs train.use_gpu=true (gloo runs on CPUs)")
        return self

    @property
    def dist_backend(self) -> str:
        """The torch.distributed backend this run uses (``backend``, with ``auto`` decided)."""
        if self.backend != "auto":
            return self.backend
        return "nccl" if self.use_gpu and self.gpus_per_worker >= 1 else "gloo"


class TuneSettings(_Section):
    """Ray Tune sweep: the search space around the base config, ASHA, and promotion.

    Every trial is the base config with the sampled values put in (``model.filters``,
    ``model.dropout``, ``train.learning_rate``, optionally ``train.optimizer`` and
    ``train.batch_size``) and trained by the same code as ``hotdog train``.
    """

    name: str | None = Field(None, description="sweep name; rerunning it with --resume continues it")
    num_samples: int = Field(8, ge=1, le=10000, description="trials")
    max_concurrent_trials: int = Field(2, ge=1)
    trial_mode: Literal["process", "train"] = Field(
        "process",
        description="process: a trial trains on one device in its own process, with one Train "
        "worker's resources (train.cpus_per_worker, train.gpus_per_worker); starts in seconds, best for small "
        "CNNs (bench/tune.py). train: a trial is a data-parallel Ray Train run of train.num_workers workers",
    )
    reuse_actors: bool = Field(
        True,
        description="run the next trial in the process of a finished one (Tune's reuse_actors): saves "
        "each trial the seconds of a new process importing torch (bench/tune.py)",
    )
    cpus_per_trial: float = Field(
        0.01,
        gt=0,
        description="trial_mode train: the trial's driver only; its Train workers take train.cpus_per_worker",
    )
    filters: list[int] = Field(
        default_factory=lambda: [16, 32, 64],
        min_length=1,
        description="widths to choose from: model.filters of a recipe CNN, "
        "model.head_units of a transfer model",
    )
    dropout: tuple[float, float] | None = Field(
        (0.0, 0.5), description="uniform range; None: keep the model's"
    )
    learning_rate: tuple[float, float] = Field((1e-4, 1e-2), description="log-uniform range")
    optimizers: list[Literal["adam", "sgd", "rmsprop"]] | None = Field(
        None, description="choices; None: train.optimizer"
    )
    batch_sizes: list[int] | None = Field(None, description="choices; None: train.batch_size")
    sampler: Literal["random", "optuna"] = Field(
        "random",
        description="random search, or Optuna's TPE (pip install 'hotdog-ray[optuna]'), which "
        "models the finished trials to pick the next values",
    )
    startup_trials: int = Field(3, ge=1, description="optuna: random trials before TPE takes over")
    asha: bool = Field(True, description="stop poor trials early; off runs every trial to the end (bench)")
    max_epochs: int | None = Field(None, ge=1, description="ASHA's max_t (default: train.epochs)")
    # Chosen by bench/tune.py over 5 seeds (bench/RESULTS.md): grace 1 with reduction 3 saved the most
    # (medians 0.52-0.57x the wall time of every trial to the end over four runs) and kept the best
    # trial in 4 or 5 of 5 (misses lost up to 0.0074); grace 2 kept it every time for 0.60x; reduction
    # 4 and halving each lost more than 0.005 once; two brackets differed by less than the run-to-run
    # spread; synchronous HyperBand hung on 2 cores.
    grace_period: int = Field(1, ge=1, description="epochs every trial gets before ASHA may stop it")
    reduction_factor: int = Field(3, ge=2, description="ASHA keeps the best 1/reduction_factor at each rung")
    brackets: int = Field(1, ge=1, le=8, description="ASHA brackets: more start some trials at later rungs")
    seed: int | None = Field(None, description="sampler seed (default: train.seed): same seed, same trials")
    promote: bool = Field(
        True, description="evaluate the best trial and move tracking.alias to it if it wins"
    )
    promote_metric: Literal["balanced_accuracy", "accuracy", "macro_f1"] = "balanced_accuracy"

    @field_validator("filters", "batch_sizes")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 1):
            raise ValueError("must be a non-empty list of positive integers")
        return v

    @field_validator("dropout")
    @classmethod
    def _dropout_range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 <= v[0] <= v[1] < 1:
            raise ValueError(f"dropout range must satisfy 0 <= low <= high < 1, got {list(v)}")
        return v

    @field_validator("learning_rate")
    @classmethod
    def _lr_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 10:
            raise ValueError(f"learning_rate range must satisfy 0 < low <= high <= 10, got {list(v)}")
        return v


class ServeSettings(_Section):
    """Online predictions: the Ray Serve HTTP application (``hotdog serve``, ``serving/``)."""

    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 to accept other machines")
    port: int = Field(8000, ge=1, le=65535)
    model_uri: str | None = Field(
        None,
        description="models:/<name>@<alias>, models:/<name>/<version>, runs:/<id> or a bundle folder; "
        "default: the registry's tracking.alias, else its newest version",
    )
    reload_interval_s: float = Field(
        30.0,
        ge=0,
        description="how often replicas check whether the alias moved (0: only on a user_config change)",
    )
    max_batch_size: int = Field(16, ge=1, description="dynamic batching: most images in one forward pass")
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0,
        description="dynamic batching: longest wait to fill a batch; 0 takes what queued while the previous "
        "batch ran (full batches under load, no added latency when idle)",
    )
    max_upload_bytes: int = Field(10_000_000, ge=1, description="larger request bodies get 413")
    max_images_per_request: int = Field(32, ge=1, description="POST /predict/batch limit")
    min_image_side: int = Field(8, ge=1, description="smaller images are refused")
    top_k: int = Field(5, ge=1)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16, gt=0, description="autoscaling target per replica")
    max_ongoing_requests: int = Field(64, ge=1, description="per replica; at least max_batch_size")
    cpus_per_replica: float = Field(1.0, ge=0)
    gpus_per_replica: float = Field(0.0, ge=0, description="> 0: GPU replicas (mixed precision)")
    access_log: bool = Field(True, description="a log line per request in the replicas' logs")
    haproxy: bool = Field(
        True,
        description="HTTP enters through HAProxy straight to the replicas (Ray Serve's HAProxy ingress) "
        "instead of Serve's Python proxy; applies to the Ray that `hotdog serve` starts itself (a running "
        "cluster keeps the RAY_SERVE_ENABLE_HA_PROXY it was started with)",
    )

    haproxy_threads: int | None = Field(
        None,
        ge=1,
        description="HAProxy's threads (RAY_SERVE_HAPROXY_NBTHREAD); unset: a quarter of the node's cores, "
        "at least 1 and at most Ray's default of 4 (on 2 cores, 4 threads cost HAProxy more CPU a request)",
    )
    haproxy_request_metrics: bool = Field(
        False,
        description="Ray Serve's per-request HTTP metrics from HAProxy (serve_num_http_requests and its "
        "latency; RAY_SERVE_HAPROXY_METRICS_ENABLED): HAProxy sends a log line per request that a Python "
        "process parses. Off by default: hotdog_requests_total and hotdog_request_latency_seconds count "
        "every request by endpoint and status already",
    )

    rollout: Literal["off", "shadow", "canary"] = Field(
        "off",
        description="with a challenger (hotdog promote --challenger VERSION): shadow scores every /predict "
        "request with it too, off the response path; canary answers serve.canary_fraction of them with it",
    )
    canary_fraction: float = Field(
        0.1, ge=0, le=1, description="canary: share of requests the challenger answers"
    )
    api_keys_env: str | None = Field(
        None,
        description="name of an environment variable holding one or more API keys (separated by commas or "
        "whitespace; on Kubernetes from a Secret): /predict, /predict/batch and /explain then require "
        "`Authorization: Bearer <key>`; unset: open (logged once)",
    )
    throughput_optimized: bool = Field(
        True,
        description="Ray Serve's throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED): replicas run requests on "
        "their main event loop instead of handing each to a second thread, and buffer their request logs; "
        "applies, like haproxy, to the Ray that `hotdog serve` starts itself",
    )

    prediction_log: str | None = Field(
        None,
        description="where replicas log a sample of their answers as Parquet (<location>/date=YYYY-MM-DD/): "
        "a folder or s3://; unset: no prediction log",
    )
    log_sample_rate: float = Field(1.0, ge=0, le=1, description="share of answers the prediction log keeps")
    log_images: bool = Field(
        False, description="also store each logged image, at <prediction_log>/images/<sha256>"
    )
    log_flush_interval_s: float = Field(5.0, gt=0, description="most seconds a logged answer waits in memory")
    log_queue_rows: int = Field(
        20_000, ge=1, description="rows held in memory at most; when storage falls behind, more are dropped"
    )

    @model_validator(mode="after")
    def _batching_fits(self) -> "ServeSettings":
        # A replica never sees more than max_ongoing_requests at once: a larger batch never fills.
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("max_ongoing_requests must be at least max_batch_size")
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be at least min_replicas")
        return self


class PredictSettings(_Section):
    """How serving, batch scoring and ``hotdog evaluate`` run a model's forward pass."""

    runtime: Literal["auto", "onnxruntime", "torch"] = Field(
        "auto",
        description="auto: ONNX Runtime on the CPU when the model has its ONNX graph, on a GPU whichever "
        "of ONNX Runtime's CUDA provider and PyTorch bf16 measures faster, else PyTorch; onnxruntime: "
        "fail if the model has no ONNX graph; torch: always eager PyTorch",
    )


class ScoreSettings(_Section):
    """Nightly batch scoring (``hotdog score``, ``jobs/batch_score.py``); the model is serve.model_uri's."""

    input: str | None = Field(
        None, description="prefix or list file of image URIs; {date} becomes the run date"
    )
    output: str | None = Field(None, description="Parquet root; the run writes <output>/date=YYYY-MM-DD/")
    shared_output: bool = Field(
        False, description="a local output is a disk every node mounts (allowed on a multi-node cluster)"
    )
    batch_size: int = Field(64, ge=1)
    num_actors: int | None = Field(
        None,
        ge=1,
        description="model actors (ActorPoolStrategy size); unset: as many as the cluster's nodes hold "
        "beside a decoding task when the job starts, at most one per CPU (GPU actors: per GPU share)",
    )
    cpus_per_actor: float = Field(
        0.5,
        gt=0,
        description="CPUs each model actor reserves; at 0.5, what a decoding task reserves, Ray Data "
        "runs the reading and decoding inside the actors (keep num_actors x cpus_per_actor under the "
        "CPU count)",
    )
    gpus_per_actor: float = Field(0.0, ge=0)
    decode: Literal["auto", "tasks", "actors"] = Field(
        "auto",
        description="where photos are decoded: tasks: CPU tasks hand arrays to the model actors; actors: "
        "each model actor decodes its own batches on its device (JPEGs through nvJPEG on a GPU, other "
        "formats and failures on the CPU); auto: actors when they have a GPU, else tasks",
    )

    @property
    def decode_on_actors(self) -> bool:
        """Whether the model actors decode their batches themselves (``decode``, with auto decided)."""
        return self.decode == "actors" or (self.decode == "auto" and self.gpus_per_actor > 0)


class RolloutSettings(_Section):
    """Trying a challenger on live traffic (serve.rollout) and the gate before it takes over."""

    store: str = Field(
        "rollout",
        description="where replicas write their rollout figures: a folder or s3:// (shared on a cluster)",
    )
    flush_interval_s: float = Field(5.0, gt=0, description="how often each replica writes its figures")
    min_requests: int = Field(
        0, ge=0, description="hotdog promote --force: shadow requests the challenger must have answered"
    )
    min_agreement: float = Field(
        0.0,
        ge=0,
        le=1,
        description="hotdog promote --force: least share of shadow answers equal to the champion's",
    )


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # a file beside the working directory


class TrackingSettings(_Section):
    """MLflow tracking and registry."""

    uri: str | None = Field(
        None,
        description="MLflow store; default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (working directory)",
    )
    experiment: str = "hotdog-ray"
    registered_model: str = "hotdog-classifier"
    alias: str = "champion"
    challenger_alias: str = Field("challenger", description="the version serve.rollout tries on live traffic")


class MonitorSettings(_Section):
    """Watching the model in production: drift against the training reference, progress on long jobs."""

    psi_threshold: float = Field(
        0.2, gt=0, description="population stability index above which a day is flagged as drifted"
    )
    low_confidence: float = Field(
        0.6, gt=0, le=1, description="answers below this probability count as low-confidence"
    )
    max_low_confidence_increase: float = Field(
        0.2, ge=0, le=1, description="flag a day whose low-confidence share rose by more than this"
    )
    progress_interval_s: float = Field(
        30.0, gt=0, description="hotdog score and inspect log a progress line this often"
    )
    metrics_linger_s: float = Field(
        0.0,
        ge=0,
        le=600,
        description="hotdog score waits this long after a run so that Prometheus scrapes its hotdog_score_* "
        "series before the job's Ray goes (a nightly RayJob on Kubernetes: at least two scrape intervals)",
    )


class Config(_Section):
    """The whole configuration; every stage reads its own section."""

    data: DataSettings = Field(default_factory=DataSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    tune: TuneSettings = Field(default_factory=TuneSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    predict: PredictSettings = Field(default_factory=PredictSettings)
    score: ScoreSettings = Field(default_factory=ScoreSettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{key}: {msg}")
    return "invalid config: " + "; ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (["a", "b"], value); the value is read as YAML (``3``, ``[1, 2]``, ``null``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {exc}") from exc
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``key.sub=value`` override applied."""
    out: dict[str, Any] = _deep_copy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return out


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def from_dict(raw: dict[str, Any]) -> Config:
    """Validate a plain dict (from YAML, Tune or Serve's user_config) into a Config."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load defaults, then the YAML preset at ``path`` (if any), then ``overrides``."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections")
    return from_dict(apply_overrides(raw, overrides or []))


def dump_config(cfg: Config) -> str:
    """The config as YAML, loadable again by :func:`load_config`."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"data.image_size": 32, ...}``: the config as flat params (for MLflow)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node

    walk("", cfg.model_dump(mode="json"))
    return out
