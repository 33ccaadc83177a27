"""``hotdog serve``, ``score`` and ``drift``: the model at work, online and nightly, and its watch."""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict

from hotdog_ray.cli.common import config_from_args, refuse_lost_results
from hotdog_ray.drift import check
from hotdog_ray.runtime import show_progress_bars
from hotdog_ray.score import run_date, score
from hotdog_ray.server import launch

log = logging.getLogger("hotdog_ray")


def cmd_score(args: argparse.Namespace) -> int:

    show_progress_bars(args.progress)

    cfg = config_from_args(args)
    output = args.output or cfg.score.output
    refuse_lost_results(
        cfg.model_copy(update={"score": cfg.score.model_copy(update={"output": output})}), "score"
    )
    summary = score(cfg, input=args.input, output=args.output, date=args.date, model=args.model)
    drift = summary.drift or {}
    print(
        json.dumps(asdict(summary), indent=2)
        if args.json
        else f"scored {summary.scored} of {summary.files} files ({summary.failed} unreadable) with "
        f"{summary.model} version {summary.model_version} in {summary.seconds:.1f} s "
        f"({summary.images_per_s:.0f} images/s) -> {summary.output}"
        + (f"\ndrift: FLAGGED: {'; '.join(drift['reasons'])}" if drift.get("flagged") else "")
    )
    if cfg.monitor.metrics_linger_s:
        log.info(
            "keeping the job's metrics up %g s for Prometheus (monitor.metrics_linger_s)",
            cfg.monitor.metrics_linger_s,
        )
        time.sleep(cfg.monitor.metrics_linger_s)
    return 0


def cmd_drift(args: argparse.Namespace) -> int:

    report = check(config_from_args(args), run_date(args.date).isoformat(), args.source)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 3 if report.flagged else 0


def cmd_serve(args: argparse.Namespace) -> int:

    cfg = config_from_args(args)
    if args.model:
        cfg.serve.model_uri = args.model
    launch.run(cfg)
    return 0
