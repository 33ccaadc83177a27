"""The ``hotdog`` command line: one subcommand per stage, all sharing ``--config`` and ``--set``.

Each command imports its stage inside its function: ``hotdog --help`` must answer at once, without
torch, Ray or MLflow.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING, Any, Callable

from hotdog_ray import __version__
from hotdog_ray.errors import HotdogError

if TYPE_CHECKING:
    from hotdog_ray.config import Config

log = logging.getLogger("hotdog_ray")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and repeatable ``--set section.key=value``."""
    parser.add_argument("--config", "-c", help="YAML preset (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set data.image_size=64 (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> "Config":
    from hotdog_ray.config import load_config

    return load_config(args.config, args.overrides)


def refuse_lost_results(cfg: "Config", command: str) -> None:
    """Under ``ray job submit --working-dir``, stop before any work if the job's results would be
    written into Ray's temporary copy of the working directory (or its data was never uploaded)."""
    from hotdog_ray.errors import ConfigError
    from hotdog_ray.runtime import lost_results

    problems = lost_results(cfg, command)
    if problems:
        raise ConfigError(
            "this job runs from Ray's copy of its working directory (ray job submit --working-dir) "
            "and would lose its results or miss its data:\n  - " + "\n  - ".join(problems)
        )


# ---------------------------------------------------------------------------------------------


def cmd_sample(args: argparse.Namespace) -> int:
    from hotdog_ray.prepare import write_sample

    counts = write_sample(args.dest, seed=args.seed)
    print(f"wrote {sum(counts.values())} digit images to {args.dest}: {counts}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from hotdog_ray.prepare import prepare

    classes = args.classes.split(",") if args.classes else None
    counts = prepare(
        args.src,
        args.dest,
        layout=args.layout,
        ratios=args.ratios,
        val_ratio=args.val_ratio,
        classes=classes,
        seed=args.seed,
    )
    print(f"wrote {sum(counts.values())} files to {args.dest}: {counts}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from hotdog_ray.data import discover, inspect
    from hotdog_ray.runtime import init_ray, show_progress_bars

    cfg = config_from_args(args)
    show_progress_bars(args.progress)
    root = args.uri or cfg.data.root
    discover(cfg.data, required=(), root=root)  # fail fast, before Ray starts
    init_ray()
    report = inspect(cfg.data, root=root, progress_interval_s=cfg.monitor.progress_interval_s)
    print(json.dumps(report, indent=2) if args.json else format_inspect(report))
    return 0


def format_inspect(report: dict[str, Any]) -> str:
    """The inspect report as a table a person reads in a terminal."""
    lines = [
        f"dataset {report['root']}: {report['images']} images in {report['num_classes']} classes, "
        f"{report['unreadable']} unreadable",
        "",
        f"{'split':<11}{'images':>8}{'unreadable':>12}  {'majority class':<18}{'share':>7}  size range (WxH)",
    ]
    for split, rep in report["splits"].items():
        lo, hi = rep["min_size"], rep["max_size"]
        size = f"{lo[0]}x{lo[1]} .. {hi[0]}x{hi[1]}" if lo else "-"
        lines.append(
            f"{split:<11}{rep['images']:>8}{rep['unreadable_count']:>12}  {str(rep['majority_class']):<18}"
            f"{rep['majority_share']:>7.1%}  {size}"
        )
    width = max(8, *(len(c) + 2 for c in report["classes"]))
    lines += ["", "images per class:", f"{'class':<{width}}" + "".join(f"{s:>12}" for s in report["splits"])]
    for c in report["classes"]:
        lines.append(f"{c:<{width}}" + "".join(f"{r['counts'][c]:>12}" for r in report["splits"].values()))
    for split, rep in report["splits"].items():
        if rep["majority_share"] >= 0.6:
            lines.append(
                f"\nnote: always answering {rep['majority_class']!r} scores {rep['majority_share']:.1%} on "
                f"{split}; judge accuracy against that baseline (balanced accuracy does not flatter it)"
            )
    bad = [u for r in report["splits"].values() for u in r["unreadable"]]
    if bad:
        lines.append(f"\nunreadable files ({len(bad)}, skipped by training):")
        lines += [f"  {u['path']}: {u['reason']}" for u in bad[:20]]
        if len(bad) > 20:
            lines.append(f"  ... and {len(bad) - 20} more (--json lists all)")
    return "\n".join(lines)


def cmd_cache(args: argparse.Namespace) -> int:
    from hotdog_ray import cache

    root = cache.cache_root(config_from_args(args))
    if args.action == "rm":
        if not args.keys:
            raise HotdogError("hotdog cache rm: name the cache(s) to remove (hotdog cache ls lists them)")
        freed = sum(cache.remove(root, key) for key in args.keys)
        print(f"removed {len(args.keys)} cache(s), {freed / 1e6:.1f} MB")
        return 0
    rows = cache.list_caches(root)
    print(json.dumps(rows, indent=2) if args.json else cache.format_caches(rows, root.uri))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from hotdog_ray.evaluate import format_report
    from hotdog_ray.registry import tracking_uri
    from hotdog_ray.train import run_training

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
    from hotdog_ray.models import zoo_table

    rows = zoo_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'model':<12}{'input':>7}{'classes':>9}{'parameters':>13}{'trainable':>12}  {'width key':<18}source"
    )
    for r in rows:
        print(
            f"{r['name']:<12}{r['image_size']:>7}{r['num_classes']:>9}{r['parameters']:>13,}{r['trainable']:>12,}  "
            f"{r['width_key']:<18}{r['source']}"
        )
    print(
        "\nwidth key: the setting tune.filters searches; model.filters is a recipe CNN's base convolution width, "
        "model.head_units the units of a transfer model's new dense head"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from hotdog_ray.evaluate import evaluate_model, format_report
    from hotdog_ray.registry import default_model_ref, load_model

    cfg = config_from_args(args)
    bundle = load_model(cfg.tracking, args.model or default_model_ref(cfg.tracking))
    metrics = evaluate_model(cfg, bundle, root=args.data, split=args.split)
    print(json.dumps(metrics, indent=2) if args.json else format_report(metrics))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from hotdog_ray.registry import tracking_uri
    from hotdog_ray.tune import epochs_saved, format_trials, max_epochs, run_sweep

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


def cmd_promote(args: argparse.Namespace) -> int:
    from hotdog_ray import promote

    cfg = config_from_args(args)
    if args.challenger or args.clear_challenger:
        version = promote.set_challenger(cfg, None if args.clear_challenger else args.challenger)
        name, alias = cfg.tracking.registered_model, cfg.tracking.challenger_alias
        print(f"{name}@{alias} is version {version}" if version else f"{name}@{alias} removed")
        return 0
    if args.force:
        decision = promote.force(cfg, args.force)
    else:
        decision = promote.promote(cfg, args.run, data_root=args.data)
    print(
        json.dumps(decision.as_dict(), indent=2)
        if args.json
        else f"{'promoted' if decision.promoted else 'kept the champion'}: {decision.reason}; "
        f"{cfg.tracking.registered_model}@{cfg.tracking.alias} is version {decision.version}"
    )
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    from hotdog_ray import registry, rollout
    from hotdog_ray.errors import ModelError
    from hotdog_ray.score import run_date

    cfg = config_from_args(args)
    t = cfg.tracking
    champion, challenger = registry.alias_version(t), registry.alias_version(t, t.challenger_alias)
    if champion is None or challenger is None:
        raise ModelError(
            f"{t.registered_model} needs both aliases {t.alias!r} and {t.challenger_alias!r} for a rollout "
            f"(champion: {champion}, challenger: {challenger}); see hotdog promote --challenger"
        )
    # The replicas' own running figures, unless a period is asked for: that comes from the
    # prediction log, which also gives each version's accuracy where feedback came in.
    accuracy = None
    if args.since or cfg.serve.prediction_log:
        since = run_date(args.since).isoformat() if args.since else None
        from_log, accuracy = rollout.from_prediction_log(cfg, champion, challenger, since)
    stats = from_log if args.since else rollout.report(cfg, champion, challenger)
    allowed, why = rollout.gate(cfg, stats)
    out = {
        "champion": champion,
        "challenger": challenger,
        "since": args.since,
        **stats.summary(),
        "accuracy": accuracy,
        "promotable": allowed,
        "why": why,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"{t.registered_model}: champion version {champion}, challenger version {challenger}")
    print(
        f"  requests {out['requests']} (champion {out['served_by_champion']}, challenger "
        f"{out['served_by_challenger']}), shadowed {out['shadowed']}, agreement {fmt(out['agreement'], '.3f')}"
    )
    for role in rollout.ROLES:
        labelled = (
            f", accuracy {fmt(accuracy[role]['accuracy'], '.3f')} on {accuracy[role]['labelled']} labelled"
            if accuracy
            else ""
        )
        print(
            f"  {role:<11} p50 latency {fmt(out['p50_latency_ms'][role], '.2f')} ms, "
            f"median confidence {fmt(out['median_confidence'][role], '.3f')}{labelled}"
        )
    print(f"  {'promotable' if allowed else 'not promotable'}: {why}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    import datetime

    from hotdog_ray.tracking import recent_runs

    rows = recent_runs(config_from_args(args).tracking, args.limit)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    print(
        f"{'started':<17}{'kind':<7}{'status':<10}{'val_loss':>9}{'val_acc':>9}{'test_bal':>9}  {'name':<40}run id"
    )
    for r in rows:
        start = datetime.datetime.fromtimestamp(r["start"] / 1000).strftime("%Y-%m-%d %H:%M")
        print(
            f"{start:<17}{r['kind']:<7}{r['status']:<10}{fmt(r['val_loss']):>9}{fmt(r['val_accuracy']):>9}"
            f"{fmt(r['test_balanced_accuracy']):>9}  {r['name'][:39]:<40}{r['run_id']}"
        )
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from hotdog_ray.runtime import show_progress_bars
    from hotdog_ray.score import score

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
        import time

        log.info(
            "keeping the job's metrics up %g s for Prometheus (monitor.metrics_linger_s)",
            cfg.monitor.metrics_linger_s,
        )
        time.sleep(cfg.monitor.metrics_linger_s)
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    from hotdog_ray.drift import check
    from hotdog_ray.score import run_date

    report = check(config_from_args(args), run_date(args.date).isoformat(), args.source)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 3 if report.flagged else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from hotdog_ray import serve

    cfg = config_from_args(args)
    if args.model:
        cfg.serve.model_uri = args.model
    serve.run(cfg)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from hotdog_ray.config import dump_config

    print(dump_config(config_from_args(args)), end="")
    return 0


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from hotdog_ray.prepare import LAYOUTS  # numpy and pyarrow only: --help stays well under a second

    parser = argparse.ArgumentParser(prog="hotdog", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"hotdog-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, fn: Callable[[argparse.Namespace], int], help: str, config: bool = False):
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        if config:
            add_config_args(p)
        return p

    p = command("sample", cmd_sample, "write the bundled sample dataset (scikit-learn digits) as PNG folders")
    p.add_argument("dest", help="destination folder or URI (s3://bucket/prefix)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified split")

    p = command(
        "prepare", cmd_prepare, "turn a recipe tutorial's raw layout into train/validation/test folders"
    )
    p.add_argument("src", help="source folder or URI")
    p.add_argument("dest", help="destination folder or URI (must be empty)")
    p.add_argument("--layout", required=True, choices=LAYOUTS)
    p.add_argument(
        "--ratios",
        default="0.8,0.1,0.1",
        help="train,validation[,test] shares (split-folders, filename-labels)",
    )
    p.add_argument(
        "--val-ratio", type=float, default=0.15, help="validation share carved from train (food101)"
    )
    p.add_argument("--classes", help="comma-separated classes expected in file names (filename-labels)")
    p.add_argument("--seed", type=int, default=0)

    p = command(
        "inspect",
        cmd_inspect,
        "class counts, unreadable files, sizes and majority baseline of a dataset",
        True,
    )
    p.add_argument("uri", nargs="?", help="dataset root (default: data.root of the config)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--progress", action="store_true", help="Ray Data's progress bars, for a terminal")

    p = command(
        "train", cmd_train, "train a model with Ray Train, track it in MLflow, evaluate on test", True
    )
    p.add_argument("--run-name", help="rerunning a name resumes it from its latest checkpoint")
    p.add_argument("--no-register", action="store_true", help="do not register the model version")

    p = command("cache", cmd_cache, "list (ls) or remove (rm) decoded-image caches, with their size", True)
    p.add_argument("action", choices=["ls", "rm"])
    p.add_argument("keys", nargs="*", help="rm: the caches' keys (a unique prefix will do)")
    p.add_argument("--json", action="store_true", help="ls: machine-readable output")

    p = command("models", cmd_models, "list the model zoo with parameter counts at the recipes' sizes")
    p.add_argument("--json", action="store_true")

    p = command("evaluate", cmd_evaluate, "test-split metrics of a registered model, run or bundle", True)
    p.add_argument(
        "--model",
        help="models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID (default: the alias tracking.alias, else the newest version)",
    )
    p.add_argument("--data", help="dataset root (default: data.root)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--json", action="store_true")

    p = command(
        "tune",
        cmd_tune,
        "search filters, dropout and learning rate with Ray Tune and ASHA; promote the best",
        True,
    )
    p.add_argument("--name", help="sweep name (default: tune.name, else a new one)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep of that name")
    p.add_argument("--no-promote", action="store_true", help="do not evaluate and promote the best trial")

    p = command(
        "promote",
        cmd_promote,
        "move the registry alias to a run's model if it beats the champion on test",
        True,
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="MLflow run id whose logged model is the candidate")
    which.add_argument(
        "--force", metavar="VERSION", help="point the alias at this version without evaluating"
    )
    which.add_argument(
        "--challenger",
        metavar="VERSION",
        help="point tracking.challenger_alias at this version: serve.rollout tries it on live traffic",
    )
    which.add_argument("--clear-challenger", action="store_true", help="remove the challenger alias")
    p.add_argument("--data", help="dataset root for the comparison (default: data.root)")
    p.add_argument("--json", action="store_true")

    p = command(
        "rollout", cmd_rollout, "the challenger against the champion on live traffic (serve.rollout)", True
    )
    p.add_argument("action", choices=["report"], help="report: every replica's figures, added up")
    p.add_argument(
        "--since",
        help="YYYY-MM-DD, today or yesterday (UTC): figures of those days only, from serve.prediction_log",
    )
    p.add_argument("--json", action="store_true")
    p = command("runs", cmd_runs, "recent training runs, sweeps and trials with their key metrics", True)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")

    p = command(
        "score", cmd_score, "score a night's images with the promoted model into a Parquet partition", True
    )
    p.add_argument(
        "--input", help="prefix or list file of images; {date} becomes the run date (default: score.input)"
    )
    p.add_argument("--output", help="Parquet root, gets date=YYYY-MM-DD/ (default: score.output)")
    p.add_argument("--date", help="run date: YYYY-MM-DD to backfill, today (default) or yesterday; UTC")
    p.add_argument("--model", help="model to score with (default: serve.model_uri, else the registry alias)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--progress", action="store_true", help="Ray Data's progress bars, for a terminal")

    p = command(
        "drift",
        cmd_drift,
        "compare a day's answers with the model's validation profile (PSI); exit 3 when flagged",
        True,
    )
    p.add_argument("--date", help="YYYY-MM-DD, today (default) or yesterday; UTC")
    p.add_argument(
        "--source",
        choices=["predictions", "scores"],
        default="predictions",
        help="the prediction log (serve.prediction_log) or the nightly scores (score.output)",
    )
    p.add_argument("--json", action="store_true")

    p = command(
        "serve",
        cmd_serve,
        "serve the promoted model over HTTP with Ray Serve (API, web page, hot reload)",
        True,
    )
    p.add_argument("--model", help="model to serve instead of serve.model_uri (default: the registry alias)")

    command("config", cmd_config, "print the resolved config as YAML", True)
    return parser


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.fn(args)
    except HotdogError as exc:
        print(f"hotdog {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hotdog {args.command}: interrupted", file=sys.stderr)
        return 130  # the shell's code for a command stopped by Ctrl-C


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
