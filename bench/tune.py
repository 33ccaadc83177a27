"""Sweep wall time: ASHA against running every trial to the end, over several sampler seeds.

For each seed both sweeps sample the same trials (same sampler seed, same training seed) from the
same config; the only difference is the scheduler. Which trial reaches a rung first depends on
timing when trials run side by side, so one run says little: ``--seeds`` (or ``--repeats N``, seeds
1..N) repeats the comparison and prints per seed the time ratio, the epochs trained, whether ASHA
kept the best trial (the highest val_accuracy of the full sweep) and the chosen one (lowest
val_loss), then per scheduler setting the median and worst ratio and the share of seeds that kept the
best trial. ``--variant NAME=KEY=VALUE,KEY=VALUE`` adds ASHA settings to compare on the same seeds
(the full sweeps are run once per seed and shared). Optionally, in the same run: the ASHA sweep with
Optuna's TPE sampler (``--optuna``) and the full sweep with every trial a Ray Train run
(``--train-mode``), on the first seed.

    hotdog sample data/sample   # once
    python bench/tune.py --samples 8 --epochs 12 --repeats 5 --set 'tune.filters=[16,32]' \
        --variant 'grace 1, reduction 2=tune.grace_period=1,tune.reduction_factor=2'
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def run(cfg, name: str) -> dict:
    from hotdog_ray.tune import run_sweep

    t0 = time.perf_counter()
    out = run_sweep(cfg, name=name, promote=False)
    seconds = time.perf_counter() - t0
    finished = [t for t in out.trials if t["status"] == "finished"]
    best = max(finished, key=lambda t: t["best_val_accuracy"] or 0.0)
    best_acc = best["best_val_accuracy"] or 0.0
    return {
        "best_trial": {"params": best["params"]},
        "chosen_trial": {"params": out.best["params"]},
        "seconds": round(seconds, 1),
        "best_val_accuracy": round(best_acc, 4),
        # the trial the sweep picks (lowest val_loss): the one promotion evaluates
        "chosen_val_accuracy": round(out.best["best_val_accuracy"] or 0.0, 4),
        "best_val_loss": round(out.best["best_val_loss"], 4),
        "stopped_early": out.stopped_early,
        "epochs_trained": sum(t["epochs"] for t in out.trials),
        "trials": [
            {k: t[k] for k in ("trial_id", "status", "epochs", "best_val_loss", "params", "curve")}
            for t in out.trials
        ],
    }


def kept(full: dict, asha: dict) -> dict:
    """Did the ASHA sweep keep the full sweep's best trial (same params, finished) and pick the same one?"""

    def params(t: dict) -> str:
        return json.dumps(t["params"], sort_keys=True)

    finished = {params(t) for t in asha["trials"] if t["status"] == "finished"}
    return {
        "time_ratio": round(asha["seconds"] / full["seconds"], 3),
        "epoch_ratio": round(asha["epochs_trained"] / full["epochs_trained"], 3),
        # the best trial itself, or one as good (equal accuracies are common on 270 validation images)
        "kept_best": params(full["best_trial"]) in finished
        or asha["best_val_accuracy"] >= full["best_val_accuracy"],
        "same_chosen": params(full["chosen_trial"]) == params(asha["chosen_trial"]),
        "accuracy_lost": round(max(0.0, full["best_val_accuracy"] - asha["best_val_accuracy"]), 4),
    }


def summarize(rows: list[dict]) -> dict:
    ratios = [r["time_ratio"] for r in rows]
    return {
        "median_time_ratio": round(statistics.median(ratios), 3),
        "worst_time_ratio": max(ratios),
        "median_epoch_ratio": round(statistics.median(r["epoch_ratio"] for r in rows), 3),
        "kept_best": f"{sum(r['kept_best'] for r in rows)}/{len(rows)}",
        "same_chosen": f"{sum(r['same_chosen'] for r in rows)}/{len(rows)}",
        "max_accuracy_lost": max(r["accuracy_lost"] for r in rows),
    }


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, settings = text.partition("=")
    if not settings:
        raise SystemExit(f"--variant {text!r}: expected NAME=KEY=VALUE[,KEY=VALUE...]")
    return name, ["tune.asha=true", *settings.split(",")]


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
    ap.add_argument("--seeds", type=int, nargs="+", help="sampler seeds to repeat the comparison over")
    ap.add_argument("--repeats", type=int, default=5, help="without --seeds: seeds 1..N")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=KEY=VALUE[,KEY=VALUE]",
        help="another ASHA setting to compare on the same seeds, e.g. 'grace 2=tune.grace_period=2'",
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="bench/out/tune.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    seeds = args.seeds or list(range(1, args.repeats + 1))
    variants = dict([("ASHA (defaults)", ["tune.asha=true"]), *(parse_variant(v) for v in args.variant)])

    from hotdog_ray.config import load_config
    from hotdog_ray.runtime import init_ray

    init_ray()  # before any timing: the first sweep must not pay for starting Ray
    per_seed: list[dict] = []
    extra: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:

        def sweep(seed: int, name: str, *overrides: str) -> dict:
            common = [
                f"tune.num_samples={args.samples}",
                f"train.epochs={args.epochs}",
                f"tune.max_concurrent_trials={args.concurrency}",
                f"tune.seed={seed}",
                "train.early_stopping_patience=null",
                f"train.storage_path={tmp}/runs",
                f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                "train.cpus_per_worker=0.5",
                *args.overrides,
            ]
            slug = "".join(c if c.isalnum() else "-" for c in name.lower())
            return run(load_config(args.config, [*common, *overrides]), f"bench-{seed}-{slug}")

        for seed in seeds:
            full = sweep(seed, "full", "tune.asha=false")
            row = {"seed": seed, "full": full, "variants": {}}
            for name, overrides in variants.items():
                out = sweep(seed, name, *overrides)
                row["variants"][name] = {**out, **kept(full, out)}
            per_seed.append(row)
            log_row(row)
        first = seeds[0]
        if args.optuna:
            extra["ASHA, Optuna TPE"] = sweep(
                first,
                "optuna",
                "tune.asha=true",
                "tune.sampler=optuna",
                f"tune.startup_trials={max(2, args.samples // 3)}",
            )
        if args.train_mode:
            extra["to the end, Train trials"] = sweep(
                first, "train-mode", "tune.asha=false", "tune.trial_mode=train"
            )

    summary = {name: summarize([r["variants"][name] for r in per_seed]) for name in variants}
    result = {
        "config": args.config,
        "samples": args.samples,
        "max_epochs": args.epochs,
        "concurrency": args.concurrency,
        "seeds": seeds,
        "per_seed": per_seed,
        "summary": summary,
        "extra": extra,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    # The sweep may run fewer at once than asked (see hotdog_ray.tune.fit_concurrency); its log says so.
    print(
        f"sweeps of {args.samples} trials x up to {args.epochs} epochs, up to {args.concurrency} at a time, "
        f"seeds {seeds} ({args.config}, {result['machine']})"
    )
    print(
        f"  {'seed':>4}  {'scheduler':<26}{'full s':>8}{'ours s':>8}{'ratio':>7}{'epochs':>8}  kept best  same chosen  acc lost"
    )
    for r in per_seed:
        for name, v in r["variants"].items():
            print(
                f"  {r['seed']:>4}  {name:<26}{r['full']['seconds']:>8.1f}{v['seconds']:>8.1f}{v['time_ratio']:>7.3f}"
                f"{v['epochs_trained']:>4}/{r['full']['epochs_trained']:<3}  {str(v['kept_best']):<9}  "
                f"{str(v['same_chosen']):<11}  {v['accuracy_lost']:.4f}"
            )
    for name, s in summary.items():
        print(
            f"  {name}: median time ratio {s['median_time_ratio']:.3f} (worst {s['worst_time_ratio']:.3f}), "
            f"median epochs {s['median_epoch_ratio']:.3f}, kept the best trial {s['kept_best']}, "
            f"same chosen trial {s['same_chosen']}, at most {s['max_accuracy_lost']:.4f} accuracy lost"
        )
    for name, r in extra.items():
        print(
            f"  {name} (seed {first}): {r['seconds']:.1f} s, {r['epochs_trained']} epochs, best val_accuracy {r['best_val_accuracy']:.4f}"
        )


def log_row(row: dict) -> None:
    for name, v in row["variants"].items():
        logging.getLogger("bench.tune").info(
            "seed %d %s: ratio %.3f, epochs %d/%d, kept best %s, same chosen %s",
            row["seed"],
            name,
            v["time_ratio"],
            v["epochs_trained"],
            row["full"]["epochs_trained"],
            v["kept_best"],
            v["same_chosen"],
        )


if __name__ == "__main__":
    main()
