"""The ``hotdog`` command line (:mod:`hotdog_ray.cli.main`); each command group in a module of its own."""

from hotdog_ray.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
