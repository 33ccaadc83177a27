"""Sweep wall time: ASHA against running every trial to the end, in one run.

Both sweeps sample the same trials (same sampler seed, same training seed) from the same config;
the only difference is ``tune.asha``. Printed: each sweep's wall time and best validation
accuracy, and the ratio of the times.

    hotdog sample data/sample   # once
    python bench/tune.py --config configs/sample.yaml --samples 8 --epochs 12
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
        "seconds": round(seconds, 1), "best_val_accuracy": round(best_acc, 4),
        "best_val_loss": round(out.best["best_val_loss"], 4), "stopped_early": out.stopped_early,
        "epochs_trained": sum(t["epochs"] for t in out.trials),
        "trials": [{k: t[k] for k in ("trial_id", "status", "epochs", "best_val_loss", "params")} for t in out.trials],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/sample.yaml")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=12, help="max epochs per trial (ASHA's max_t)")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="bench/out/tune.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from hotdog_ray.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        common = [f"tune.num_samples={args.samples}", f"train.epochs={args.epochs}",
                  f"tune.max_concurrent_trials={args.concurrency}", "train.early_stopping_patience=null",
                  f"train.storage_path={tmp}/runs", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                  "train.cpus_per_worker=0.5", *args.overrides]
        full = run(load_config(args.config, [*common, "tune.asha=false"]), "bench-full")
        asha = run(load_config(args.config, [*common, "tune.asha=true"]), "bench-asha")

    result = {
        "config": args.config, "samples": args.samples, "max_epochs": args.epochs, "concurrency": args.concurrency,
        "asha": asha, "full": full, "time_ratio": round(asha["seconds"] / full["seconds"], 3),
        "accuracy_gap": round(full["best_val_accuracy"] - asha["best_val_accuracy"], 4),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    # The sweep may run fewer at once than asked (see hotdog_ray.tune.fit_concurrency); its log says so.
    print(f"sweep of {args.samples} trials x up to {args.epochs} epochs, up to {args.concurrency} at a time "
          f"({args.config})")
    for name, r in (("every trial to the end", full), ("ASHA", asha)):
        print(f"  {name:<24}{r['seconds']:>8.1f} s  {r['epochs_trained']:>4} epochs  "
              f"best val_accuracy {r['best_val_accuracy']:.4f}  stopped early {r['stopped_early']}")
    print(f"  time ratio (ASHA / full)  {result['time_ratio']:.3f}")
    print(f"  accuracy gap (full - ASHA) {result['accuracy_gap']:+.4f}")


if __name__ == "__main__":
    main()
