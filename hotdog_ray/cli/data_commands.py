"""``hotdog sample``, ``prepare``, ``inspect`` and ``cache``: datasets and their decoded caches."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from hotdog_ray import cache
from hotdog_ray.cli.common import config_from_args
from hotdog_ray.data import discover
from hotdog_ray.errors import HotdogError
from hotdog_ray.inspection import inspect
from hotdog_ray.prepare import prepare, write_sample
from hotdog_ray.runtime import init_ray, show_progress_bars
from hotdog_ray.tables import render

log = logging.getLogger("hotdog_ray")


def cmd_sample(args: argparse.Namespace) -> int:

    counts = write_sample(args.dest, seed=args.seed)
    print(f"wrote {sum(counts.values())} digit images to {args.dest}: {counts}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:

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
        render(
            ["split", "images", "unreadable", "majority class", "share", "size range (WxH)"],
            (
                [split, rep["images"], rep["unreadable_count"], rep["majority_class"]]
                + [f"{rep['majority_share']:.1%}", _size_range(rep["min_size"], rep["max_size"])]
                for split, rep in report["splits"].items()
            ),
        ),
        "",
        render(
            ["class", *report["splits"]],
            ([c, *(r["counts"][c] for r in report["splits"].values())] for c in report["classes"]),
            title="images per class",
        ),
    ]
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


def _size_range(lo: list[int] | None, hi: list[int] | None) -> str | None:
    return f"{lo[0]}x{lo[1]} .. {hi[0]}x{hi[1]}" if lo and hi else None


def cmd_cache(args: argparse.Namespace) -> int:

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
