"""The ``hotdog`` command line: one subcommand per stage, all sharing ``--config`` and ``--set``.

A command's module is imported only when that command runs, so ``hotdog --help`` answers at once,
without torch, Ray or MLflow.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import NoReturn

from hotdog_ray import __version__
from hotdog_ray.errors import HotdogError
from hotdog_ray.prepare import LAYOUTS


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


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake said in one line that points at ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1")
    return value


# The preflight of every command that uses the MLflow store: the store answers (hotdog_ray.registry.check_store).
STORE = "common:check_store_of"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hotdog", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, with Ray's and MLflow's own notices"
    )
    parser.add_argument("--version", action="version", version=f"hotdog-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def command(
        name: str, handler: str, help: str, config: bool = False, preflight: str = ""
    ) -> argparse.ArgumentParser:
        """A subcommand; ``preflight``: ``module:function`` of its checks, run before the handler's
        module is imported (:data:`STORE` for every command that uses the MLflow store)."""
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler, preflight=preflight)
        # -v after the command too (`python jobs/train.py -v` is `hotdog train -v`)
        p.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
        )
        if config:
            add_config_args(p)
        return p

    p = command(
        "sample",
        "data_commands:cmd_sample",
        "write the bundled sample dataset (scikit-learn digits) as PNG folders",
    )
    p.add_argument("dest", help="destination folder or URI (s3://bucket/prefix)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified split")

    p = command(
        "prepare",
        "data_commands:cmd_prepare",
        "turn a recipe tutorial's raw layout into train/validation/test folders",
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
        "data_commands:cmd_inspect",
        "class counts, unreadable files, sizes and majority baseline of a dataset",
        True,
    )
    p.add_argument("uri", nargs="?", help="dataset root (default: data.root of the config)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--progress", action="store_true", help="Ray Data's progress bars, for a terminal")

    p = command(
        "train",
        "train_commands:cmd_train",
        "train a model with Ray Train, track it in MLflow, evaluate on test",
        True,
        preflight=STORE,
    )
    p.add_argument("--run-name", help="rerunning a name resumes it from its latest checkpoint")
    p.add_argument("--no-register", action="store_true", help="do not register the model version")

    p = command(
        "cache",
        "data_commands:cmd_cache",
        "list (ls) or remove (rm) decoded-image caches, with their size",
        True,
    )
    p.add_argument("action", choices=["ls", "rm"])
    p.add_argument("keys", nargs="*", help="rm: the caches' keys (a unique prefix will do)")
    p.add_argument("--json", action="store_true", help="ls: machine-readable output")

    p = command(
        "models",
        "train_commands:cmd_models",
        "list the model zoo with parameter counts at the recipes' sizes",
    )
    p.add_argument("--json", action="store_true")

    p = command(
        "evaluate",
        "train_commands:cmd_evaluate",
        "test-split metrics of a registered model, run or bundle",
        True,
        preflight=STORE,
    )
    p.add_argument(
        "--model",
        help="models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID (default: the alias tracking.alias, else the newest version)",
    )
    p.add_argument("--data", help="dataset root (default: data.root)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--json", action="store_true")

    p = command(
        "tune",
        "train_commands:cmd_tune",
        "search filters, dropout and learning rate with Ray Tune and ASHA; promote the best",
        True,
        preflight=STORE,
    )
    p.add_argument("--name", help="sweep name (default: tune.name, else a new one)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep of that name")
    p.add_argument("--no-promote", action="store_true", help="do not evaluate and promote the best trial")

    p = command(
        "promote",
        "release_commands:cmd_promote",
        "move the registry alias to a run's model if it beats the champion on test",
        True,
        preflight=STORE,
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="MLflow run id whose logged model is the candidate")
    which.add_argument(
        "--force", metavar="VERSION", help="point the alias at this version without evaluating"
    )
    which.add_argument(
        "--challenger",
        metavar="VERSION",
        help="point tracking.challenger_alias at this version: rollout.mode tries it on live traffic",
    )
    which.add_argument("--clear-challenger", action="store_true", help="remove the challenger alias")
    p.add_argument("--data", help="dataset root for the comparison (default: data.root)")
    p.add_argument("--json", action="store_true")

    p = command(
        "feedback",
        "release_commands:cmd_feedback",
        "export the prediction log's labelled answers into a dated dataset folder (data.extra_roots)",
        True,
    )
    p.add_argument("action", choices=["export"])
    p.add_argument("--json", action="store_true")

    p = command(
        "retrain",
        "release_commands:cmd_retrain",
        "if new labels or drift call for it, fine-tune the champion on them into the challenger",
        True,
        preflight=STORE,
    )
    p.add_argument("--force", action="store_true", help="retrain whatever the triggers say")
    p.add_argument("--json", action="store_true")

    p = command(
        "loop",
        "release_commands:cmd_loop",
        "retrain if the field calls for it, shadow the candidate, gate it, promote or reject",
        True,
        preflight=STORE,
    )
    p.add_argument("--force", action="store_true", help="retrain whatever the triggers say")
    p.add_argument("--data", help="dataset root of the gate's test split (default: data.root)")
    p.add_argument("--json", action="store_true")

    p = command(
        "gate",
        "release_commands:cmd_gate",
        "check a registered version against the champion: accuracy with intervals, every class's "
        "recall, invariance, live figures (exit 4 when it fails)",
        True,
        preflight=STORE,
    )
    p.add_argument("version", help="the candidate's registry version")
    p.add_argument("--data", help="dataset root of the test split (default: data.root)")
    p.add_argument("--json", action="store_true")

    p = command(
        "rollout",
        "release_commands:cmd_rollout",
        "the challenger against the champion on live traffic (rollout.mode)",
        True,
    )
    p.add_argument("action", choices=["report"], help="report: every replica's figures, added up")
    p.add_argument(
        "--since",
        help="YYYY-MM-DD, today or yesterday (UTC): figures of those days only, from the prediction log (prediction_log.location)",
    )
    p.add_argument("--json", action="store_true")
    p = command(
        "runs",
        "tracking_commands:cmd_runs",
        "recent training runs, sweeps and trials with their key metrics",
        True,
        preflight=STORE,
    )
    p.add_argument("--limit", type=positive_int, default=20, help="at most this many rows (default: 20)")
    p.add_argument("--json", action="store_true")

    p = command(
        "score",
        "serve_commands:cmd_score",
        "score a night's images with the promoted model into a Parquet partition",
        True,
        preflight=STORE,
    )
    p.add_argument(
        "--input", help="prefix or list file of images; {date} becomes the run date (default: score.input)"
    )
    p.add_argument("--output", help="Parquet root, gets date=YYYY-MM-DD/ (default: score.output)")
    p.add_argument("--date", help="run date: YYYY-MM-DD to backfill, today (default) or yesterday; UTC")
    p.add_argument("--model", help="model to score with (default: score.model_uri, else the registry alias)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--progress", action="store_true", help="Ray Data's progress bars, for a terminal")

    p = command(
        "drift",
        "serve_commands:cmd_drift",
        "compare a day's answers with the model's validation profile (PSI); exit 3 when flagged",
        True,
        preflight=STORE,
    )
    p.add_argument("--date", help="YYYY-MM-DD, today (default) or yesterday; UTC")
    p.add_argument(
        "--source",
        choices=["predictions", "scores"],
        default="predictions",
        help="the prediction log (prediction_log.location) or the nightly scores (score.output)",
    )
    p.add_argument("--json", action="store_true")

    p = command(
        "serve",
        "serve_commands:cmd_serve",
        "serve the promoted model over HTTP with Ray Serve (API, web page, hot reload)",
        True,
        preflight="common:check_serve",
    )
    p.add_argument("--model", help="model to serve instead of serve.model_uri (default: the registry alias)")

    command("config", "common:cmd_config", "print the resolved config as YAML", True)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Runs the parsed command: its handler, ``module:function`` in this package, imported now."""
    module, _, name = args.handler.partition(":")
    if args.preflight:
        # Before the command's own module, which may take seconds to import (torch, Ray): a wrong
        # tracking.uri or a taken port then fails at once.
        check_module, _, check = args.preflight.partition(":")
        getattr(importlib.import_module(f"hotdog_ray.cli.{check_module}"), check)(args)
    handler = getattr(importlib.import_module(f"hotdog_ray.cli.{module}"), name)
    if not args.verbose:
        quiet_libraries()
    return handler(args)


# Ray's and MLflow's notices that every run would print, and that say nothing about this run: the
# token-auth notice, Ray Data's per-dataset banners and progress-bar notice, MLflow's schema migrations
# and input-example checks. At these levels by default; -v shows them all.
QUIET_LOGGERS = {
    "ray._private.authentication": logging.ERROR,
    "ray.data": logging.WARNING,
    "ray.data._internal.progress": logging.ERROR,
    "mlflow": logging.WARNING,
    "alembic": logging.WARNING,
}


def setup_logging(verbose: bool = False) -> None:
    """Our own INFO lines (DEBUG with ``-v``); the libraries' chatter only with ``-v``."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:
        # MLflow's download progress bars (tqdm, one per model load) and its log level; set before
        # Ray starts, so its workers inherit them.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        quiet_libraries()


def quiet_libraries() -> None:
    """:data:`QUIET_LOGGERS` at their levels; again after a command's module is imported, because
    Ray Data and MLflow set their loggers' levels when they are first imported."""
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return run_command(args)
    except HotdogError as exc:
        print(f"hotdog {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not type(exc).__module__.startswith("mlflow.") or args.verbose:
            raise
        # MLflow's own errors are about the store or a name in it; its message, one line (-v: the traceback).
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"hotdog {args.command}: error: MLflow: {first} (-v shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hotdog {args.command}: interrupted", file=sys.stderr)
        return 130  # the shell's code for a command stopped by Ctrl-C


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
