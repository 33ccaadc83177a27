"""The training loop: what every worker runs each epoch, wherever it runs.

:func:`fit_loop` holds its shard of the cached training split (:mod:`hotdog_ray.feed`), augments
each batch on its device, validates on its shard of the validation split, and all-reduces the sums
so every reported metric is the whole split's; rank 0 checkpoints the full state every epoch. It
talks to its host through a session (:mod:`hotdog_ray.sessions`: a Ray Train worker's, the
driver's own with ``train.num_workers=0``, or a Tune trial's), so sweeps run this very code.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray.train
import torch
import torch.distributed as dist
from torch import nn

from hotdog_ray.cache import CachedSplit
from hotdog_ray.config import Config, TrainSettings, from_dict
from hotdog_ray.errors import TrainingError
from hotdog_ray.feed import SplitFeed
from hotdog_ray.models import build_model, loss_fn
from hotdog_ray.sessions import (
    Session,
    TrainSession,
    quiet_train_reports,
)
from hotdog_ray.telemetry import job_gauges

if TYPE_CHECKING:
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


def fit_loop(
    cfg: Config,
    classes: list[str],
    session: Session,
    caches: dict[str, CachedSplit],
    start_weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """The training loop: start from ``start_weights`` (a fine-tune) unless a checkpoint resumes,
    then per epoch train, validate, early-stop and checkpoint."""
    loop = Loop(cfg, classes, session.device, session.rank)
    if start_weights is not None:
        loop.model.load_state_dict(start_weights)
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
    fit_loop(
        from_dict(loop_config["config"]),
        loop_config["classes"],
        TrainSession(),
        loop_config["caches"],
        loop_config.get("start_weights"),
    )


class EpochLogger(ray.train.UserCallback):
    """Logs rank 0's metrics of every epoch to the run as Train receives them (curves survive a crash)."""

    def __init__(self, run: "Run") -> None:
        self.run = run

    def after_report(self, run_context, metrics, checkpoint) -> None:
        self.run.log_epoch(metrics[0])
