"""Data-parallel training with Ray Train V2: the main job.

The driver checks the data, opens the MLflow run and starts a ``TorchTrainer``; each worker
trains on its shard of the streaming training split, validates on its shard of the validation
split, and the sums are all-reduced so every reported metric is the whole split's. Rank 0
checkpoints the full state every epoch, so a restarted worker group (``max_failures``) or a rerun
of the same run name continues where it stopped without repeating an epoch.

The loop (:func:`fit_loop`) talks to its host through a small session object: Ray Train's
(:class:`TrainSession`) or, for a Tune trial that trains in its own process, Tune's
(:class:`TrialSession`), so sweeps reuse this very code.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hotdog_ray.config import Config, TrainConfig, from_dict

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


class TrainingError(RuntimeError):
    """Training stopped and cannot go on by itself (diverged, or out of retries)."""


# ---------------------------------------------------------------------------------------------
# Pure pieces


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The seeds' optimizers: Adam, SGD with momentum (and Nesterov, decay), RMSprop."""
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
    return torch.optim.RMSprop(params, lr=cfg.learning_rate, momentum=cfg.momentum if cfg.momentum < 0.5 else 0.0,
                               weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """Step annealing (the snacks chapter divides by 10) or reduce-on-plateau of val_loss; or None."""
    if cfg.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step_epochs, gamma=cfg.lr_gamma)
    if cfg.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=cfg.lr_gamma, patience=cfg.lr_patience)
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
        self.best, self.best_epoch, self.bad_epochs = float(s["best"]), int(s["best_epoch"]), int(s["bad_epochs"])


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


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _reduce(values: list[float], device) -> list[float]:
    """Sum across workers (no-op with one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _run_epoch(model, batches, optimizer, device, amp: bool, epoch: int, train: bool,
               max_loss: float) -> tuple[float, float, float]:
    """One pass; returns (summed loss, correct, count) for this worker."""
    from hotdog_ray.models import loss_fn

    model.train(train)
    loss_sum = count = 0.0
    correct = torch.zeros((), dtype=torch.int64, device=device)  # summed on device: no sync per step
    with torch.set_grad_enabled(train):
        for step, (x, y) in enumerate(batches):
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            value = check_loss(loss, epoch, step, max_loss) if train else loss.item()
            if train:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            n = y.shape[0]
            pred = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(dim=1)
            loss_sum += value * n
            correct += (pred == y).sum()
            count += n
    return loss_sum, float(correct.item()), count


def _quiet_train_reports() -> None:
    """Ray Train logs two long lines per report and checkpoint; our one line per epoch is the progress."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # Train V2 names this logger by file path, outside "ray.train"
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:  # pragma: no cover - other Ray versions
        pass


class TrainSession:
    """What the loop needs from Ray Train: rank, device, shards, checkpoints and reports."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def checkpoint_state(self) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return load_checkpoint_state(checkpoint) if checkpoint else None

    def shard(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    def prepare(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None = None) -> None:
        import ray.train

        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state, Path(tmp) / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


class TrialSession:
    """The same loop in a Tune trial's own process, on one device: no Train worker group to start.

    Epochs go to Tune (for ASHA) and to the MLflow run directly; checkpoints are Tune's, so a
    trial restarted by a resumed sweep continues from its last epoch.
    """

    def __init__(self, cfg: Config, datasets: dict[str, Any], uri: str, run_id: str) -> None:
        self.rank, self.world = 0, 1
        self.device = torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
        self.datasets, self.uri, self.run_id = datasets, uri, run_id
        self.state: dict[str, Any] | None = None

    def checkpoint_state(self) -> dict[str, Any] | None:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        self.state = load_checkpoint_state(checkpoint) if checkpoint else None
        return self.state

    def shard(self, name: str):
        return self.datasets[name]

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None = None) -> None:
        from ray import tune

        from hotdog_ray.tracking import log_epoch

        log_epoch(self.uri, self.run_id, metrics)
        if state is None:
            tune.report(metrics)
            return
        self.state = state
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state, Path(tmp) / STATE_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs."""
    _quiet_train_reports()
    fit_loop(from_dict(loop_config["config"]), loop_config["classes"], TrainSession(),
             loop_config.get("fault_injection"))


def fit_loop(cfg: Config, classes: list[str], session: "TrainSession | TrialSession",
             fault: dict[str, Any] | None = None) -> None:
    """The training loop: epochs of train and validation, early stopping, a checkpoint per epoch."""
    from hotdog_ray.data import iter_torch_batches
    from hotdog_ray.models import build_model

    rank, world, device = session.rank, session.world, session.device
    torch.manual_seed(cfg.train.seed + rank)
    amp = cfg.train.mixed_precision and device.type == "cuda"

    model = build_model(cfg.model.name, len(classes), cfg.data.image_size, filters=cfg.model.filters,
                        dropout=cfg.model.dropout, conv_dropout=cfg.model.conv_dropout,
                        pretrained_weights=cfg.model.pretrained_weights, unfreeze_top=cfg.model.unfreeze_top)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.parameters(), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    stopper = EarlyStopping(cfg.train.early_stopping_patience)
    start_epoch, history, best_state = 0, [], None

    state = session.checkpoint_state()
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        stopper.load_state_dict(state["early_stopping"])
        best_state, history = state.get("best_model"), state["history"]
        start_epoch = state["epoch"] + 1
        torch.manual_seed(cfg.train.seed + rank + 1000 * start_epoch)
        if rank == 0:
            log.info("resuming from epoch %d", start_epoch)
    model = session.prepare(model)

    fault = fault or {}
    per_worker_batch = max(1, cfg.train.batch_size // world)
    train_shard, val_shard = session.shard("train"), session.shard("validation")

    for epoch in range(start_epoch, cfg.train.epochs):
        if fault and epoch == fault["epoch"] and rank == fault.get("rank", 0) and not Path(fault["marker"]).exists():
            Path(fault["marker"]).touch()
            log.warning("fault injection: killing worker %d at epoch %d", rank, epoch)
            import os

            os._exit(1)
        t0 = time.perf_counter()
        batches = iter_torch_batches(train_shard, batch_size=per_worker_batch, rescale=cfg.data.rescale,
                                     device=device, local_shuffle_buffer_size=4 * per_worker_batch,
                                     local_shuffle_seed=cfg.train.seed + epoch + 1000 * rank)
        try:
            tr = _run_epoch(model, batches, optimizer, device, amp, epoch, train=True, max_loss=cfg.train.max_loss)
        except TrainingError as err:
            # Report instead of raising: a raised error would count as a worker failure and be
            # retried from the last checkpoint, diverging again.
            # val_loss rides along so a Tune scheduler keyed on it accepts the result.
            session.report({"epoch": epoch, "diverged": str(err), "val_loss": math.inf})
            return
        seconds = time.perf_counter() - t0
        va = _run_epoch(model, iter_torch_batches(val_shard, batch_size=per_worker_batch, rescale=cfg.data.rescale,
                                                  device=device), None, device, amp, epoch, train=False,
                        max_loss=math.inf)
        loss_sum, correct, count, v_loss, v_correct, v_count, secs = _reduce([*tr, *va, seconds], device)
        metrics = {
            "epoch": epoch,
            "loss": loss_sum / max(1, count), "accuracy": correct / max(1, count),
            "val_loss": v_loss / max(1, v_count), "val_accuracy": v_correct / max(1, v_count),
            "images_per_s": count / max(1e-9, secs / world),
            "lr": optimizer.param_groups[0]["lr"],
        }
        if stopper.update(epoch, metrics["val_loss"]) and cfg.train.restore_best:
            best_state = copy.deepcopy(_unwrap(model).state_dict())
        metrics["best_epoch"] = stopper.best_epoch
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(metrics["val_loss"])
        elif scheduler is not None:
            scheduler.step()
        history.append(metrics)
        stop = stopper.should_stop or epoch == cfg.train.epochs - 1
        metrics["stopped_early"] = bool(stopper.should_stop and epoch < cfg.train.epochs - 1)
        if rank == 0:
            log.info(
                "epoch %d/%d  loss %.4f  accuracy %.4f  val_loss %.4f  val_accuracy %.4f  %.0f images/s",
                epoch + 1, cfg.train.epochs, metrics["loss"], metrics["accuracy"], metrics["val_loss"],
                metrics["val_accuracy"], metrics["images_per_s"],
            )
            session.report(metrics, {
                "model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "epoch": epoch, "early_stopping": stopper.state_dict(), "history": history,
                "best_model": best_state if cfg.train.restore_best else None,
                "classes": classes, "config": cfg.model_dump(mode="json"),
            })
        else:
            session.report(metrics)
        if stop:
            if metrics["stopped_early"] and rank == 0:
                log.info("early stopping: no better val_loss for %d epochs (best: epoch %d)",
                         stopper.patience, stopper.best_epoch + 1)
            break


# ---------------------------------------------------------------------------------------------
# The driver


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


def load_checkpoint_state(checkpoint) -> dict[str, Any]:
    """The state a Ray Train checkpoint (local or on object storage) holds."""
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)


def scaling_config(cfg: TrainConfig):
    from ray.train import ScalingConfig

    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources)


def ordered_ingest() -> "ray.train.DataConfig":
    """Train's default ingest options, but rows reach the workers in a fixed order.

    Block order and augmentation are seeded (see ``ImagePipeline.dataset``); keeping the order
    of tasks' outputs makes a seeded CPU run reproducible. The cost is small: read tasks are
    few and large, so one slow task rarely holds the others back.
    """
    from ray.data import DataContext
    from ray.train import DataConfig

    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = True
    return DataConfig(execution_options=options)


def run_training(cfg: Config, *, run_name: str | None = None, register: bool = True,
                 fault_injection: dict[str, Any] | None = None, evaluate_test: bool = True,
                 parent_run_id: str | None = None, callbacks: list | None = None,
                 tags: dict[str, str] | None = None, in_trial: bool = False) -> TrainOutcome:
    """Train ``cfg`` end to end: data checks, MLflow run, Ray Train fit, evaluation, registry.

    ``fault_injection`` ({"epoch", "marker"[, "rank"]}) kills a worker once at that epoch: for
    tests and failure drills. A Tune trial passes its sweep's ``parent_run_id``, and either a
    callback that forwards each epoch's metrics to Tune (Train inside Tune) or ``in_trial``
    (the loop runs in the trial's own process, on one device, reporting to Tune itself).
    """
    import ray

    from hotdog_ray import evaluate, tracking
    from hotdog_ray.data import ImagePipeline, discover
    from hotdog_ray.runtime import init_ray

    required = ("train", "validation", "test") if evaluate_test else ("train", "validation")
    layout = discover(cfg.data, required=required)  # fails before Ray starts
    init_ray()
    pipeline = ImagePipeline(cfg.data, layout)
    run_name = run_name or cfg.train.run_name or f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"

    run_id = tracking.start_run(cfg, run_name=run_name, tags={
        "dataset": layout.root.uri, "classes": ",".join(layout.classes), "model": cfg.model.name,
        "ray_cluster_cpus": str(ray.cluster_resources().get("CPU", 0)),
        "ray_cluster_gpus": str(ray.cluster_resources().get("GPU", 0)),
        "ray_nodes": str(len([n for n in ray.nodes() if n.get("Alive")])),
        "num_workers": "1" if in_trial else str(cfg.train.num_workers), **(tags or {}),
    }, parent_run_id=parent_run_id)
    tracking.log_dict(run_id, cfg, {"classes": layout.classes}, "classes.json")
    tracking.log_dict(run_id, cfg, cfg.model_dump(mode="json"), "config.yaml")
    try:
        if in_trial:
            state, checkpoint_path = _fit_in_trial(cfg, pipeline, layout.classes, run_id)
        else:
            state, checkpoint_path = _fit_ray_train(cfg, pipeline, layout.classes, run_name, run_id,
                                                    fault_injection, callbacks)
        diverged = tracking.run_tag(cfg, run_id, tracking.DIVERGED_TAG)
        if diverged:
            raise TrainingError(diverged)
    except Exception as exc:
        tracking.end_run(cfg, run_id, status="FAILED")
        cause = exc
        while cause.__cause__ is not None and not isinstance(cause, TrainingError):
            cause = cause.__cause__
        raise TrainingError(f"training run {run_name} failed: {cause}") from exc

    from hotdog_ray.models import build_model

    model = build_model(cfg.model.name, len(layout.classes), cfg.data.image_size, filters=cfg.model.filters,
                        dropout=cfg.model.dropout, conv_dropout=cfg.model.conv_dropout)
    best = state.get("best_model") if cfg.train.restore_best else None
    model.load_state_dict(best if best is not None else state["model"])
    model.eval()
    history = state["history"]

    skipped = pipeline.skipped()
    tracking.log_metrics(run_id, cfg, {"skipped_files": len(skipped), "epochs_run": len(history),
                                       "best_epoch": state["early_stopping"]["best_epoch"]})
    if skipped:
        tracking.log_dict(run_id, cfg, skipped, "skipped_files.json")
    tracking.log_figure(run_id, cfg, evaluate.plot_curves(history), "curves.png")

    test_metrics = None
    if evaluate_test:
        test_metrics = evaluate.evaluate_dataset(model, pipeline.dataset("test"), layout.classes, cfg.data.rescale)
        tracking.log_metrics(run_id, cfg, {f"test_{k}": test_metrics[k] for k in
                                           ("accuracy", "balanced_accuracy", "macro_f1", "majority_baseline")})
        tracking.log_dict(run_id, cfg, test_metrics, "evaluation/test_metrics.json")
        tracking.log_text(run_id, cfg, evaluate.format_report(test_metrics), "evaluation/test_report.txt")
        tracking.log_figure(run_id, cfg, evaluate.plot_confusion(test_metrics), "evaluation/confusion_matrix.png")

    meta = tracking.model_meta(cfg, layout.classes)
    version = tracking.log_model(cfg, run_id, model, meta, register=register)
    tracking.end_run(cfg, run_id)
    return TrainOutcome(run_id, run_name, model, layout.classes, history, test_metrics, version,
                        checkpoint_path, skipped)


def _fit_ray_train(cfg: Config, pipeline, classes: list[str], run_name: str, run_id: str,
                   fault_injection: dict[str, Any] | None, callbacks: list | None) -> tuple[dict[str, Any], str]:
    """Data-parallel fit on a Ray Train worker group; the last checkpoint's state and its path."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from hotdog_ray import storage, tracking

    # Our filesystem, not a bare URI: pyarrow alone ignores AWS_ENDPOINT_URL (STACK-NOTES).
    checkpoints = storage.resolve(cfg.train.storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "classes": classes,
                           "fault_injection": fault_injection},
        scaling_config=scaling_config(cfg.train),
        datasets={"train": pipeline.dataset("train", shuffle_seed=cfg.train.seed),
                  "validation": pipeline.dataset("validation")},
        dataset_config=ordered_ingest(),
        run_config=RunConfig(
            name=run_name, storage_path=checkpoints.path,
            storage_filesystem=None if checkpoints.is_local else checkpoints.fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep,
                                               checkpoint_score_attribute="val_loss",
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=[tracking.epoch_logger(cfg, run_id), *(callbacks or [])],
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return load_checkpoint_state(result.checkpoint), result.checkpoint.path


def _fit_in_trial(cfg: Config, pipeline, classes: list[str], run_id: str) -> tuple[dict[str, Any], str]:
    """Single-device fit in the current Tune trial's process; the last epoch's state and the trial's folder."""
    from ray import tune

    from hotdog_ray import tracking

    datasets = {"train": pipeline.dataset("train", shuffle_seed=cfg.train.seed),
                "validation": pipeline.dataset("validation")}
    for ds in datasets.values():
        ds.context.execution_options.preserve_order = True  # as ordered_ingest() does for Train
    session = TrialSession(cfg, datasets, tracking.tracking_uri(cfg), run_id)
    fit_loop(cfg, classes, session)
    if session.state is None:
        raise TrainingError("the trial reported no epoch")
    return session.state, tune.get_context().get_trial_dir()
