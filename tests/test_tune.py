"""Sweeps for real: Ray Tune with ASHA on tiny data, MLflow parent and child runs, promotion
to the registry alias, and a sweep whose driver is killed and resumed."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hotdog_ray.config import load_config
from hotdog_ray.errors import ConfigError, SweepError
from hotdog_ray.promote import decide
from hotdog_ray.registry import alias_version, client
from hotdog_ray.tracking import child_runs
from hotdog_ray.tune import (
    fit_concurrency,
    run_sweep,
    search_space,
    searcher,
    summarize_trials,
    trial_config,
    trial_cpus,
    trial_resources,
)
from hotdog_ray.tune_results import epochs_saved, format_trials
from tests.helpers import mlflow_store, set_args, wait_until

REPO = Path(__file__).resolve().parents[1]


def sweep_overrides(tmp_path, root: str, *overrides: str) -> list[str]:
    return [
        f"data.root={root}",
        "data.image_size=16",
        "model.name=first_cnn",
        "train.batch_size=8",
        "train.cpus_per_worker=0.5",
        "train.epochs=4",
        f"train.storage_path={tmp_path / 'runs'}",
        f"tracking.uri={mlflow_store(tmp_path)}",
        "tune.max_concurrent_trials=1",
        "tune.filters=[4]",
        *overrides,
    ]


def sweep_config(tmp_path, root: str, *overrides: str):
    return load_config(None, sweep_overrides(tmp_path, root, *overrides))


# --- pure parts ---------------------------------------------------------------------------------


def test_search_space_follows_the_config():
    from ray.tune.search.sample import Categorical, Float

    cfg = load_config(None, ["tune.optimizers=[adam,sgd]", "tune.dropout=null"])
    space = search_space(cfg)
    assert set(space) == {"model.filters", "train.learning_rate", "train.optimizer"}
    assert isinstance(space["model.filters"], Categorical) and space["model.filters"].categories == [
        16,
        32,
        64,
    ]
    lr = space["train.learning_rate"]
    assert isinstance(lr, Float) and (lr.lower, lr.upper) == (1e-4, 1e-2)
    # a one-point range is a constant, not a degenerate distribution
    assert search_space(load_config(None, ["tune.learning_rate=[0.01,0.01]"]))["train.learning_rate"] == 0.01


def test_trial_config_puts_values_in_and_validates_them():
    base = load_config(None, []).model_dump(mode="json")
    cfg = trial_config(base, {"model.filters": 8, "train.learning_rate": 0.02, "model.dropout": 0.3})
    assert (cfg.model.filters, cfg.train.learning_rate, cfg.model.dropout) == (8, 0.02, 0.3)
    assert base["model"]["filters"] is None  # the base is not modified
    with pytest.raises(ConfigError, match="model.dropout"):
        trial_config(base, {"model.dropout": 1.5})
    with pytest.raises(ConfigError, match="section.key"):
        trial_config(base, {"filters": 8})


@pytest.mark.parametrize(
    "override,message",
    [
        ("tune.learning_rate=[0.1,0.01]", "tune.learning_rate"),
        ("tune.dropout=[0.2,1.0]", "tune.dropout"),
        ("tune.filters=[0,8]", "tune.filters"),
        ("tune.reduction_factor=1", "tune.reduction_factor"),
        ("tune.grace_period=0", "tune.grace_period"),
        ("tune.brackets=0", "tune.brackets"),
    ],
)
def test_bad_search_spaces_are_rejected_by_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_best_trial_is_the_finished_one_with_the_lowest_val_loss():
    trials = [
        {"trial_id": "a", "status": "stopped", "best_val_loss": 0.1},  # stopped trials logged no model
        {"trial_id": "b", "status": "finished", "best_val_loss": 0.5},
        {"trial_id": "c", "status": "finished", "best_val_loss": 0.3},
        {"trial_id": "d", "status": "error", "best_val_loss": math.inf},
    ]
    assert summarize_trials(trials)["trial_id"] == "c"
    assert summarize_trials(trials[:1]) is None


def test_the_saving_of_stopping_early_is_counted_in_epochs():
    trials = [{"epochs": 12}, {"epochs": 1}, {"epochs": 2}, {"epochs": 1}]
    assert epochs_saved(trials, 12) == (
        "16 epochs trained; every trial to the end would have been 48 (67% saved by stopping trials early)"
    )


def test_concurrency_leaves_a_whole_cpu_for_ray_data():
    assert fit_concurrency(2, 2, 0.51) == 1  # two would leave 0.98 CPUs: no read task could start
    assert fit_concurrency(2, 4, 0.51) == 2
    assert fit_concurrency(8, 16, 2.01) == 7
    assert fit_concurrency(3, 1, 0.5) == 1  # never zero


def test_sampler_is_seeded_random_search_or_optuna():
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    assert isinstance(searcher(load_config(None, []), seed=1, concurrency=2), BasicVariantGenerator)
    optuna = searcher(
        load_config(None, ["tune.sampler=optuna", "tune.startup_trials=4"]), seed=1, concurrency=2
    )
    assert isinstance(optuna, ConcurrencyLimiter) and optuna.max_concurrent == 2
    assert optuna.searcher._sampler._n_startup_trials == 4


def test_trials_take_one_worker_or_just_a_driver():
    process = load_config(None, ["train.cpus_per_worker=0.5", "train.num_workers=2"])
    assert trial_resources(process) == {"CPU": 0.5} and trial_cpus(process) == 0.5
    train = load_config(None, ["train.cpus_per_worker=0.5", "train.num_workers=2", "tune.trial_mode=train"])
    assert trial_resources(train) == {"CPU": 0.01} and trial_cpus(train) == pytest.approx(1.01)
    gpu = load_config(None, ["train.use_gpu=true", "train.gpus_per_worker=0.25"])
    assert trial_resources(gpu)["GPU"] == 0.25


def test_promotion_needs_a_strict_improvement():
    assert decide("balanced_accuracy", 0.8, None)[0]
    assert decide("balanced_accuracy", 0.81, 0.8)[0]
    promoted, reason = decide("balanced_accuracy", 0.8, 0.8)
    assert not promoted and "does not beat" in reason


# --- sweeps ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_sweep(ray_session, image_tree, tmp_path_factory):
    """Three seeded trials, one of them with a learning rate too small to learn: ASHA stops it.
    Two at a time are asked for; on 2 CPUs the sweep runs one at a time rather than hang."""
    tmp = tmp_path_factory.mktemp("sweep")
    cfg = sweep_config(
        tmp,
        str(image_tree.root),
        "tune.num_samples=3",
        "tune.learning_rate=[0.00001,0.05]",
        "tune.dropout=[0.0,0.3]",
        "tune.seed=3",
        "train.epochs=3",
        "tune.max_concurrent_trials=2",
    )
    # Relative locations, as in the presets: trials run in their own folders and must still find them.
    relative = cfg.model_copy(
        update={
            "data": cfg.data.model_copy(update={"root": os.path.relpath(image_tree.root, tmp)}),
            "train": cfg.train.model_copy(update={"storage_path": "runs"}),
            "tracking": cfg.tracking.model_copy(update={"uri": "sqlite:///mlflow.db"}),
        }
    )
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        out = run_sweep(relative, name="good")
    finally:
        os.chdir(cwd)
    return cfg, out


@pytest.mark.e2e
def test_sweep_stops_poor_trials_and_nests_every_trial_in_mlflow(good_sweep):
    cfg, out = good_sweep
    assert len(out.trials) == 3
    assert out.stopped_early >= 1
    stopped = [t for t in out.trials if t["status"] == "stopped"]
    assert all(t["epochs"] < 3 for t in stopped)
    assert all(t["epochs"] == 3 for t in out.trials if t["status"] == "finished")

    mlflow = client(cfg.tracking)
    parent = mlflow.get_run(out.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["kind"] == "sweep"
    assert (
        parent.data.params["tune.num_samples"] == "3" and parent.data.params["tune.reduction_factor"] == "3"
    )
    assert parent.data.metrics["trials_stopped_early"] == out.stopped_early
    assert parent.data.tags["best_run_id"] == out.best["run_id"]
    artifacts = {a.path for a in mlflow.list_artifacts(out.run_id)}
    assert {"trials.json", "trials.txt", "val_loss_per_trial.png", "promotion.json"} <= artifacts

    children = child_runs(cfg.tracking, out.run_id)
    assert sorted(r.data.tags["trial_id"] for r in children) == sorted(t["trial_id"] for t in out.trials)
    by_trial = {r.data.tags["trial_id"]: r for r in children}
    for t in out.trials:
        child = by_trial[t["trial_id"]]
        assert child.info.status == ("FINISHED" if t["status"] == "finished" else "KILLED")
        # each child has its own sampled values as params and one val_loss point per epoch it ran
        assert float(child.data.params["train.learning_rate"]) == pytest.approx(
            t["params"]["train.learning_rate"]
        )
        assert len(mlflow.get_metric_history(child.info.run_id, "val_loss")) == t["epochs"]
        # the sweep's driver decoded the data once: every trial read the same cache
        assert child.data.metrics["decoded_images"] == 0 and child.data.metrics["data_executions"] == 0
    lines = format_trials(out.trials).splitlines()
    assert len(lines) == 2 + len(out.trials) and lines[2].startswith(out.best["trial_id"])  # header, rule


@pytest.mark.e2e
def test_best_trial_is_promoted_and_a_worse_sweep_keeps_the_champion(good_sweep, image_tree, tmp_path):
    cfg, out = good_sweep
    assert out.decision.promoted and out.decision.champion_version is None
    champion = alias_version(cfg.tracking)
    mlflow = client(cfg.tracking)
    assert mlflow.get_model_version(cfg.tracking.registered_model, champion).run_id == out.best["run_id"]

    # a learning rate too small to learn anything in one epoch
    worse = cfg.model_copy(
        update={
            "train": cfg.train.model_copy(update={"epochs": 1}),
            # and trained the other way, as a data-parallel Train run inside the trial
            "tune": cfg.tune.model_copy(
                update={"num_samples": 1, "learning_rate": (1e-7, 1e-7), "seed": 5, "trial_mode": "train"}
            ),
        }
    )
    second = run_sweep(worse, name="worse")
    assert not second.decision.promoted
    assert second.decision.champion_score > second.decision.candidate_score
    assert alias_version(cfg.tracking) == champion
    assert mlflow.get_run(second.run_id).data.tags["promotion"] == "kept"


@pytest.mark.e2e
def test_killed_sweep_resumes_and_accounts_for_every_trial(image_tree, tmp_path, joining_env):
    """The sweep's driver is killed after its first trial finished; a second run with --resume
    finishes the rest, and every planned trial ends up in the trials table and in MLflow.
    The sampler is Optuna's, whose state (the trials it has seen) must survive the kill too."""
    overrides = sweep_overrides(
        tmp_path,
        str(image_tree.root),
        "train.epochs=1",
        "tune.num_samples=3",
        "tune.asha=false",
        "tune.sampler=optuna",
        "tune.startup_trials=1",
    )
    args = [
        sys.executable,
        str(REPO / "jobs" / "tune.py"),
        "--name",
        "interrupted",
        *set_args(overrides),
        "--no-promote",
    ]
    # The session's Ray ends the killed driver's trials itself. Tune saves the sweep's state every
    # 10 s by default: a trial that finished after the last save is unknown to the resumed sweep,
    # which would run a new one in its place. Trials on the cache take seconds, so save every second
    # and kill a little later than that.
    env = {**joining_env, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    cfg = load_config(None, overrides)
    try:
        wait_until(lambda: first.poll() is not None or _finished_trials(cfg) >= 1, timeout=300, interval=0.5)
        time.sleep(2.5)  # past Tune's next state save (every second here), so the trial is on record
        assert first.poll() is None, "the sweep ended before it could be interrupted"
        assert _finished_trials(cfg) >= 1, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver, as a crash would
        first.wait()

    second = subprocess.run(
        [*args, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming sweep interrupted" in second.stdout + second.stderr

    mlflow = client(cfg.tracking)
    sweeps = [
        r
        for r in mlflow.search_runs([mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
        if r.data.tags.get("kind") == "sweep"
    ]
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"  # the same run, reopened and finished
    children = child_runs(cfg.tracking, sweeps[0].info.run_id)
    finished = {r.data.tags["trial_id"] for r in children if r.info.status == "FINISHED"}
    assert len(finished) == 3  # every planned trial finished once
    assert sweeps[0].data.metrics["trials_finished"] == 3


def _finished_trials(cfg) -> int:
    from mlflow.exceptions import MlflowException

    try:
        mlflow = client(cfg.tracking)
        experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
        if experiment is None:
            return 0
        return sum(
            r.info.status == "FINISHED" and "trial_id" in r.data.tags
            for r in mlflow.search_runs([experiment.experiment_id])
        )
    except MlflowException:  # the database may not exist yet, or be locked by the sweep
        return 0


def test_optuna_missing_fails_before_any_mlflow_run_is_opened(ray_session, image_tree, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # what an install without the optuna extra sees
    cfg = sweep_config(tmp_path, str(image_tree.root), "tune.sampler=optuna")
    with pytest.raises(SweepError, match="pip install 'hotdog-ray\\[optuna\\]'"):
        run_sweep(cfg, name="no-optuna")
    mlflow = client(cfg.tracking)
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    assert experiment is None or mlflow.search_runs([experiment.experiment_id]) == []


@pytest.mark.e2e
def test_runs_lists_the_sweep_and_its_trials(good_sweep, capsys):
    import json

    from hotdog_ray.cli import main

    cfg, out = good_sweep
    assert main(["runs", "--set", f"tracking.uri={cfg.tracking.uri}", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    sweep = next(r for r in rows if r["run_id"] == out.run_id)
    assert sweep["kind"] == "sweep" and sweep["val_loss"] == pytest.approx(out.best["best_val_loss"])
    trials = [r for r in rows if r["parent"] == out.run_id]
    assert len(trials) == len(out.trials) and {r["kind"] for r in trials} == {"trial"}
    assert main(["runs", "--set", f"tracking.uri={cfg.tracking.uri}"]) == 0
    table = capsys.readouterr().out
    assert out.name in table
    assert all(r["name"] in table for r in trials)  # whole names: no two trials read the same
