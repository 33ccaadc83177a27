"""What every command shares: the config from ``--config``/``--set``, and the working-directory check."""

from __future__ import annotations

import argparse

from hotdog_ray.config import Config, dump_config, load_config
from hotdog_ray.errors import ConfigError
from hotdog_ray.process import lost_results
from hotdog_ray.registry import check_store
from hotdog_ray.server import preflight


def config_from_args(args: argparse.Namespace) -> Config:
    """The config of ``--config`` and ``--set``, loaded once a command: its preflight and the
    command itself share it (and a moved key's warning is said once)."""
    if getattr(args, "loaded_config", None) is None:
        args.loaded_config = load_config(args.config, args.overrides)
    return args.loaded_config


def check_store_of(args: argparse.Namespace) -> None:
    """For a command that uses the MLflow store: a one-line error within seconds when the store of
    its config cannot work (see :func:`hotdog_ray.registry.check_store`)."""
    check_store(config_from_args(args).tracking)


def check_serve(args: argparse.Namespace) -> None:
    """``hotdog serve``'s checks before Ray starts: the store answers, the port is free, and a
    model to serve (a warning)."""
    check_store_of(args)
    cfg = config_from_args(args)
    if args.model:
        cfg.serve.model_uri = args.model
    preflight.check(cfg)


def refuse_lost_results(cfg: Config, command: str) -> None:
    """Under ``ray job submit --working-dir``, stop before any work if the job's results would be
    written into Ray's temporary copy of the working directory (or its data was never uploaded)."""
    problems = lost_results(cfg, command)
    if problems:
        raise ConfigError(
            "this job runs from Ray's copy of its working directory (ray job submit --working-dir) "
            "and would lose its results or miss its data:\n  - " + "\n  - ".join(problems)
        )


def cmd_config(args: argparse.Namespace) -> int:
    """``hotdog config``: the resolved config as YAML."""
    print(dump_config(config_from_args(args)), end="")
    return 0
