"""Training: the model, Ray Train's run and Ray Tune's sweep."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from hotdog_ray import zoo
from hotdog_ray.config.base import Section


class ModelSettings(Section):
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


class TrainSettings(Section):
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
        1.0,
        gt=0,
        description="CPUs a worker takes; workers that leave Ray Data no CPU are refused before training starts",
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


class TuneSettings(Section):
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
    # ASHA's defaults: chosen by bench/tune.py over 5 seeds (bench/RESULTS.md, the "Sweep:" sections).
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
