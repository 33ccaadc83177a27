"""Sweep wall time: ASHA against running every trial to the end, in one run.

Both sweeps sample the same trials (same sampler seed, same training seed) from the same config;
the only difference is ``tune.asha``. Printed: each sweep's wall time and best validation
accuracy, and the ratio of the times. Optionally, in the same run: the ASHA sweep with Optuna's
TPE sampler instead of random search (``--optuna``: does it find a better trial on the same
budget?), and the full sweep with every trial a Ray Train run (``--train-mode``: what a trial in
its own process saves).

    hotdog sample data/sample   # once
    python bench/tune.py --config configs/sample.yaml --samples 8 --epochs 12 --optuna --train-mode
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path


def run(cfg, name: str) -> dict:
    from hotdog_ray.tune import run_sweep

    t0 = time.perf_counter()
    out = run_sweep(cfg, name=name, promote=False)
    seconds = time.perf_counter() - t0
    best_acc = max((t["best_val_accuracy"] or 0.0) for t in out.trials if t["status"] == "finished")
    return {
        "seconds": round(seconds, 1),
        "best_val_accuracy": round(best_acc, 4),
        # the trial the sweep picks (lowest val_loss): the one promotion evaluates
        "chosen_val_accuracy": round(out.best["best_val_accuracy"] or 0.0, 4),
        "best_val_loss": round(out.best["best_val_loss"], 4),
        "stopped_early": out.stopped_early,
        "epochs_trained": sum(t["epochs"] for t in out.trials),
        "trials": [
            {k: t[k] for k in ("trial_id", "status", "epochs", "best_val_loss", "params")} for t in out.trials
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/sample.yaml")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=12, help="max epochs per trial (ASHA's max_t)")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--optuna", action="store_true", help="also: the ASHA sweep with Optuna's TPE sampler")
    ap.add_argument(
        "--train-mode", action="store_true", help="also: the full sweep with tune.trial_mode=train"
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="bench/out/tune.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from hotdog_ray.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        common = [
            f"tune.num_samples={args.samples}",
            f"train.epochs={args.epochs}",
            f"tune.max_concurrent_trials={args.concurrency}",
            "train.early_stopping_patience=null",
            f"train.storage_path={tmp}/runs",
            f"tracking.uri=sqlite:///{tmp}/mlflow.db",
            "train.cpus_per_worker=0.5",
            *args.overrides,
        ]
        sweeps = {
            "every trial to the end": run(
                load_config(args.config, [*common, "tune.asha=false"]), "bench-full"
            ),
            "ASHA": run(load_config(args.config, [*common, "tune.asha=true"]), "bench-asha"),
        }
        if args.optuna:
            sweeps["ASHA, Optuna TPE"] = run(
                load_config(
                    args.config,
                    [
                        *common,
                        "tune.asha=true",
                        "tune.sampler=optuna",
                        f"tune.startup_trials={max(2, args.samples // 3)}",
                    ],
                ),
                "bench-optuna",
            )
        if args.train_mode:
            sweeps["to the end, Train trials"] = run(
                load_config(args.config, [*common, "tune.asha=false", "tune.trial_mode=train"]),
                "bench-train-mode",
            )

    full, asha = sweeps["every trial to the end"], sweeps["ASHA"]
    result = {
        "config": args.config,
        "samples": args.samples,
        "max_epochs": args.epochs,
        "concurrency": args.concurrency,
        "sweeps": sweeps,
        "time_ratio": round(asha["seconds"] / full["seconds"], 3),
        "accuracy_gap": round(full["best_val_accuracy"] - asha["best_val_accuracy"], 4),
        "chosen_accuracy_gap": round(full["chosen_val_accuracy"] - asha["chosen_val_accuracy"], 4),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    # The sweep may run fewer at once than asked (see hotdog_ray.tune.fit_concurrency); its log says so.
    print(
        f"sweep of {args.samples} trials x up to {args.epochs} epochs, up to {args.concurrency} at a time "
        f"({args.config})"
    )
    for name, r in sweeps.items():
        print(
            f"  {name:<26}{r['seconds']:>8.1f} s  {r['epochs_trained']:>4} epochs  stopped early {r['stopped_early']}"
            f"  best val_accuracy {r['best_val_accuracy']:.4f}  chosen trial: val_loss {r['best_val_loss']:.4f}"
            f" val_accuracy {r['chosen_val_accuracy']:.4f}"
        )
    print(f"  time ratio (ASHA / full)  {result['time_ratio']:.3f}")
    print(
        f"  accuracy gap (full - ASHA) {result['accuracy_gap']:+.4f} best, {result['chosen_accuracy_gap']:+.4f} chosen"
    )
    if args.train_mode:
        ratio = full["seconds"] / sweeps["to the end, Train trials"]["seconds"]
        print(f"  time ratio (trials in process / Train trials) {ratio:.3f}")


if __name__ == "__main__":
    main()
