"""Datasets into the folder layout ``<dest>/{train,validation,test}/<class>/<file>``.

* :func:`write_sample`: scikit-learn's handwritten digits (1,797 real 8x8 scans, bundled with
  scikit-learn, no download) as PNG files, split once with a fixed stratified split.
* :func:`prepare`: the raw layouts of the recipe tutorials, split deterministically by a random seed.

Every destination may be a local path or an object-store URI.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import random
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import numpy as np
from PIL import Image

from hotdog_ray import storage
from hotdog_ray.errors import PrepareError

log = logging.getLogger(__name__)

LAYOUTS: tuple[str, ...] = ("split-folders", "food101", "filename-labels")

# (split, class, file name) -> bytes, or a source path to copy.
Plan = list[tuple[str, str, str, "bytes | str"]]


def parse_ratios(text: str | Iterable[float]) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` (train, validation, test) -> floats that sum to 1; test may be omitted."""
    parts = [float(x) for x in text.split(",")] if isinstance(text, str) else [float(x) for x in text]
    if len(parts) == 2:
        parts.append(0.0)
    if len(parts) != 3 or any(p < 0 for p in parts):
        raise PrepareError(f"ratios {text!r}: expected train,validation[,test], each >= 0")
    if abs(sum(parts) - 1.0) > 1e-6:
        raise PrepareError(f"ratios {text!r} sum to {sum(parts):g}, not 1")
    if parts[0] == 0:
        raise PrepareError(f"ratios {text!r}: the train share must be above 0")
    return parts[0], parts[1], parts[2]


def split_items(items: list[str], ratios: tuple[float, float, float], seed: int) -> dict[str, list[str]]:
    """Shuffle ``items`` deterministically and cut them into train/validation/test by ``ratios``."""
    items = sorted(items)
    random.Random(seed).shuffle(items)
    n = len(items)
    n_val = round(n * ratios[1])
    n_test = round(n * ratios[2])
    out = {
        "validation": items[:n_val],
        "test": items[n_val : n_val + n_test],
        "train": items[n_val + n_test :],
    }
    return {k: v for k, v in out.items() if v}


def _write_plan(src_fs, dest: storage.Location, plan: Plan, workers: int = 16) -> dict[str, int]:
    """Write every planned file (bytes, or a path on ``src_fs`` to copy); returns counts per split."""

    def one(item: tuple[str, str, str, bytes | str]) -> None:
        split, cls, name, payload = item
        data = payload if isinstance(payload, bytes) else storage.read_bytes(src_fs, payload)
        storage.write_bytes(dest.fs, posixpath.join(dest.path, split, cls, name), data)

    # Object stores are latency-bound: many small PUTs in parallel.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, _ in enumerate(pool.map(one, plan), 1):
            if done % 2000 == 0:
                log.info("wrote %d/%d files", done, len(plan))
    counts: dict[str, int] = defaultdict(int)
    for split, *_ in plan:
        counts[split] += 1
    log.info("wrote %d files to %s: %s", len(plan), dest.uri, dict(counts))
    return dict(counts)


def _check_dest_empty(dest: storage.Location) -> None:
    if storage.list_files(dest):
        raise PrepareError(f"destination {dest.uri} is not empty; choose a new folder or prefix")


# ---------------------------------------------------------------------------------------------
# The bundled sample


def sample_plan(seed: int = 0, ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> Plan:
    """The digits as 8x8 grayscale PNGs, stratified into train/validation/test."""

    # scikit-learn only for the sample: the CLI's parser reads this module's LAYOUTS, and --help
    # must not wait a second and a half for it.
    from sklearn.datasets import load_digits  # noqa: PLC0415 - only for the sample; --help stays fast
    from sklearn.model_selection import train_test_split  # noqa: PLC0415 - only for the sample

    digits = load_digits()
    # Scans hold 0..16; stretch to the full 8-bit range so the PNGs look like what they are.
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    index = np.arange(len(pixels))
    train_idx, rest = train_test_split(index, train_size=ratios[0], stratify=digits.target, random_state=seed)
    val_share = ratios[1] / (ratios[1] + ratios[2])
    val_idx, test_idx = train_test_split(
        rest, train_size=val_share, stratify=digits.target[rest], random_state=seed
    )
    plan: Plan = []
    for split, idx in (("train", train_idx), ("validation", val_idx), ("test", test_idx)):
        for i in sorted(idx):
            buf = io.BytesIO()
            Image.fromarray(pixels[i]).save(buf, format="PNG")
            plan.append((split, str(digits.target[i]), f"digit_{i:04d}.png", buf.getvalue()))
    return plan


def write_sample(dest_uri: str, *, seed: int = 0) -> dict[str, int]:
    """Write the digits sample under ``dest_uri``; returns image counts per split.

    Rerunning over an earlier sample is fine (the files are rewritten byte for byte); a
    destination holding anything else is refused.
    """
    dest = storage.resolve(dest_uri)
    plan = sample_plan(seed)
    ours = {posixpath.join(dest.path, split, cls, name) for split, cls, name, _ in plan}
    foreign = [p for p in storage.list_files(dest) if p not in ours]
    if foreign:
        raise PrepareError(
            f"destination {dest.uri} holds other files ({foreign[0]}, ...); choose a new folder"
        )
    return _write_plan(None, dest, plan)


# ---------------------------------------------------------------------------------------------
# The recipes' raw layouts


def plan_split_folders(src: storage.Location, ratios: tuple[float, float, float], seed: int) -> Plan:
    """``<src>/<class>/*``: split each class by ``ratios`` (cats vs dogs' organize_datasets)."""
    classes = storage.list_dirs(src)
    if len(classes) < 2:
        raise PrepareError(f"{src.uri}: expected one folder per class, found {classes}")
    plan: Plan = []
    for cls in classes:
        files = storage.list_files(src.join(cls))
        for split, paths in split_items(files, ratios, seed).items():
            plan.extend((split, cls, posixpath.basename(p), p) for p in paths)
    return plan


def plan_food101(src: storage.Location, val_ratio: float, seed: int) -> Plan:
    """``<src>/images/<class>/<id>.jpg`` with ``meta/{train,test}.json``; validation carved from train."""
    if not 0 <= val_ratio < 1:
        raise PrepareError(f"validation ratio {val_ratio} must be in [0, 1)")
    meta: dict[str, dict[str, list[str]]] = {}
    for part in ("train", "test"):
        path = posixpath.join(src.path, "meta", f"{part}.json")
        try:
            meta[part] = json.loads(storage.read_bytes(src.fs, path))
        except FileNotFoundError:
            raise PrepareError(f"{src.uri}: meta/{part}.json is missing (not a Food-101 layout)") from None
        except json.JSONDecodeError as exc:
            raise PrepareError(f"{src.uri}: meta/{part}.json is not valid JSON: {exc}") from None
    plan: Plan = []
    for part, by_class in meta.items():
        for cls, ids in sorted(by_class.items()):
            # Ids are "<class>/<number>" without the extension, as in the recipe.
            files = [posixpath.join(src.path, "images", f"{i}.jpg") for i in ids]
            splits = (
                split_items(files, (1 - val_ratio, val_ratio, 0.0), seed)
                if part == "train"
                else {"test": files}
            )
            for split, paths in splits.items():
                plan.extend((split, cls, posixpath.basename(p), p) for p in paths)
    return plan


def class_from_filename(name: str) -> str:
    """``cat.123.jpg`` -> ``cat`` (Kaggle's cats-vs-dogs naming)."""
    stem = name.split(".", 1)[0] if "." in name else ""
    return stem.strip()


def plan_filename_labels(
    src: storage.Location, ratios: tuple[float, float, float], seed: int, classes: list[str] | None
) -> Plan:
    """A flat folder whose file names start with the class (``cat.1.jpg``), split per class."""
    by_class: dict[str, list[str]] = defaultdict(list)
    for path in storage.list_files(src):
        name = posixpath.basename(path)
        cls = class_from_filename(name)
        if not cls or "." not in name:
            raise PrepareError(f"{path}: no class in the file name (expected <class>.<id>.<ext>)")
        if classes is not None and cls not in classes:
            raise PrepareError(f"{path}: class {cls!r} is not one of {classes}")
        by_class[cls].append(path)
    if len(by_class) < 2:
        raise PrepareError(f"{src.uri}: found classes {sorted(by_class)}; need at least two")
    plan: Plan = []
    for cls, files in sorted(by_class.items()):
        for split, paths in split_items(files, ratios, seed).items():
            plan.extend((split, cls, posixpath.basename(p), p) for p in paths)
    return plan


def prepare(
    src_uri: str,
    dest_uri: str,
    *,
    layout: str,
    ratios: str | tuple[float, float, float] = "0.8,0.1,0.1",
    val_ratio: float = 0.15,
    classes: list[str] | None = None,
    seed: int = 0,
) -> dict[str, int]:
    """Turn the raw layout at ``src_uri`` into the folder layout at ``dest_uri``."""
    if layout not in LAYOUTS:
        raise PrepareError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    src = storage.check_exists(src_uri, kind="source")
    dest = storage.resolve(dest_uri)
    _check_dest_empty(dest)
    if layout == "split-folders":
        plan = plan_split_folders(src, parse_ratios(ratios), seed)
    elif layout == "food101":
        plan = plan_food101(src, val_ratio, seed)
    else:
        plan = plan_filename_labels(src, parse_ratios(ratios), seed, classes)
    if not plan:
        raise PrepareError(f"{src.uri}: no files found")
    return _write_plan(src.fs, dest, plan)
