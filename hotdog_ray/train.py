"""Data-parallel training with Ray Train V2: the main job.

The driver checks the data, decodes each split once into the decoded-image cache (or finds it
there), opens the MLflow run and starts a ``TorchTrainer``; each worker holds its shard of the
cached training split (:mod:`hotdog_ray.feed`), augments each batch on its device, validates on its
shard of the cached validation split, and the sums are all-reduced so every reported metric is the
whole split's. Epochs start no Ray Data execution. Rank 0 checkpoints the full state every epoch,
so a restarted worker group (``max_failures``) or a rerun of the same run name continues where it
stopped without repeating an epoch.

The loop (:func:`fit_loop`) talks to its host through a small session object
(:mod:`hotdog_ray.sessions`: Ray Train's, the driver's own with ``train.num_workers=0``, or a Tune
trial's), so sweeps reuse this very code. Ray is imported at module level: this module runs in Ray
workers, and the CLI imports it only for ``hotdog train``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray.train
import torch
import torch.distributed as dist
from ray import tune
from ray.train.torch import TorchConfig, TorchTrainer
from torch import nn

from hotdog_ray import cache, drift, evaluate, model_store, storage, tracking
from hotdog_ray.bundle import model_meta
from hotdog_ray.cache import CachedSplit
from hotdog_ray.config import Config, TrainSettings, flatten, from_dict
from hotdog_ray.data import discover
from hotdog_ray.errors import TrainingError
from hotdog_ray.evaluate import plot_curves
from hotdog_ray.feed import SplitFeed, in_order
from hotdog_ray.metrics import job_gauges
from hotdog_ray.models import build_model, loss_fn
from hotdog_ray.runtime import check_capacity, check_shared_store, init_ray
from hotdog_ray.sessions import (
    DriverSession,
    Session,
    TrainSession,
    TrialSession,
    load_checkpoint_state,
    quiet_train_reports,
)
from hotdog_ray.tracking import DIVERGED_TAG

if TYPE_CHECKING:
    from hotdog_ray.data import DatasetLayout
    from hotdog_ray.tracking import Run

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Pure pieces


def build_optimizer(params, cfg: TrainSettings) -> torch.optim.Optimizer:
    """The recipes' optimizers: Adam, SGD with momentum (and Nesterov, decay), RMSprop."""
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.learning_rate,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.RMSprop(
        params,
        lr=cfg.learning_rate,
        momentum=cfg.momentum if cfg.momentum < 0.5 else 0.0,
        weight_decay=cfg.weight_decay,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainSettings):
    """Step annealing (the snacks chapter divides by 10) or reduce-on-plateau of val_loss; or None."""
    if cfg.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step_epochs, gamma=cfg.lr_gamma)
    if cfg.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=cfg.lr_gamma, patience=cfg.lr_patience
        )
    return None


@dataclass
class EarlyStopping:
    """Keras' EarlyStopping(monitor="val_loss", patience, restore_best_weights)."""

    patience: int | None
    best: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, epoch: int, val_loss: float) -> bool:
        """Record an epoch; True when it is the best so far."""
        if val_loss < self.best:
            self.best, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = (
            float(s["best"]),
            int(s["best_epoch"]),
            int(s["bad_epochs"]),
        )


def check_loss(loss: torch.Tensor, epoch: int, step: int, max_loss: float) -> float:
    """Stop on a NaN, infinite or exploded batch loss: continuing would only burn compute.

    Every worker takes the same decision (one tiny all-reduce), so no rank is left waiting in a
    gradient all-reduce that the others have abandoned.
    """
    value = loss.item()
    bad = not math.isfinite(value) or value > max_loss
    if _reduce([float(bad)], loss.device)[0] > 0:
        raise TrainingError(
            f"loss became {value:.4g} at epoch {epoch} step {step} (limit train.max_loss={max_loss:g}): "
            "training diverged; lower train.learning_rate or check the data"
        )
    return value


# ---------------------------------------------------------------------------------------------
# The per-worker loop


def per_worker_batch(batch_size: int, world: int) -> int:
    """Each worker's share of the global ``batch_size`` (pure): an elastic run that loses or gains
    workers keeps the global batch, so the learning rate still fits it."""
    return max(1, batch_size // world)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _reduce(values: list[float], device) -> list[float]:
    """Sum across workers (no-op with one)."""

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class Loop:
    """One worker's training between epochs (model, optimizer, schedule, early stopping, history)
    and the steps of an epoch."""

    def __init__(self, cfg: Config, classes: list[str], device: torch.device, rank: int) -> None:

        torch.manual_seed(cfg.train.seed + rank)
        self.cfg, self.classes, self.device, self.rank = cfg, classes, device, rank
        self.amp = cfg.train.mixed_precision and device.type == "cuda"
        self.channels_last = cfg.train.channels_last and device.type == "cuda"
        # On the device before the optimizer exists: a resumed optimizer casts its state to where the
        # parameters are, and a model moved afterwards leaves that state behind (Adam then fails on
        # the GPU mixing cuda and cpu tensors; found by bench/gpu_check.py).
        self.model = build_network(cfg, classes).to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model.parameters(), cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.stopper = EarlyStopping(cfg.train.early_stopping_patience)
        self.history: list[dict[str, Any]] = []
        self.first_batch_s = 0.0  # the last pass's wait for its first batch
        self.best_state: dict[str, torch.Tensor] | None = None
        self.start_epoch = 0

    def resume(self, state: dict[str, Any] | None) -> None:
        """Continue from a checkpoint's state (no-op without one)."""
        if not state:
            return
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.stopper.load_state_dict(state["early_stopping"])
        self.best_state, self.history = state.get("best_model"), state["history"]
        self.start_epoch = state["epoch"] + 1
        # A fresh random stream per resumed epoch: replaying the first epoch's draws would repeat it.
        torch.manual_seed(self.cfg.train.seed + self.rank + 1000 * self.start_epoch)
        if self.rank == 0:
            log.info("resuming from epoch %d", self.start_epoch)

    def _batches(self, feed: SplitFeed, world: int, epoch: int = 0, train: bool = False):
        return feed.batches(
            per_worker_batch(self.cfg.train.batch_size, world),
            rescale=self.cfg.data.rescale,
            epoch=epoch,
            # Order and augmentation draws from (seed, epoch, rank): reproducible on any device.
            seed=self.cfg.train.seed if train else None,
            augmentation=self.cfg.data.augment if train else None,
            channels_last=self.channels_last,
            dtype=torch.bfloat16 if self.amp else torch.float32,
        )

    def train_epoch(self, feed: SplitFeed, epoch: int, world: int) -> list[float]:
        """One pass over this worker's training shard: [loss sum, correct, count, seconds]."""
        t0 = time.perf_counter()
        sums = self._pass(self._batches(feed, world, epoch, train=True), epoch, train=True)
        return [*sums, time.perf_counter() - t0]

    def validate(self, feed: SplitFeed, world: int) -> list[float]:
        """One pass over this worker's validation shard: [loss sum, correct, count]."""
        return self._pass(self._batches(feed, world), epoch=-1, train=False)

    def _pass(self, batches, epoch: int, train: bool) -> list[float]:

        self.model.train(train)
        loss_sum = count = 0.0
        correct = torch.zeros((), dtype=torch.int64, device=self.device)  # summed on device: no sync per step
        started = time.perf_counter()
        with torch.set_grad_enabled(train):
            for step, (x, y) in enumerate(batches):
                if step == 0:
                    self.first_batch_s = time.perf_counter() - started
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    logits = self.model(x)
                loss = loss_fn(logits.float(), y)
                if train:
                    value = check_loss(loss, epoch, step, self.cfg.train.max_loss)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                else:
                    value = loss.item()
                pred = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(dim=1)
                loss_sum += value * y.shape[0]
                correct += (pred == y).sum()
                count += y.shape[0]
        return [loss_sum, float(correct.item()), count]

    def end_epoch(
        self, epoch: int, trained: list[float], validated: list[float], world: int
    ) -> dict[str, Any]:
        """The whole split's metrics, then early stopping, the best weights and the learning-rate step."""
        loss_sum, correct, count, secs, v_loss, v_correct, v_count = _reduce(
            [*trained, *validated], self.device
        )
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "loss": loss_sum / max(1, count),
            "accuracy": correct / max(1, count),
            "val_loss": v_loss / max(1, v_count),
            "val_accuracy": v_correct / max(1, v_count),
            "images_per_s": count / max(1e-9, secs / world),
            "lr": self.optimizer.param_groups[0]["lr"],
            "workers": world,  # an elastic run's size changes between epochs
        }
        if self.stopper.update(epoch, metrics["val_loss"]) and self.cfg.train.restore_best:
            self.best_state = copy.deepcopy(_unwrap(self.model).state_dict())
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(metrics["val_loss"])
        elif self.scheduler is not None:
            self.scheduler.step()
        last = self.cfg.train.epochs - 1
        metrics["best_epoch"] = self.stopper.best_epoch
        metrics["stopped_early"] = bool(self.stopper.should_stop and epoch < last)
        self.history.append(metrics)
        if self.rank == 0:
            log.info(
                "epoch %d/%d  loss %.4f  accuracy %.4f  val_loss %.4f  val_accuracy %.4f  %.0f images/s",
                epoch + 1,
                self.cfg.train.epochs,
                metrics["loss"],
                metrics["accuracy"],
                metrics["val_loss"],
                metrics["val_accuracy"],
                metrics["images_per_s"],
            )
            if metrics["stopped_early"]:
                log.info(
                    "early stopping: no better val_loss for %d epochs (best: epoch %d)",
                    self.stopper.patience,
                    self.stopper.best_epoch + 1,
                )
        return metrics

    def checkpoint(self, epoch: int) -> dict[str, Any]:
        """Everything needed to continue after ``epoch`` (or to publish the model)."""
        return {
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "epoch": epoch,
            "early_stopping": self.stopper.state_dict(),
            "history": self.history,
            "best_model": self.best_state if self.cfg.train.restore_best else None,
            "classes": self.classes,
            "config": self.cfg.model_dump(mode="json"),
        }


def build_network(cfg: Config, classes: list[str], *, pretrained: bool = True) -> nn.Module:
    """The configured zoo model for ``classes``; ``pretrained`` loads a transfer backbone's weights."""

    m = cfg.model
    return build_model(
        m.name,
        len(classes),
        cfg.data.image_size,
        filters=m.filters,
        head_units=m.head_units,
        dropout=m.dropout,
        conv_dropout=m.conv_dropout,
        unfreeze_top=m.unfreeze_top,
        pretrained_weights=m.pretrained_weights if pretrained else None,
    )


def fit_loop(cfg: Config, classes: list[str], session: Session, caches: dict[str, CachedSplit]) -> None:
    """The training loop: resume, then per epoch train, validate, early-stop and checkpoint."""
    loop = Loop(cfg, classes, session.device, session.rank)
    loop.resume(session.checkpoint_state())
    loop.model = session.prepare(loop.model)
    train_shard, val_shard = (
        SplitFeed(
            caches[name],
            rank=session.rank,
            world=session.world,
            device=session.device,
            settings=cfg.data.cache,
            seed=cfg.train.seed if name == "train" else None,
        )
        for name in ("train", "validation")
    )

    between = 0.0  # the previous epoch's report and checkpoint
    for epoch in range(loop.start_epoch, cfg.train.epochs):
        started_at = time.time()
        try:
            trained = loop.train_epoch(train_shard, epoch, session.world)
        except TrainingError as err:
            # Reported, not raised: a raised error counts as a worker failure and would be retried
            # from the last checkpoint, diverging again. val_loss rides along for Tune's schedulers.
            session.report({"epoch": epoch, "diverged": str(err), "val_loss": math.inf})
            return
        wait = loop.first_batch_s
        t0 = time.perf_counter()
        validated = loop.validate(val_shard, session.world)
        validate_s = time.perf_counter() - t0
        metrics = loop.end_epoch(epoch, trained, validated, session.world)
        # Where an epoch's time goes besides training steps (this rank's): validation, and the gap
        # between one epoch's last step and the next one's first (report, checkpoint, first batch).
        metrics |= {
            "train_s": trained[3],
            "validate_s": validate_s,
            "gap_s": between + wait,
            "epoch_started_at": started_at,
        }
        t0 = time.perf_counter()
        if session.rank == 0:
            _export_epoch(getattr(session, "name", None) or "local", metrics)
        session.report(metrics, loop.checkpoint(epoch) if session.rank == 0 else None)
        between = time.perf_counter() - t0
        if metrics["stopped_early"]:
            return


def _export_epoch(run: str, metrics: dict[str, Any]) -> None:
    """The epoch's figures as hotdog_train_* gauges on this node's Prometheus endpoint."""

    gauges = job_gauges("hotdog_train_epoch", "hotdog_train_loss", "hotdog_train_images_per_second")
    values = {
        "hotdog_train_epoch": metrics["epoch"] + 1,  # epochs finished
        "hotdog_train_loss": metrics["loss"],
        "hotdog_train_images_per_second": metrics["images_per_s"],
    }
    for name, value in values.items():
        if name in gauges and math.isfinite(value):
            gauges[name].set(float(value), tags={"run": run})


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs."""
    quiet_train_reports()
    fit_loop(from_dict(loop_config["config"]), loop_config["classes"], TrainSession(), loop_config["caches"])


class EpochLogger(ray.train.UserCallback):
    """Logs rank 0's metrics of every epoch to the run as Train receives them (curves survive a crash)."""

    def __init__(self, run: "Run") -> None:
        self.run = run

    def after_report(self, run_context, metrics, checkpoint) -> None:
        self.run.log_epoch(metrics[0])


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass
class SweepTrial:
    """How a Tune trial's training run joins its sweep."""

    parent_run_id: str
    tags: dict[str, str]
    in_process: bool  # tune.trial_mode=process: the loop runs in the trial's own process
    run_id: str | None = None  # the MLflow run of an earlier attempt (a lost node, a killed sweep)


@dataclass
class TrainOutcome:
    run_id: str
    run_name: str
    model: nn.Module
    classes: list[str]
    history: list[dict[str, float]]
    test_metrics: dict[str, Any] | None
    model_version: str | None
    checkpoint_path: str
    skipped: dict[str, str] = field(default_factory=dict)


def run_training(
    cfg: Config,
    *,
    run_name: str | None = None,
    register: bool = True,
    evaluate_test: bool = True,
    trial: SweepTrial | None = None,
    callbacks: list | None = None,
) -> TrainOutcome:
    """Train ``cfg`` end to end: data checks, MLflow run, fit, evaluation, registry.

    Args:
        cfg: the validated config.
        run_name: rerunning a name resumes it from its latest checkpoint (default: ``train.run_name``,
            else a new name).
        register: register the logged model as a new version of ``tracking.registered_model``.
        evaluate_test: evaluate on the test split and log the report (sweep trials skip it).
        trial: set by a Tune trial: its sweep's run and tags, and whether the loop runs in-process.
        callbacks: extra Ray Train callbacks (Tune's report callback in ``train``-mode trials).
    """

    splits = ("train", "validation", *(("test",) if evaluate_test else ()))
    layout = discover(cfg.data, required=splits)
    init_ray()  # after the data checks: a bad path fails before Ray starts
    if cfg.train.max_workers > 0 and not (trial and trial.in_process):
        check_cluster(cfg)
    caches, built = cache.ensure_splits(cfg, layout, splits)
    run_name = (
        run_name
        or cfg.train.run_name
        or f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    )

    with tracking.run(
        cfg.tracking,
        name=run_name,
        tags=_run_tags(cfg, layout, trial),
        parent=trial.parent_run_id if trial else None,
        resume=trial.run_id if trial else None,
    ) as run:
        run.log_params(flatten(cfg))
        run.log_dict({"classes": layout.classes}, "classes.json")
        run.log_dict(cfg.model_dump(mode="json"), "config.yaml")
        # What this run decoded: nothing when every split was already cached.
        run.log_metrics(
            {"decoded_images": sum(caches[s].count + len(caches[s].skipped) for s in built)}
            | {"data_executions": len(built)}
        )
        run.log_dict({s: c.uri for s, c in caches.items()}, "data_caches.json")
        state, checkpoint_path = fit(cfg, caches, layout.classes, run, run_name, trial, callbacks or [])
        model = final_model(cfg, layout.classes, state)
        skipped = {path: reason for c in caches.values() for path, reason in c.skipped.items()}
        _log_history(run, state, skipped)
        test_metrics = (
            _evaluate_test(run, model, caches["test"], cfg, layout.classes) if evaluate_test else None
        )
        _log_reference_profile(run, model, caches["validation"], cfg, layout.classes)
        model_store.log_model(run, model, model_meta(cfg, layout.classes))
        version = model_store.register(cfg.tracking, run.id) if register else None
    return TrainOutcome(
        run.id,
        run_name,
        model,
        layout.classes,
        state["history"],
        test_metrics,
        version,
        checkpoint_path,
        skipped,
    )


def check_cluster(cfg: Config, driver_cpus: float = 0.0) -> None:
    """Fail in seconds when the cluster cannot hold the run's (least) workers beside the read and
    decode tasks, which take a whole CPU each (data.py), and a driver of ``driver_cpus``; or when
    workers on several nodes would write checkpoints to a local path."""

    check_capacity(
        cfg.train.min_workers,
        worker_resources(cfg.train),
        data_cpus=1.0 + driver_cpus,
        keys="train.num_workers or train.cpus_per_worker (train.gpus_per_worker)",
    )
    check_shared_checkpoints(cfg)


def check_shared_checkpoints(cfg: Config) -> None:
    """Refuse a local ``train.storage_path`` (checkpoints) or ``data.cache.root`` (the decoded cache
    that every worker reads) on several nodes unless ``train.shared_storage``."""

    check_shared_store(
        cfg.train.storage_path, "train.storage_path", cfg.train.shared_storage, "train.shared_storage"
    )
    check_shared_store(
        cfg.data.cache.root, "data.cache.root", cfg.train.shared_storage, "train.shared_storage"
    )


def _run_tags(cfg: Config, layout: "DatasetLayout", trial: SweepTrial | None) -> dict[str, str]:
    resources = ray.cluster_resources()
    in_process = trial is not None and trial.in_process
    return {
        "dataset": layout.root.uri,
        "classes": ",".join(layout.classes),
        "model": cfg.model.name,
        "ray_cluster_cpus": str(resources.get("CPU", 0)),
        "ray_cluster_gpus": str(resources.get("GPU", 0)),
        "ray_nodes": str(len([n for n in ray.nodes() if n.get("Alive")])),
        "num_workers": "1" if in_process else _worker_count(cfg.train),
        **(trial.tags if trial else {}),
    }


def fit(
    cfg: Config,
    caches: dict[str, CachedSplit],
    classes: list[str],
    run: "Run",
    run_name: str,
    trial: SweepTrial | None,
    callbacks: list,
) -> tuple[dict[str, Any], str]:
    """Run the loop where the config says; the last checkpoint's state and where it lies."""

    if trial is not None and trial.in_process:
        session = TrialSession(cfg, run)
        fit_loop(cfg, classes, session, caches)
        state, path = session.state, tune.get_context().get_trial_dir()
    elif cfg.train.max_workers == 0:
        folder = storage.resolve(cfg.train.storage_path).join(run_name)
        session = DriverSession(cfg, run, folder)
        fit_loop(cfg, classes, session, caches)
        state, path = session.state, (session.latest or folder).uri
    else:
        state, path = _fit_ray_train(cfg, caches, classes, run, run_name, callbacks)
    diverged = run.tag(DIVERGED_TAG)
    if diverged:
        raise TrainingError(diverged)
    if state is None:
        raise TrainingError(f"training run {run_name} reported no epoch")
    return state, path


def scaling_config(cfg: TrainSettings) -> "ray.train.ScalingConfig":
    return ray.train.ScalingConfig(
        num_workers=cfg.num_workers,
        elastic_resize_monitor_interval_s=cfg.elastic_resize_interval_s,
        use_gpu=cfg.use_gpu,
        resources_per_worker=worker_resources(cfg),
        placement_strategy=cfg.placement_strategy,
    )


def _worker_count(cfg: TrainSettings) -> str:
    return f"{cfg.min_workers}-{cfg.max_workers}" if cfg.elastic else str(cfg.num_workers)


def worker_resources(cfg: "TrainSettings") -> dict[str, float]:
    """What one Train worker reserves."""
    return {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})}


def _fit_ray_train(
    cfg: Config,
    caches: dict[str, CachedSplit],
    classes: list[str],
    run: "Run",
    run_name: str,
    callbacks: list,
) -> tuple[dict[str, Any], str]:
    """Data-parallel fit on a Ray Train worker group; the last checkpoint's state and its path."""

    # Our filesystem, not a bare URI: pyarrow alone ignores AWS_ENDPOINT_URL (apache/arrow#49643).
    checkpoints = storage.resolve(cfg.train.storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "classes": classes,
            # Workers read their shards straight from the cache: no Ray Data execution per epoch.
            "caches": {name: caches[name] for name in ("train", "validation")},
        },
        scaling_config=scaling_config(cfg.train),
        torch_config=TorchConfig(backend=cfg.train.dist_backend),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=checkpoints.path,
            storage_filesystem=None if checkpoints.is_local else checkpoints.fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.num_to_keep,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=[EpochLogger(run), *callbacks],
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise TrainingError(f"training run {run_name} failed: {_root_cause(exc)}") from exc
    if result.error:
        raise TrainingError(f"training run {run_name} failed: {_root_cause(result.error)}") from result.error
    return load_checkpoint_state(result.checkpoint), result.checkpoint.path


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def final_model(cfg: Config, classes: list[str], state: dict[str, Any]) -> nn.Module:
    """The trained network in eval mode: the best epoch's weights with ``train.restore_best``, else the last."""
    model = build_network(cfg, classes, pretrained=False)  # every weight comes from the state
    best = state.get("best_model") if cfg.train.restore_best else None
    model.load_state_dict(best if best is not None else state["model"])
    return model.eval()


def _log_history(run: "Run", state: dict[str, Any], skipped: dict[str, str]) -> None:

    run.log_metrics(
        {
            "skipped_files": len(skipped),
            "epochs_run": len(state["history"]),
            "best_epoch": state["early_stopping"]["best_epoch"],
        }
    )
    if skipped:
        run.log_dict(skipped, "skipped_files.json")
    run.log_figure(plot_curves(state["history"]), "curves.png")


def _evaluate_test(
    run: "Run", model: nn.Module, test: CachedSplit, cfg: Config, classes: list[str]
) -> dict[str, Any]:

    y, p = evaluate.predict_batches(model, in_order(test, cfg.data.cache, cfg.data.rescale))
    metrics = evaluate.compute_metrics(y, p.argmax(axis=1), classes)
    run.log_metrics(
        {f"test_{k}": metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "majority_baseline")}
    )
    run.log_dict(metrics, "evaluation/test_metrics.json")
    run.log_text(evaluate.format_report(metrics), "evaluation/test_report.txt")
    run.log_figure(evaluate.plot_confusion(metrics), "evaluation/confusion_matrix.png")
    return metrics


def _log_reference_profile(
    run: "Run", model: nn.Module, validation: CachedSplit, cfg: Config, classes: list[str]
) -> None:
    """What the model's answers look like on the validation split: the reference that drift checks
    compare a day's traffic with (:mod:`hotdog_ray.drift`)."""

    _, probs = evaluate.predict_batches(model, in_order(validation, cfg.data.cache, cfg.data.rescale))
    reference = drift.profile_from_probabilities(probs, classes, cfg.monitor.low_confidence)
    run.log_dict(drift.to_json(reference), drift.REFERENCE_ARTIFACT)
