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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray
from mlflow.tracking import MlflowClient
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
from hotdog_ray.evaluate import plot_sweep
from hotdog_ray.promote import promote as promote_run
from hotdog_ray.registry import tracking_uri
from hotdog_ray.runtime import check_capacity, init_ray
from hotdog_ray.train import SweepTrial, check_cluster, check_shared_checkpoints, run_training

if TYPE_CHECKING:
    from hotdog_ray import storage
    from hotdog_ray.promote import Decision
    from hotdog_ray.tracking import Run

log = logging.getLogger(__name__)

SWEEP_TAG = "sweep"
TRIAL_TAG = "trial_id"
METRIC, MODE = "val_loss", "min"


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


def max_epochs(cfg: Config) -> int:
    return cfg.tune.max_epochs or cfg.train.epochs


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


@dataclass
class SweepOutcome:
    name: str
    run_id: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    decision: "Decision | None" = None
    path: str = ""
    stopped_early: int = field(init=False)

    def __post_init__(self) -> None:
        self.stopped_early = sum(t["status"] == "stopped" for t in self.trials)


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
    _check_cluster(cfg)
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
        trainable = tune.with_resources(
            tune.with_parameters(
                run_trial,
                base=_trial_base(cfg).model_dump(mode="json"),
                sweep=name,
                parent_run_id=sweep_run.id,
            ),
            trial_resources(cfg),
        )
        if previous is None:
            sweep_run.log_params(flatten(cfg))
        tuner = _restored_tuner(name, where.join(name), trainable) if resume else None
        if tuner is None:
            tuner = _new_tuner(cfg, name, where, trainable, search, callbacks or [])
        trials = trials_table(cfg, tuner.fit(), sweep_run.id)
        outcome = SweepOutcome(
            name, sweep_run.id, trials, summarize_trials(trials), path=where.join(name).uri
        )
        _log_sweep(sweep_run, outcome)
        if outcome.best is None:
            raise SweepError(f"sweep {name}: no trial finished (see the trials table in run {sweep_run.id})")
        if cfg.tune.promote if promote is None else promote:
            outcome.decision = promote_run(cfg, outcome.best["run_id"], record=sweep_run)
    return outcome


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


def _check_cluster(cfg: Config) -> None:
    """Fail in seconds when not even one trial fits beside Ray Data's tasks, or when trials on
    several nodes would write checkpoints to a local path (each node's own disk)."""

    if cfg.tune.trial_mode == "train":  # the trial's Train run, and the trial itself as its driver
        check_cluster(cfg, driver_cpus=cfg.tune.cpus_per_trial)
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


def trials_table(cfg: Config, results: Any, sweep_run_id: str) -> list[dict[str, Any]]:
    """One row per planned trial, best first: its values, epochs, best val_loss and what became of it."""
    planned = max_epochs(cfg)
    children = _trial_runs(cfg, sweep_run_id, planned)
    rows = [_trial_row(result, children, index, planned) for index, result in enumerate(results)]
    rows.sort(key=lambda r: r["best_val_loss"])
    return rows


def _trial_runs(cfg: Config, sweep_run_id: str, planned: int) -> dict[str, Any]:
    """Each trial's MLflow run (a finished one wins over an interrupted attempt).

    A trial that ASHA stopped was killed mid-run and an interrupted attempt never ended its run:
    both are closed here as KILLED, unless the run logged every ``planned`` epoch (ASHA's stop at
    the last rung can end a trial before it closes its run): that one is FINISHED.
    """

    uri = tracking.tracking_uri(cfg.tracking)
    children: dict[str, Any] = {}
    for child in tracking.child_runs(cfg.tracking, sweep_run_id):
        if child.info.status == "RUNNING":
            steps = {m.step for m in MlflowClient(uri).get_metric_history(child.info.run_id, METRIC)}
            handle = tracking.Run(uri, child.info.run_id)
            if len(steps) >= planned:
                handle.end("FINISHED")
            else:
                handle.set_tags({"stopped": "asha or interrupted"})
                handle.end("KILLED")
        trial = child.data.tags.get(TRIAL_TAG)
        if trial and (trial not in children or child.info.status == "FINISHED"):
            children[trial] = child
    return children


def epoch_points(df: Any) -> dict[int, tuple[float, float | None]]:
    """Epoch -> (val_loss, val_accuracy) from a trial's metrics dataframe (pure).

    One point per epoch: a finished trial reports its last epoch again when a resume restarts it.
    """
    if df is None or METRIC not in df:
        return {}
    accuracies = df["val_accuracy"] if "val_accuracy" in df else [None] * len(df)
    points: dict[int, tuple[float, float | None]] = {}
    for epoch, loss, acc in zip(df.get("epoch", range(len(df))), df[METRIC], accuracies):
        if _is_number(loss) and _is_number(epoch):
            points[int(epoch)] = (float(loss), float(acc) if _is_number(acc) else None)
    return points


def _is_number(value: Any) -> bool:
    return value is not None and value == value  # NaN is the only value unequal to itself


def _trial_row(result: Any, children: dict[str, Any], index: int, planned: int) -> dict[str, Any]:
    trial_id = (result.metrics or {}).get("trial_id") or f"unreported-{index}"
    points = epoch_points(result.metrics_dataframe)
    child = children.get(trial_id)
    if result.error is not None:
        status = "error"
    elif (child is not None and child.info.status == "FINISHED") or len(points) >= planned:
        # A trial that reported every planned epoch finished, even if ASHA's stop at its last rung
        # ended it before it closed its MLflow run.
        status = "finished"
    else:
        status = "stopped"
    best = min(points, key=lambda e: points[e][0]) if points else None
    return {
        "trial_id": trial_id,
        "status": status,
        "params": dict(result.config),
        "epochs": len(points),
        "best_val_loss": points[best][0] if best is not None else math.inf,
        "best_val_accuracy": points[best][1] if best is not None else None,
        "curve": [(e, v) for e, (v, _) in sorted(points.items())],
        "run_id": child.info.run_id if child is not None else None,
        "error": str(result.error)[:300] if result.error is not None else None,
    }


def _log_sweep(run: "Run", outcome: SweepOutcome) -> None:

    trials, best = outcome.trials, outcome.best
    run.log_dict([{k: v for k, v in t.items() if k != "curve"} for t in trials], "trials.json")
    run.log_text(format_trials(trials), "trials.txt")
    run.log_figure(plot_sweep(trials), "val_loss_per_trial.png")
    run.log_metrics(
        {
            "trials": len(trials),
            "trials_finished": sum(t["status"] == "finished" for t in trials),
            "trials_stopped_early": outcome.stopped_early,
            "trials_errored": sum(t["status"] == "error" for t in trials),
        }
    )
    if best is not None:
        run.log_metrics(
            {"best_val_loss": best["best_val_loss"], "best_val_accuracy": best["best_val_accuracy"] or 0.0}
        )
        run.set_tags({"best_trial": best["trial_id"], "best_run_id": best["run_id"]})


def epochs_saved(trials: list[dict[str, Any]], max_epochs: int) -> str:
    """How many epochs the sweep trained against every trial run to the end, as one line (pure)."""
    trained, full = sum(t["epochs"] for t in trials), len(trials) * max_epochs
    saved = 1 - trained / full if full else 0.0
    return (
        f"{trained} epochs trained; every trial to the end would have been {full} "
        f"({saved:.0%} saved by stopping trials early)"
    )


def format_trials(trials: list[dict[str, Any]]) -> str:
    """The trials table as text, best first (pure)."""
    keys = sorted({k for t in trials for k in t["params"]})
    head = f"{'trial':<14}{'status':<10}{'epochs':>7}{'val_loss':>10}{'val_acc':>9}  " + "  ".join(keys)
    lines = [head]
    for t in trials:
        acc = f"{t['best_val_accuracy']:.4f}" if t["best_val_accuracy"] is not None else "-"
        values = "  ".join(_fmt(t["params"].get(k)) for k in keys)
        lines.append(
            f"{t['trial_id']:<14}{t['status']:<10}{t['epochs']:>7}{t['best_val_loss']:>10.4f}{acc:>9}  {values}"
        )
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
