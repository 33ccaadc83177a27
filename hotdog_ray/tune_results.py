"""A sweep's results: every trial's row (its run, curve, status and best score), the sweep's
MLflow record, and the tables ``hotdog tune`` prints."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hotdog_ray import tracking
from hotdog_ray.config import Config
from hotdog_ray.evaluate import plot_sweep
from hotdog_ray.tables import render

if TYPE_CHECKING:
    from hotdog_ray.promote import Decision
    from hotdog_ray.tracking import Run


log = logging.getLogger(__name__)


SWEEP_TAG = "sweep"
TRIAL_TAG = "trial_id"
METRIC, MODE = "val_loss", "min"


def max_epochs(cfg: Config) -> int:
    """The epochs a trial may run: ASHA's max_t."""
    return cfg.tune.max_epochs or cfg.train.epochs


@dataclass(kw_only=True)
class SweepOutcome:
    """A finished sweep: its trials' rows (best first), the best, and the promotion decision."""

    name: str
    run_id: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    decision: "Decision | None" = None
    path: str = ""
    stopped_early: int = field(init=False)

    def __post_init__(self) -> None:
        self.stopped_early = sum(t["status"] == "stopped" for t in self.trials)


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
            handle = tracking.Run(uri, child.info.run_id)
            if len(handle.metric_steps(METRIC)) >= planned:
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


def log_sweep(run: "Run", outcome: SweepOutcome) -> None:
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
    return render(
        ["trial", "status", "epochs", "val_loss", "val_acc", *keys],
        (
            [
                t["trial_id"],
                t["status"],
                t["epochs"],
                f"{t['best_val_loss']:.4f}",
                None if t["best_val_accuracy"] is None else f"{t['best_val_accuracy']:.4f}",
                *(_fmt(t["params"].get(k)) for k in keys),
            ]
            for t in trials
        ),
    )


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
