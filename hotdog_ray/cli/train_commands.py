"""``hotdog train``, ``models``, ``evaluate``, ``tune`` and ``runs``: training and what it recorded."""

from __future__ import annotations

import argparse
import json
import logging

from hotdog_ray.cli.common import config_from_args, refuse_lost_results
from hotdog_ray.evaluate import evaluate_model, format_report
from hotdog_ray.model_store import load_model
from hotdog_ray.models import zoo_table
from hotdog_ray.registry import default_model_ref, tracking_uri
from hotdog_ray.tables import render
from hotdog_ray.train import run_training
from hotdog_ray.tune import run_sweep
from hotdog_ray.tune_results import epochs_saved, format_trials, max_epochs

log = logging.getLogger("hotdog_ray")


def cmd_train(args: argparse.Namespace) -> int:

    cfg = config_from_args(args)
    refuse_lost_results(cfg, "train")
    out = run_training(cfg, run_name=args.run_name, register=not args.no_register)
    print()
    if out.test_metrics:
        print(format_report(out.test_metrics))
        print()
        print(
            f"test accuracy {out.test_metrics['accuracy']:.4f}, balanced accuracy "
            f"{out.test_metrics['balanced_accuracy']:.4f} (majority baseline {out.test_metrics['majority_baseline']:.4f})"
        )
    best = min(out.history, key=lambda h: h["val_loss"])
    print(
        f"epochs run {len(out.history)}, best epoch {best['epoch'] + 1} (val_loss {best['val_loss']:.4f}, "
        f"val_accuracy {best['val_accuracy']:.4f})"
    )
    if out.skipped:
        print(f"skipped {len(out.skipped)} unreadable files (listed in the run's skipped_files.json)")
    print(
        f"MLflow run id {out.run_id}"
        + (
            f", registered {cfg.tracking.registered_model} version {out.model_version}"
            if out.model_version
            else ""
        )
    )
    print(f"checkpoint {out.checkpoint_path}")
    print(
        f"open the MLflow UI: mlflow ui --backend-store-uri {tracking_uri(cfg.tracking)}  (then http://127.0.0.1:5000)"
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:

    rows = zoo_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        render(
            ["model", "input", "classes", "parameters", "trainable", "width key", "source"],
            (
                [r["name"], r["image_size"], r["num_classes"], f"{r['parameters']:,}", f"{r['trainable']:,}"]
                + [r["width_key"], r["source"]]
                for r in rows
            ),
        )
    )
    print(
        "\nwidth key: the setting tune.filters searches; model.filters is a recipe CNN's base convolution width, "
        "model.head_units the units of a transfer model's new dense head"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:

    cfg = config_from_args(args)
    bundle = load_model(cfg.tracking, args.model or default_model_ref(cfg.tracking))
    metrics = evaluate_model(cfg, bundle, root=args.data, split=args.split)
    print(json.dumps(metrics, indent=2) if args.json else format_report(metrics))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:

    cfg = config_from_args(args)
    refuse_lost_results(cfg, "tune")
    out = run_sweep(cfg, name=args.name, resume=args.resume, promote=False if args.no_promote else None)
    print()
    print(format_trials(out.trials))
    print()
    best = out.best
    print(
        f"sweep {out.name}: {len(out.trials)} trials, {out.stopped_early} stopped early by ASHA; "
        f"best trial {best['trial_id']} (val_loss {best['best_val_loss']:.4f})"
    )
    print(epochs_saved(out.trials, max_epochs(cfg)))
    if out.decision is not None:
        d = out.decision
        print(
            f"promotion: {'promoted version ' + str(d.version) if d.promoted else 'kept the champion'} ({d.reason})"
        )
    print(f"MLflow sweep run id {out.run_id}; resume with: hotdog tune --name {out.name} --resume ...")
    print(f"open the MLflow UI: mlflow ui --backend-store-uri {tracking_uri(cfg.tracking)}")
    return 0
