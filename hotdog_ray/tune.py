"""Hyperparameter sweeps with Ray Tune: random search, ASHA, one MLflow child run per trial.

Each trial is a Tune function that calls :func:`hotdog_ray.train.run_training`, so a trial
trains, checkpoints and logs exactly as ``hotdog train`` does: by default on one device in the
trial's own process (``tune.trial_mode=process``: no worker group to start, which makes small
sweeps faster; see bench/RESULTS.md), or as a data-parallel Ray Train run (``train``, the
Train-inside-Tune pattern Ray 2.60 supports). Every epoch's metrics reach Tune, where ASHA stops
the poor trials. The sweep's MLflow run holds the search space, the trials table, a plot of
validation loss per trial and the promotion decision.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from typing import TYPE_CHECKING, Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator

from hotdog_ray import storage, tracking
from hotdog_ray.cache import ensure_splits
from hotdog_ray.config import Config, flatten, from_dict
from hotdog_ray.data import discover
from hotdog_ray.errors import ConfigError, SweepError
from hotdog_ray.promote import promote as promote_run
from hotdog_ray.registry import tracking_uri
from hotdog_ray.runtime import check_capacity, init_ray
from hotdog_ray.train import SweepTrial, check_shared_checkpoints, run_training
from hotdog_ray.train import check_cluster as check_train_cluster
from hotdog_ray.tune_results import (
    METRIC,
    MODE,
    SWEEP_TAG,
    TRIAL_TAG,
    SweepOutcome,
    log_sweep,
    max_epochs,
    trials_table,
)

if TYPE_CHECKING:
    from hotdog_ray import storage

log = logging.getLogger(__name__)


# --- pure parts -------------------------------------------------------------------------------


def search_space(cfg: Config) -> dict[str, Any]:
    """Tune's ``param_space``: config paths (as in ``--set``) to Tune domains."""

    t = cfg.tune
    space: dict[str, Any] = {
        f"model.{cfg.model.width_key}": tune.choice(t.filters),
        "train.learning_rate": tune.loguniform(*t.learning_rate)
        if t.learning_rate[0] < t.learning_rate[1]
        else t.learning_rate[0],
    }
    if t.dropout is not None:
        space["model.dropout"] = tune.uniform(*t.dropout) if t.dropout[0] < t.dropout[1] else t.dropout[0]
    if t.optimizers:
        space["train.optimizer"] = tune.choice(t.optimizers)
    if t.batch_sizes:
        space["train.batch_size"] = tune.choice(t.batch_sizes)
    return space


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """The base config (a plain dict) with a trial's sampled values put in, validated."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in params.items():
        section, _, name = key.partition(".")
        if section not in raw or not name:
            raise ConfigError(f"search space key {key!r} is not section.key")
        raw[section][name] = value
    return from_dict(raw)


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one trial reserves: one Train worker's share (process mode), or its driver's (train mode,
    whose workers reserve their own)."""
    if cfg.tune.trial_mode == "train":
        return {"CPU": cfg.tune.cpus_per_trial}
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = cfg.train.gpus_per_worker
    return resources


def trial_cpus(cfg: Config) -> float:
    """CPUs one trial holds while it runs, workers included."""
    workers = cfg.train.max_workers * cfg.train.cpus_per_worker if cfg.tune.trial_mode == "train" else 0.0
    return trial_resources(cfg)["CPU"] + workers


def fit_concurrency(requested: int, cluster_cpus: float, trial_cpus: float) -> int:
    """How many trials may run at once so that one whole CPU stays free for Ray Data's tasks.

    Trials reserve fractional CPUs (their driver and Train workers), while every read and decode
    task needs a whole one: two 0.51-CPU trials on a 2-CPU laptop leave 0.98 free and hang.
    """
    fits = int((cluster_cpus - 1) // trial_cpus) if trial_cpus > 0 else requested
    return max(1, min(requested, fits))


def summarize_trials(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best finished trial (lowest best val_loss) of the trials table, or None (pure)."""
    finished = [t for t in trials if t["status"] == "finished" and math.isfinite(t["best_val_loss"])]
    return min(finished, key=lambda t: t["best_val_loss"]) if finished else None


# --- the trial --------------------------------------------------------------------------------


def run_trial(params: dict[str, Any], *, base: dict[str, Any], sweep: str, parent_run_id: str) -> None:
    """One trial: the training job with the sampled values, nested under the sweep's run.

    In process mode the loop runs right here and reports to Tune; in train mode a Train run
    does, and a callback forwards its epochs. A trial restarted by a resumed sweep continues
    from its own last checkpoint (Tune's, or the Train run named after the trial), and one that
    had already finished only reports its result again.
    """

    cfg = trial_config(base, params)
    trial_id = tune.get_context().get_trial_id()
    earlier = [
        r
        for r in tracking.find_runs(cfg.tracking, {SWEEP_TAG: sweep, TRIAL_TAG: trial_id})
        if r.data.tags.get(tracking.PARENT_TAG) == parent_run_id
    ]
    done = [r for r in earlier if r.info.status == "FINISHED"]
    if done:
        # Tune had not recorded its end when the driver died: training again would log a second run.
        metrics = done[0].data.metrics
        log.info(
            "trial %s had finished before the sweep was interrupted (run %s)", trial_id, done[0].info.run_id
        )
        tune.report({**metrics, "epoch": int(metrics.get("epochs_run", 1)) - 1})
        return
    in_process = cfg.tune.trial_mode == "process"
    callbacks = [] if in_process else [_tune_report_callback()]
    run_training(
        cfg,
        run_name=f"{sweep}-{trial_id}",
        register=False,
        evaluate_test=False,
        callbacks=callbacks,
        # A trial restarted after its node or the sweep's driver died carries on in its own MLflow run.
        trial=SweepTrial(
            parent_run_id,
            {SWEEP_TAG: sweep, TRIAL_TAG: trial_id},
            in_process,
            earlier[0].info.run_id if earlier else None,
        ),
    )


def _tune_report_callback():

    return TuneReportCallback()


def searcher(cfg: Config, seed: int, concurrency: int):
    """Seeded random search, or Optuna's TPE, at most ``concurrency`` trials at a time.

    Tune ignores ``max_concurrent_trials`` beside a search algorithm instance: the limit goes here.
    """
    if cfg.tune.sampler == "random":
        return BasicVariantGenerator(random_state=seed, max_concurrent=concurrency)
    try:
        import optuna  # noqa: PLC0415 - an optional extra (hotdog-ray[optuna]), only for this sampler
        from ray.tune.search.optuna import OptunaSearch  # noqa: PLC0415 - imports optuna
    except ImportError as exc:
        raise SweepError("tune.sampler=optuna needs Optuna: pip install 'hotdog-ray[optuna]'") from exc

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.tune.startup_trials)
    return ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent=concurrency)


# --- the sweep --------------------------------------------------------------------------------


def run_sweep(
    cfg: Config,
    *,
    name: str | None = None,
    resume: bool = False,
    promote: bool | None = None,
    callbacks: list | None = None,
) -> SweepOutcome:
    """Run (or with ``resume``, continue) a sweep; promote its best trial unless told not to.
    ``callbacks``: Ray Tune callbacks for the sweep's driver (a new sweep; a resumed one keeps its own)."""
    layout = discover(cfg.data, required=("train", "validation", "test"))  # fails before Ray starts
    name = name or cfg.tune.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    where = storage.resolve(cfg.train.storage_path)
    init_ray()
    check_cluster(cfg)
    # Every trial reads the same decoded cache: built here once, not by trials racing to build it.
    ensure_splits(_trial_base(cfg), layout, ("train", "validation"))
    concurrency = _concurrency(cfg)
    search = searcher(cfg, cfg.train.seed if cfg.tune.seed is None else cfg.tune.seed, concurrency)

    previous = _sweep_run_id(cfg, name) if resume else None
    with tracking.run(
        cfg.tracking,
        name=name,
        tags={SWEEP_TAG: name, "kind": "sweep", "dataset": layout.root.uri},
        resume=previous,
    ) as sweep_run:
        trainable = _trainable(cfg, name, sweep_run.id)
        if previous is None:
            sweep_run.log_params(flatten(cfg))
        tuner = _restored_tuner(name, where.join(name), trainable) if resume else None
        if tuner is None:
            tuner = _new_tuner(cfg, name, where, trainable, search, callbacks or [])
        trials = trials_table(cfg, tuner.fit(), sweep_run.id)
        best = summarize_trials(trials)
        outcome = SweepOutcome(
            name=name, run_id=sweep_run.id, trials=trials, best=best, path=where.join(name).uri
        )
        log_sweep(sweep_run, outcome)
        if outcome.best is None:
            raise SweepError(f"sweep {name}: no trial finished (see the trials table in run {sweep_run.id})")
        if cfg.tune.promote if promote is None else promote:
            outcome.decision = promote_run(cfg, outcome.best["run_id"], record=sweep_run)
    return outcome


def _trainable(cfg: Config, sweep: str, parent_run_id: str) -> Any:
    """:func:`run_trial` with the sweep's base config and run bound, and a trial's resources."""
    base = _trial_base(cfg).model_dump(mode="json")
    bound = tune.with_parameters(run_trial, base=base, sweep=sweep, parent_run_id=parent_run_id)
    return tune.with_resources(bound, trial_resources(cfg))


def _trial_base(cfg: Config) -> Config:
    """The config trials start from: trials run in their own folders, so every relative location is
    pinned to this working directory, and ``train.epochs`` is the sweep's."""

    return cfg.model_copy(
        update={
            "data": cfg.data.model_copy(
                update={
                    "root": storage.pinned(cfg.data.root),
                    "cache": cfg.data.cache.model_copy(
                        update={"root": cfg.data.cache.root and storage.pinned(cfg.data.cache.root)}
                    ),
                }
            ),
            "train": cfg.train.model_copy(
                update={"epochs": max_epochs(cfg), "storage_path": storage.pinned(cfg.train.storage_path)}
            ),
            "tracking": cfg.tracking.model_copy(update={"uri": tracking_uri(cfg.tracking)}),
        }
    )


def check_cluster(cfg: Config) -> None:
    """Fail in seconds when not even one trial fits beside Ray Data's tasks, or when trials on
    several nodes would write checkpoints to a local path (each node's own disk)."""

    if cfg.tune.trial_mode == "train":  # the trial's Train run, and the trial itself as its driver
        check_train_cluster(cfg, driver_cpus=cfg.tune.cpus_per_trial)
        return
    check_capacity(
        1, trial_resources(cfg), data_cpus=1.0, keys="train.cpus_per_worker (train.gpus_per_worker)"
    )
    check_shared_checkpoints(cfg)


def _concurrency(cfg: Config) -> int:
    """Trials at a time: as asked, unless that would leave Ray Data no whole CPU (then fewer, said once)."""

    cluster = ray.cluster_resources().get("CPU", 0)
    cpus = trial_cpus(cfg)
    concurrency = fit_concurrency(cfg.tune.max_concurrent_trials, cluster, cpus)
    if concurrency < cfg.tune.max_concurrent_trials:
        log.warning(
            "running %d trial(s) at a time, not %d: each reserves %.2f CPUs and Ray Data needs one "
            "whole CPU free (cluster: %g CPUs)",
            concurrency,
            cfg.tune.max_concurrent_trials,
            cpus,
            cluster,
        )
    return concurrency


def _new_tuner(
    cfg: Config, name: str, where: "storage.Location", trainable: Any, search: Any, callbacks: list
):

    # max_t one past the last epoch: at max_t ASHA stops a trial itself, which would kill a
    # finished trial while it logs its model. Rungs stay below the last epoch unless it is one.
    scheduler = (
        ASHAScheduler(
            time_attr="training_iteration",
            max_t=max_epochs(cfg) + 1,
            grace_period=cfg.tune.grace_period,
            reduction_factor=cfg.tune.reduction_factor,
            brackets=cfg.tune.brackets,
        )
        if cfg.tune.asha
        else None
    )
    return tune.Tuner(
        trainable,
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            scheduler=scheduler,
            num_samples=cfg.tune.num_samples,
            search_alg=search,
            reuse_actors=cfg.tune.reuse_actors,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=where.path,
            storage_filesystem=None if where.is_local else where.fs,
            # A trial whose process or node died restarts from its own last checkpoint.
            failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks,
            verbose=1,
        ),
    )


def _restored_tuner(name: str, path: "storage.Location", trainable: Any):
    """The Tuner of an interrupted sweep at ``path``, or None (with a warning) when there is none."""

    fs = None if path.is_local else path.fs
    if not tune.Tuner.can_restore(path.path, storage_filesystem=fs):
        log.warning("no sweep %s to resume at %s: starting it", name, path.uri)
        return None
    log.info("resuming sweep %s from %s", name, path.uri)
    return tune.Tuner.restore(
        path.path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs
    )


def _sweep_run_id(cfg: Config, name: str) -> str | None:
    """The MLflow run of an earlier attempt of sweep ``name`` (for resume)."""

    runs = tracking.find_runs(cfg.tracking, {SWEEP_TAG: name, "kind": "sweep"})
    return runs[0].info.run_id if runs else None
