"""Hyperparameter sweeps with Ray Tune: random search, ASHA, one MLflow child run per trial.

Each trial is a Tune function that calls :func:`hotdog_ray.train.run_training`, so a trial
trains, checkpoints and logs exactly as ``hotdog train`` does: by default on one device in the
trial's own process (``tune.trial_mode=process``: no worker group to start, which made small
sweeps 2.7x faster, bench/RESULTS.md), or as a data-parallel Ray Train run (``train``, the
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

from hotdog_ray.config import Config, ConfigError, from_dict

if TYPE_CHECKING:
    from hotdog_ray.promote import Decision

log = logging.getLogger(__name__)

SWEEP_TAG = "sweep"
TRIAL_TAG = "trial_id"
METRIC, MODE = "val_loss", "min"


class SweepError(RuntimeError):
    """A sweep that cannot start or produced no usable trial; the message says why."""


# --- pure parts -------------------------------------------------------------------------------

def search_space(cfg: Config) -> dict[str, Any]:
    """Tune's ``param_space``: config paths (as in ``--set``) to Tune domains."""
    from ray import tune

    t = cfg.tune
    space: dict[str, Any] = {
        "model.filters": tune.choice(t.filters),
        "train.learning_rate": tune.loguniform(*t.learning_rate) if t.learning_rate[0] < t.learning_rate[1]
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
    workers = cfg.train.num_workers * cfg.train.cpus_per_worker if cfg.tune.trial_mode == "train" else 0.0
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
    from ray import tune

    from hotdog_ray import tracking
    from hotdog_ray.train import run_training

    cfg = trial_config(base, params)
    trial_id = tune.get_context().get_trial_id()
    done = [r for r in tracking.find_runs(cfg, {SWEEP_TAG: sweep, TRIAL_TAG: trial_id})
            if r.info.status == "FINISHED" and r.data.tags.get(tracking.PARENT_TAG) == parent_run_id]
    if done:
        # Tune had not recorded its end when the driver died: training again would log a second run.
        metrics = done[0].data.metrics
        log.info("trial %s had finished before the sweep was interrupted (run %s)", trial_id, done[0].info.run_id)
        tune.report({**metrics, "epoch": int(metrics.get("epochs_run", 1)) - 1})
        return
    in_trial = cfg.tune.trial_mode == "process"
    callbacks = [] if in_trial else [_tune_report_callback()]
    run_training(cfg, run_name=f"{sweep}-{trial_id}", register=False, evaluate_test=False,
                 parent_run_id=parent_run_id, callbacks=callbacks, in_trial=in_trial,
                 tags={SWEEP_TAG: sweep, TRIAL_TAG: trial_id})


def _tune_report_callback():
    from ray.tune.integration.ray_train import TuneReportCallback

    return TuneReportCallback()


def searcher(cfg: Config, seed: int, concurrency: int):
    """Seeded random search, or Optuna's TPE, at most ``concurrency`` trials at a time.

    Tune ignores ``max_concurrent_trials`` beside a search algorithm instance: the limit goes here.
    """
    if cfg.tune.sampler == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed, max_concurrent=concurrency)
    try:
        import optuna
    except ImportError as exc:
        raise SweepError("tune.sampler=optuna needs Optuna: pip install 'hotdog-ray[optuna]'") from exc
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

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


def run_sweep(cfg: Config, *, name: str | None = None, resume: bool = False,
              promote: bool | None = None) -> SweepOutcome:
    """Run (or with ``resume``, continue) a sweep; promote its best trial unless told not to."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from hotdog_ray import storage, tracking
    from hotdog_ray.data import discover
    from hotdog_ray.runtime import init_ray

    layout = discover(cfg.data, required=("train", "validation", "test"))  # fails before Ray starts
    name = name or cfg.tune.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    epochs = max_epochs(cfg)
    # Trials run in their own folders: pin every relative location to this working directory.
    base_cfg = cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"root": storage.pinned(cfg.data.root)}),
        "train": cfg.train.model_copy(update={"epochs": epochs, "storage_path": storage.pinned(cfg.train.storage_path)}),
        "tracking": cfg.tracking.model_copy(update={"uri": tracking.tracking_uri(cfg)}),
    })
    where = storage.resolve(cfg.train.storage_path)
    path = where.join(name)
    init_ray()

    cpus = trial_cpus(cfg)
    concurrency = fit_concurrency(cfg.tune.max_concurrent_trials, ray.cluster_resources().get("CPU", 0), cpus)
    if concurrency < cfg.tune.max_concurrent_trials:
        log.warning("running %d trial(s) at a time, not %d: each reserves %.2f CPUs and Ray Data needs one "
                    "whole CPU free (cluster: %g CPUs)", concurrency, cfg.tune.max_concurrent_trials, cpus,
                    ray.cluster_resources().get("CPU", 0))

    run_id = _sweep_run(cfg, name, layout.root.uri) if resume else None
    if run_id is None:
        run_id = tracking.start_run(cfg, run_name=name, tags={SWEEP_TAG: name, "kind": "sweep",
                                                              "dataset": layout.root.uri})
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base_cfg.model_dump(mode="json"), sweep=name, parent_run_id=run_id),
        trial_resources(cfg),
    )
    fs = None if where.is_local else where.fs
    if resume and tune.Tuner.can_restore(path.path, storage_filesystem=fs):
        log.info("resuming sweep %s from %s", name, path.uri)
        tuner = tune.Tuner.restore(path.path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        if resume:
            log.warning("no sweep %s under %s to resume: starting it", name, where.uri)
        # max_t one past the last epoch: at max_t ASHA stops a trial itself, which would kill a
        # finished trial while it logs its model. Rungs stay below the last epoch unless it is one.
        scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=epochs + 1,
                                   grace_period=cfg.tune.grace_period, reduction_factor=cfg.tune.reduction_factor)
                     if cfg.tune.asha else None)
        seed = cfg.train.seed if cfg.tune.seed is None else cfg.tune.seed
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(cfg),
            tune_config=tune.TuneConfig(
                metric=METRIC, mode=MODE, scheduler=scheduler, num_samples=cfg.tune.num_samples,
                search_alg=searcher(cfg, seed, concurrency),
            ),
            run_config=tune.RunConfig(name=name, storage_path=where.path, storage_filesystem=fs, verbose=1),
        )
    try:
        results = tuner.fit()
        trials = _trials_table(cfg, results, run_id)
        outcome = SweepOutcome(name, run_id, trials, summarize_trials(trials), path=path.uri)
        _log_sweep(cfg, outcome)
        if outcome.best is None:
            raise SweepError(f"sweep {name}: no trial finished (see the trials table in run {run_id})")
        if cfg.tune.promote if promote is None else promote:
            from hotdog_ray.promote import promote as promote_run

            outcome.decision = promote_run(cfg, outcome.best["run_id"], record_run_id=run_id)
    except BaseException:
        tracking.end_run(cfg, run_id, status="FAILED")
        raise
    tracking.end_run(cfg, run_id)
    return outcome


def _sweep_run(cfg: Config, name: str, dataset: str) -> str | None:
    """The MLflow run of an earlier attempt of sweep ``name`` (for resume), reopened."""
    from hotdog_ray import tracking

    runs = tracking.find_runs(cfg, {SWEEP_TAG: name, "kind": "sweep"})
    if not runs:
        return None
    run_id = runs[0].info.run_id
    tracking.reopen_run(cfg, run_id)
    return run_id


def _trials_table(cfg: Config, results: Any, run_id: str) -> list[dict[str, Any]]:
    """One row per planned trial: its values, epochs, best val_loss and what became of it.

    A trial whose MLflow run finished logged a model; one that ASHA stopped was killed mid-run,
    so its run is closed here as KILLED. Runs left open by an interrupted attempt are closed too.
    """
    from hotdog_ray import tracking

    children: dict[str, Any] = {}
    for run in tracking.child_runs(cfg, run_id):
        trial = run.data.tags.get(TRIAL_TAG)
        if run.info.status == "RUNNING":
            tracking.end_run(cfg, run.info.run_id, status="KILLED")
            tracking.set_tags(cfg, run.info.run_id, {"stopped": "asha or interrupted"})
        if trial and (trial not in children or run.info.status == "FINISHED"):
            children[trial] = run
    rows = []
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id") or f"unreported-{len(rows)}"
        df = result.metrics_dataframe
        # One point per epoch (a finished trial reports its last epoch again when a resume restarts it).
        points: dict[int, tuple[float, float | None]] = {}
        if df is not None and METRIC in df:
            accs = df["val_accuracy"] if "val_accuracy" in df else [None] * len(df)
            for e, v, a in zip(df.get("epoch", range(len(df))), df[METRIC], accs):
                if v == v and e == e:
                    points[int(e)] = (float(v), float(a) if a is not None and a == a else None)
        curve = [(e, v) for e, (v, _) in sorted(points.items())]
        child = children.get(trial_id)
        status = ("error" if result.error is not None
                  else "finished" if child is not None and child.info.status == "FINISHED"
                  else "stopped")
        best = min(points, key=lambda e: points[e][0]) if points else None
        rows.append({
            "trial_id": trial_id, "status": status,
            "params": {k: v for k, v in result.config.items()},
            "epochs": len(curve),
            "best_val_loss": points[best][0] if best is not None else math.inf,
            "best_val_accuracy": points[best][1] if best is not None else None,
            "curve": curve,
            "run_id": child.info.run_id if child is not None else None,
            "error": str(result.error)[:300] if result.error is not None else None,
        })
    rows.sort(key=lambda r: r["best_val_loss"])
    return rows


def _log_sweep(cfg: Config, outcome: SweepOutcome) -> None:
    from hotdog_ray import tracking
    from hotdog_ray.evaluate import plot_sweep

    run_id, trials, best = outcome.run_id, outcome.trials, outcome.best
    table = [{k: v for k, v in t.items() if k != "curve"} for t in trials]
    tracking.log_dict(run_id, cfg, table, "trials.json")
    tracking.log_text(run_id, cfg, format_trials(trials), "trials.txt")
    tracking.log_figure(run_id, cfg, plot_sweep(trials), "val_loss_per_trial.png")
    tracking.log_metrics(run_id, cfg, {
        "trials": len(trials), "trials_finished": sum(t["status"] == "finished" for t in trials),
        "trials_stopped_early": outcome.stopped_early, "trials_errored": sum(t["status"] == "error" for t in trials),
    })
    if best is not None:
        tracking.log_metrics(run_id, cfg, {"best_val_loss": best["best_val_loss"],
                                           "best_val_accuracy": best["best_val_accuracy"] or 0.0})
        tracking.set_tags(cfg, run_id, {"best_trial": best["trial_id"], "best_run_id": best["run_id"]})


def format_trials(trials: list[dict[str, Any]]) -> str:
    """The trials table as text, best first (pure)."""
    keys = sorted({k for t in trials for k in t["params"]})
    head = f"{'trial':<14}{'status':<10}{'epochs':>7}{'val_loss':>10}{'val_acc':>9}  " + "  ".join(keys)
    lines = [head]
    for t in trials:
        acc = f"{t['best_val_accuracy']:.4f}" if t["best_val_accuracy"] is not None else "-"
        values = "  ".join(_fmt(t["params"].get(k)) for k in keys)
        lines.append(f"{t['trial_id']:<14}{t['status']:<10}{t['epochs']:>7}{t['best_val_loss']:>10.4f}{acc:>9}  {values}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
