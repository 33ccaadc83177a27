"""Where the training loop runs: the session objects :func:`hotdog_ray.loop.fit_loop` talks to.

A Ray Train worker (:class:`TrainSession`), the driver itself with ``train.num_workers=0``
(:class:`DriverSession`), or a Tune trial that trains in its own process (:class:`TrialSession`):
each says the rank, world size and device, restores and saves checkpoints, and reports an epoch's
metrics where its host expects them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Protocol

import ray.train
import ray.train.torch
import torch
from ray import tune
from torch import nn

from hotdog_ray import compat, storage
from hotdog_ray.config import Config

if TYPE_CHECKING:
    from hotdog_ray.tracking import Run

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


class Session(Protocol):
    """What the loop needs from where it runs: rank, device, checkpoints and reports."""

    rank: int
    world: int
    device: torch.device

    def checkpoint_state(self) -> dict[str, Any] | None: ...
    def prepare(self, model: nn.Module) -> nn.Module: ...
    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None = None) -> None: ...


def quiet_train_reports() -> None:
    """Ray Train logs two long lines per report and checkpoint; our one line per epoch is the progress."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger(compat.train_v2_report_logger()).setLevel(logging.WARNING)


def load_checkpoint_state(checkpoint: "ray.train.Checkpoint") -> dict[str, Any]:
    """The state a Ray Train or Tune checkpoint (local or on object storage) holds."""
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)


@contextlib.contextmanager
def _checkpoint_of(state: dict[str, Any], checkpoint_class: type) -> Iterator[Any]:
    """A checkpoint folder holding ``state``, for the block (Train and Tune copy it before ``report`` returns)."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / STATE_FILE)
        yield checkpoint_class.from_directory(tmp)


class TrainSession:
    """A Ray Train worker: rank, device, shards, checkpoints and reports come from Train."""

    def __init__(self) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.name = ctx.get_experiment_name()  # the run's name: a bounded label for its metrics

    def checkpoint_state(self) -> dict[str, Any] | None:
        checkpoint = ray.train.get_checkpoint()
        return load_checkpoint_state(checkpoint) if checkpoint else None

    def prepare(self, model: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(model)

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None = None) -> None:
        if state is None:
            ray.train.report(metrics)
        else:
            with _checkpoint_of(state, ray.train.Checkpoint) as checkpoint:
                ray.train.report(metrics, checkpoint=checkpoint)


class InProcessSession:
    """The loop in this very process on one device: no worker group to start. Epochs go straight
    to the MLflow run; subclasses say where checkpoints live."""

    def __init__(self, cfg: Config, run: "Run") -> None:
        self.rank, self.world = 0, 1
        self.device = torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
        self.run = run
        self.state: dict[str, Any] | None = None  # the last checkpointed state
        self.logged_before: set[int] = set()  # epochs in MLflow before this attempt resumed

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None = None) -> None:
        # MLflow first: Tune may end a trial's process as soon as it reports its last epoch. An
        # epoch an earlier attempt logged before it died (its checkpoint not yet durable) is trained
        # again from the older checkpoint, but not logged twice: one point per epoch.
        if int(metrics["epoch"]) not in self.logged_before:
            self.run.log_epoch(metrics)
        if state is not None:
            self.state = state
        self._save(metrics, state)

    def resumed(self, state: dict[str, Any] | None) -> dict[str, Any] | None:
        """``state`` as the loop resumes from it, noting which epochs earlier attempts logged."""
        self.state = state
        if state is not None:
            self.logged_before = self.run.metric_steps("val_loss")
        return state

    def _save(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        raise NotImplementedError


class TrialSession(InProcessSession):
    """A Tune trial's process: epochs also go to Tune (for ASHA), checkpoints are Tune's, so a trial
    restarted by a resumed sweep, or after its node was lost, continues from its last epoch."""

    def checkpoint_state(self) -> dict[str, Any] | None:
        for checkpoint in [*_trial_checkpoints(), tune.get_checkpoint()]:
            if checkpoint is None:
                continue
            try:
                return self.resumed(load_checkpoint_state(checkpoint))
            except Exception as exc:  # noqa: BLE001 - cut short by the loss of its node: an older one
                log.warning("checkpoint %s cannot be read (%s): trying an older one", checkpoint.path, exc)
        self.state = None
        return None

    def _save(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        if state is None:
            tune.report(metrics)
        else:
            with _checkpoint_of(state, tune.Checkpoint) as checkpoint:
                tune.report(metrics, checkpoint=checkpoint)


CHECKPOINT_PREFIX = "checkpoint_"


def _trial_checkpoints() -> list["ray.tune.Checkpoint"]:
    """This trial's checkpoints in its own storage folder, newest first.

    Tune restarts a trial from the last checkpoint its driver recorded; one written just before the
    trial's node went away may never have been recorded, and the restarted trial would train (and
    log to MLflow) that epoch again. Empty where the folder cannot be listed.
    """
    try:
        fs, path = compat.trial_storage()
        folder = storage.Location(fs, path, path)
        names = checkpoint_names(folder)
    except Exception as exc:  # noqa: BLE001 - then only the checkpoint Tune recorded is used
        log.debug("trial folder not listed: %s", exc)
        return []
    return [tune.Checkpoint(folder.join(name).path, filesystem=folder.fs) for name in reversed(names)]


def checkpoint_names(folder: "storage.Location") -> list[str]:
    """The ``checkpoint_*`` folders in ``folder`` (Tune's, Train's and our driver loop's), oldest first."""
    return [n for n in storage.list_dirs(folder) if n.startswith(CHECKPOINT_PREFIX)]


class DriverSession(InProcessSession):
    """``train.num_workers=0``: the loop in the driver, checkpoints under ``<storage_path>/<run name>/``
    (Train V2's own local mode keeps none), so a rerun of the name resumes as with workers."""

    def __init__(self, cfg: Config, run: "Run", folder: "storage.Location") -> None:
        super().__init__(cfg, run)
        self.folder, self.keep = folder, cfg.train.num_to_keep
        self.name = folder.path.rstrip("/").rsplit("/", 1)[-1]
        self.latest: storage.Location | None = None  # the newest checkpoint folder

    def checkpoint_state(self) -> dict[str, Any] | None:
        names = checkpoint_names(self.folder)
        if not names:
            return None
        self.latest = self.folder.join(names[-1])
        data = storage.read_bytes(self.folder.fs, self.latest.join(STATE_FILE).path)
        return self.resumed(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))

    def _save(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        if state is None:
            return
        buf = io.BytesIO()
        torch.save(state, buf)
        self.latest = self.folder.join(f"{CHECKPOINT_PREFIX}{state['epoch']:06d}")
        storage.write_bytes(self.folder.fs, self.latest.join(STATE_FILE).path, buf.getvalue())
        for old in checkpoint_names(self.folder)[: -self.keep]:
            self.folder.fs.delete_dir(self.folder.join(old).path)
