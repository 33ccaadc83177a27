"""``hotdog inspect``: a dataset's class counts, unreadable files and image sizes, every file fully
decoded by Ray Data tasks, before any training."""

from __future__ import annotations

import logging
import posixpath
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from hotdog_ray.images import (
    decode_rows,
)
from hotdog_ray.process import Progress

if TYPE_CHECKING:
    from hotdog_ray.config import DataSettings


from hotdog_ray.data import DatasetLayout, discover, read_bytes_dataset

log = logging.getLogger(__name__)


def probe_batch(batch: dict[str, np.ndarray], *, root_path: str, max_pixels: int) -> dict[str, np.ndarray]:
    """For ``hotdog inspect``: split, class, size and error of each file (pixels fully decoded)."""
    decoded = decode_rows(batch["bytes"], size=None, max_pixels=max_pixels)
    parts = [posixpath.relpath(str(path), root_path).split("/") for path in batch["path"]]
    out = {
        "split": [rel[0] for rel in parts],
        "label": [rel[1] if len(rel) > 2 else "" for rel in parts],
        "width": decoded.sizes[:, 0],
        "height": decoded.sizes[:, 1],
        "error": decoded.errors,
        "path": [str(path) for path in batch["path"]],
    }
    return {k: np.asarray(v) for k, v in out.items()}


def inspect(
    cfg: "DataSettings", root: str | None = None, progress_interval_s: float = 30.0
) -> dict[str, Any]:
    """Per split: class counts, majority-class share, unreadable files and image size range; a
    progress line every ``progress_interval_s``."""

    layout = discover(cfg, required=(), root=root)
    paths = [p for s in layout.splits for p, _ in layout.files[s]]
    rows = read_bytes_dataset(paths, layout.root.fs, cfg.files_per_task).map_batches(
        probe_batch,
        batch_format="numpy",
        fn_kwargs={"root_path": layout.root.path, "max_pixels": cfg.max_image_pixels},
    )
    progress = Progress(len(paths), progress_interval_s, "inspected")

    def batches() -> Iterable[dict[str, np.ndarray]]:
        done = 0
        for batch in rows.iter_batches(batch_format="numpy", batch_size=1024):
            done += len(batch["path"])
            progress.update(done)
            yield batch

    return summarize(layout, batches())


def summarize(layout: DatasetLayout, batches: Iterable[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Fold probe batches into the inspect report (pure: testable without Ray)."""
    splits: dict[str, dict[str, Any]] = {
        s: {"counts": {c: 0 for c in layout.classes}, "unreadable": [], "min_size": None, "max_size": None}
        for s in layout.splits
    }
    for batch in batches:
        for split, label, w, h, err, path in zip(
            batch["split"], batch["label"], batch["width"], batch["height"], batch["error"], batch["path"]
        ):
            rep = splits[str(split)]
            if err:
                rep["unreadable"].append({"path": str(path), "reason": str(err)})
                continue
            rep["counts"][str(label)] += 1
            size = (int(w), int(h))
            rep["min_size"] = (
                size if rep["min_size"] is None else [min(a, b) for a, b in zip(rep["min_size"], size)]
            )
            rep["max_size"] = (
                size if rep["max_size"] is None else [max(a, b) for a, b in zip(rep["max_size"], size)]
            )
    total = 0
    for rep in splits.values():
        n = sum(rep["counts"].values())
        total += n
        rep["images"] = n
        majority = max(rep["counts"], key=rep["counts"].get) if n else None
        rep["majority_class"] = majority
        rep["majority_share"] = rep["counts"][majority] / n if n else 0.0
        rep["unreadable_count"] = len(rep["unreadable"])
        rep["min_size"] = list(rep["min_size"]) if rep["min_size"] else None
        rep["max_size"] = list(rep["max_size"]) if rep["max_size"] else None
    return {
        "root": layout.root.uri,
        "classes": layout.classes,
        "num_classes": len(layout.classes),
        "images": total,
        "unreadable": sum(r["unreadable_count"] for r in splits.values()),
        "splits": splits,
    }
