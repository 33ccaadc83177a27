"""Production: the HTTP server (its limits and autoscaling), the forward pass, nightly scoring, the
prediction log, and rolling out a challenger."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from hotdog_ray.config.base import Section


class LimitsSettings(Section):
    """What one HTTP request may hold; beyond it the client gets a 4xx with the reason (the image
    guards themselves, data.min_image_side and data.max_image_pixels, are every stage's)."""

    max_upload_bytes: int = Field(10_000_000, ge=1, description="larger request bodies get 413")
    max_images_per_request: int = Field(32, ge=1, description="POST /predict/batch limit")


class AutoscalingSettings(Section):
    """How many replicas serve, and how many requests each holds at once."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16, gt=0, description="autoscaling target per replica")
    max_ongoing_requests: int = Field(64, ge=1, description="per replica; at least serve.max_batch_size")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingSettings":
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be at least min_replicas")
        return self


class ServeSettings(Section):
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
    top_k: int = Field(5, ge=1)
    cpus_per_replica: float = Field(1.0, ge=0)
    gpus_per_replica: float = Field(0.0, ge=0, description="> 0: GPU replicas (mixed precision)")
    access_log: bool = Field(True, description="a log line per request in the replicas' logs")
    api_keys_env: str | None = Field(
        None,
        description="name of an environment variable holding one or more API keys (separated by commas or "
        "whitespace; on Kubernetes from a Secret): /predict, /predict/batch and /explain then require "
        "`Authorization: Bearer <key>`; unset: open (logged once)",
    )
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
        "at least 1 and at most Ray's default of 4",
    )
    haproxy_request_metrics: bool = Field(
        False,
        description="Ray Serve's per-request HTTP metrics from HAProxy (serve_num_http_requests and its "
        "latency; RAY_SERVE_HAPROXY_METRICS_ENABLED): HAProxy sends a log line per request that a Python "
        "process parses. Off by default: hotdog_requests_total and hotdog_request_latency_seconds count "
        "every request by endpoint and status already",
    )
    throughput_optimized: bool = Field(
        True,
        description="Ray Serve's throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED): replicas run requests on "
        "their main event loop instead of handing each to a second thread, and buffer their request logs; "
        "applies, like haproxy, to the Ray that `hotdog serve` starts itself",
    )
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)

    @model_validator(mode="after")
    def _batching_fits(self) -> "ServeSettings":
        # A replica never sees more than max_ongoing_requests at once: a larger batch never fills.
        if self.autoscaling.max_ongoing_requests < self.max_batch_size:
            raise ValueError("autoscaling.max_ongoing_requests must be at least max_batch_size")
        return self


class PredictionLogSettings(Section):
    """A sample of the server's answers as Parquet, with the feedback on them: what drift checks and
    ``hotdog rollout report --since`` read."""

    location: str | None = Field(
        None,
        description="where replicas log their answers (<location>/date=YYYY-MM-DD/): a folder or s3://; "
        "unset: no prediction log, and POST /feedback is off",
    )
    sample_rate: float = Field(1.0, ge=0, le=1, description="share of answers the log keeps")
    images: bool = Field(False, description="also store each logged image, at <location>/images/<sha256>")
    flush_interval_s: float = Field(5.0, gt=0, description="most seconds a logged answer waits in memory")
    queue_rows: int = Field(
        20_000, ge=1, description="rows held in memory at most; when storage falls behind, more are dropped"
    )


class PredictSettings(Section):
    """How serving, batch scoring and ``hotdog evaluate`` run a model's forward pass."""

    runtime: Literal["auto", "onnxruntime", "torch"] = Field(
        "auto",
        description="auto: ONNX Runtime on the CPU when the model has its ONNX graph, on a GPU whichever "
        "of ONNX Runtime's CUDA provider and PyTorch bf16 measures faster, else PyTorch; onnxruntime: "
        "fail if the model has no ONNX graph; torch: always eager PyTorch",
    )


class ScoreSettings(Section):
    """Nightly batch scoring (``hotdog score``, ``jobs/batch_score.py``)."""

    model_uri: str | None = Field(
        None,
        description="the model to score with, as serve.model_uri takes it; default: the registry's "
        "tracking.alias, else its newest version",
    )
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


class RolloutSettings(Section):
    """Trying a challenger on live traffic and the gate before it takes over."""

    mode: Literal["off", "shadow", "canary"] = Field(
        "off",
        description="with a challenger (hotdog promote --challenger VERSION): shadow scores every /predict "
        "request with it too, off the response path; canary answers rollout.canary_fraction of them with it",
    )
    canary_fraction: float = Field(
        0.1, ge=0, le=1, description="canary: share of requests the challenger answers"
    )
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
