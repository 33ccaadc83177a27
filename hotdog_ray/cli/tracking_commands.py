"""``hotdog runs``: the store's recent runs. Its own module, so that listing runs imports MLflow's
client and nothing of training (torch, Ray): it answers in a second or two."""

from __future__ import annotations

import argparse
import datetime
import json

from hotdog_ray.cli.common import config_from_args
from hotdog_ray.tables import render
from hotdog_ray.tracking import recent_runs


def cmd_runs(args: argparse.Namespace) -> int:

    rows = recent_runs(config_from_args(args).tracking, args.limit)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    fmt = lambda v: None if v is None else f"{v:.4f}"  # noqa: E731
    print(
        render(
            ["started", "kind", "status", "val_loss", "val_acc", "test_bal", "name", "run id"],
            (
                [
                    datetime.datetime.fromtimestamp(r["start"] / 1000).strftime("%Y-%m-%d %H:%M"),
                    r["kind"],
                    r["status"],
                    fmt(r["val_loss"]),
                    fmt(r["val_accuracy"]),
                    fmt(r["test_balanced_accuracy"]),
                    r["name"],
                    r["run_id"],
                ]
                for r in rows
            ),
        )
    )
    return 0
