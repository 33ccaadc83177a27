"""Data-parallel training with Ray Train V2: the main job's driver.

The driver checks the data and the cluster, decodes each split once into the decoded-image cache
(or finds it there), opens the MLflow run and starts a ``TorchTrainer`` whose workers run the loop
of :mod:`hotdog_ray.loop`. Epochs start no Ray Data execution. Rank 0 checkpoints the full state
every epoch, so a restarted worker group (``max_failures``) or a rerun of the same run name
continues where it stopped without repeating an epoch. Then the driver logs the curves, the model
and its test evaluation, and registers it.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import ray.train
from ray import tune
from ray.train.torch import TorchConfig, TorchTrainer
from torch import nn

from hotdog_ray import cache, confidence, drift, evaluate, model_store, storage, tracking
from hotdog_ray.bundle import model_meta
from hotdog_ray.cache import CachedSplit
from hotdog_ray.confidence import Calibration
from hotdog_ray.config import Config, TrainSettings, flatten
from hotdog_ray.data import discover
from hotdog_ray.errors import TrainingError
from hotdog_ray.evaluate import plot_curves
from hotdog_ray.feed import in_order, sample_of
from hotdog_ray.loop import EpochLogger, build_network, fit_loop, train_loop_per_worker
from hotdog_ray.runtime import check_capacity, check_shared_store, init_ray
from hotdog_ray.sessions import (
    DriverSession,
    TrialSession,
    load_checkpoint_state,
)
from hotdog_ray.tracking import DIVERGED_TAG

if TYPE_CHECKING:
    from hotdog_ray.data import DatasetLayout
    from hotdog_ray.tracking import Run

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# The driver


@dataclass
class SweepTrial:
    """How a Tune trial's training run joins its sweep."""

    parent_run_id: str
    tags: dict[str, str]
    in_process: bool  # tune.trial_mode=process: the loop runs in the trial's own process
    run_id: str | None = None  # the MLflow run of an earlier attempt (a lost node, a killed sweep)


@dataclass(kw_only=True)
class TrainOutcome:
    """What a training run produced: its MLflow run, the model, its history and test scores."""

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
    start_weights: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
) -> TrainOutcome:
    """Train ``cfg`` end to end: data checks, MLflow run, fit, evaluation, registry.

    Args:
        cfg: the validated config.
        run_name: rerunning a name resumes it from its latest checkpoint (default: ``train.run_name``).
        register: register the logged model as a new version of ``tracking.registered_model``.
        evaluate_test: evaluate on the test split and log the report (sweep trials skip it).
        trial: set by a Tune trial: its sweep's run and tags, and whether the loop runs in-process.
        callbacks: extra Ray Train callbacks (Tune's report callback in ``train``-mode trials).
        start_weights: a state dict of the configured network to start from (a fine-tune).
        tags: more tags of the run.
    """
    splits = ("train", "validation", *(("test",) if evaluate_test else ()))
    layout = discover(cfg.data, required=splits)
    init_ray()  # after the data checks: a bad path fails before Ray starts
    if cfg.train.max_workers > 0 and not (trial and trial.in_process):
        check_cluster(cfg)
    caches, built = cache.ensure_splits(cfg, layout, splits)
    run_name = run_name or cfg.train.run_name or new_run_name(cfg)

    with tracking.run(
        cfg.tracking,
        name=run_name,
        tags=_run_tags(cfg, layout, trial) | (tags or {}),
        parent=trial.parent_run_id if trial else None,
        resume=trial.run_id if trial else None,
    ) as run:
        _log_inputs(run, cfg, layout.classes, caches, built)
        state, checkpoint_path = fit(
            cfg, caches, layout.classes, run, run_name, trial, callbacks or [], start_weights
        )
        model, test_metrics, version, skipped = _finish(
            run, cfg, layout.classes, caches, state, evaluate_test, register
        )
    return TrainOutcome(
        run_id=run.id,
        run_name=run_name,
        model=model,
        classes=layout.classes,
        history=state["history"],
        test_metrics=test_metrics,
        model_version=version,
        checkpoint_path=checkpoint_path,
        skipped=skipped,
    )


def new_run_name(cfg: Config) -> str:
    """``<model>-<date>-<time>-<random>``: a run of its own, sortable by when it started."""
    return f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _finish(
    run: "Run",
    cfg: Config,
    classes: list[str],
    caches: dict[str, CachedSplit],
    state: dict[str, Any],
    evaluate_test: bool,
    register: bool,
) -> tuple[nn.Module, dict[str, Any] | None, str | None, dict[str, str]]:
    """After the fit: the final model, its curves, test evaluation and reference profile logged, the
    model logged (and registered); returns the model, its test metrics, its version and the skipped files."""
    model = final_model(cfg, classes, state)
    skipped = {path: reason for c in caches.values() for path, reason in c.skipped.items()}
    _log_history(run, state, skipped)
    calibration, bank = _calibrate(run, model, caches, cfg, classes)
    test_metrics = (
        _evaluate_test(run, model, caches["test"], cfg, classes, calibration, bank) if evaluate_test else None
    )
    model_store.log_model(run, model, model_meta(cfg, classes) | calibration.meta(), bank)
    version = model_store.register(cfg.tracking, run.id) if register else None
    return model, test_metrics, version, skipped


def _log_inputs(
    run: "Run", cfg: Config, classes: list[str], caches: dict[str, CachedSplit], built: list[str]
) -> None:
    """The run's config, classes and data caches, and what it decoded (nothing when every split
    was already cached)."""
    run.log_params(flatten(cfg))
    run.log_dict({"classes": classes}, "classes.json")
    run.log_dict(cfg.model_dump(mode="json"), "config.yaml")
    run.log_metrics(
        {"decoded_images": sum(caches[s].count + len(caches[s].skipped) for s in built)}
        | {"data_executions": len(built)}
    )
    run.log_dict({s: c.uri for s, c in caches.items()}, "data_caches.json")


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
    start_weights: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], str]:
    """Run the loop where the config says; the last checkpoint's state and where it lies."""

    if trial is not None and trial.in_process:
        session = TrialSession(cfg, run)
        fit_loop(cfg, classes, session, caches, start_weights)
        state, path = session.state, tune.get_context().get_trial_dir()
    elif cfg.train.max_workers == 0:
        folder = storage.resolve(cfg.train.storage_path).join(run_name)
        session = DriverSession(cfg, run, folder)
        fit_loop(cfg, classes, session, caches, start_weights)
        state, path = session.state, (session.latest or folder).uri
    else:
        state, path = _fit_ray_train(cfg, caches, classes, run, run_name, callbacks, start_weights)
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
    start_weights: dict[str, Any] | None = None,
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
            "start_weights": start_weights,
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
    run: "Run",
    model: nn.Module,
    test: CachedSplit,
    cfg: Config,
    classes: list[str],
    calibration: Calibration,
    bank: np.ndarray,
) -> dict[str, Any]:
    """The test report with calibration before and after scaling and the share the OOD threshold
    accepts, its metrics and pictures logged."""
    out = evaluate.outputs_of(model, in_order(test, cfg.data.cache, cfg.data.rescale))
    y, logits = out.labels, out.logits
    probs = confidence.softmax(logits, calibration.temperature)
    metrics = evaluate.compute_metrics(y, probs.argmax(axis=1), classes)
    metrics["calibration"] = confidence.calibration_report(
        probs, y, calibration, confidence.knn_score(out.features, bank, calibration.neighbours)
    )
    run.log_metrics(
        {f"test_{k}": metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "majority_baseline")}
        | {f"test_{k}": v for k, v in metrics["calibration"].items() if k != "temperature"}
    )
    run.log_dict(metrics, "evaluation/test_metrics.json")
    run.log_text(evaluate.format_report(metrics), "evaluation/test_report.txt")
    run.log_figure(evaluate.plot_confusion(metrics), "evaluation/confusion_matrix.png")
    run.log_figure(evaluate.plot_reliability(logits, y, calibration), "evaluation/reliability.png")
    wrong = evaluate.misclassified(probs, y)
    run.log_figure(
        evaluate.plot_misclassified(test.images_at(wrong), y[wrong], probs[wrong], classes),
        "evaluation/misclassified.png",
    )
    return metrics


def _calibrate(
    run: "Run", model: nn.Module, caches: dict[str, CachedSplit], cfg: Config, classes: list[str]
) -> tuple[Calibration, np.ndarray]:
    """The OOD bank (training images' features) and the temperature and OOD threshold fitted on
    the validation split (:mod:`hotdog_ray.confidence`), logged; and the calibrated answers' profile
    there: the reference that drift checks compare a day's traffic with (:mod:`hotdog_ray.drift`)."""
    train = evaluate.outputs_of(
        model, sample_of(caches["train"], cfg.data.cache, cfg.data.rescale, confidence.BANK_SIZE)
    )
    bank = confidence.normalise(train.features)
    val = evaluate.outputs_of(model, in_order(caches["validation"], cfg.data.cache, cfg.data.rescale))
    calibration = confidence.calibrate(val.logits, val.labels, val.features, bank, cfg.monitor.ood_acceptance)
    run.log_metrics({"temperature": calibration.temperature, "ood_threshold": calibration.ood_threshold})
    probs = confidence.softmax(val.logits, calibration.temperature)
    in_distribution = calibration.in_distribution(
        confidence.knn_score(val.features, bank, calibration.neighbours)
    )
    reference = drift.profile_from_probabilities(probs, classes, cfg.monitor.low_confidence, in_distribution)
    run.log_dict(drift.to_json(reference), drift.REFERENCE_ARTIFACT)
    return calibration, bank
