"""Image-folder datasets on Ray Data: ``<root>/{train,validation,test}/<class>/*``.

The layout is listed once on the driver (paths, sizes and modification times, never pixels),
checked up front and frozen into a :class:`DatasetLayout` whose sorted class list every later stage
reuses. Pixels stream through Ray Data: each task reads its share of the files as bytes
(``read_images`` fails the whole dataset on one bad file), decoded in ``map_batches`` where
unreadable files are skipped, logged and counted by a small actor. Training reads these pixels
once, into the decoded-image cache (:mod:`hotdog_ray.cache`); ``hotdog inspect``, ``hotdog
evaluate`` and the benchmarks stream them.
"""

from __future__ import annotations

import logging
import math
import posixpath
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
import ray.data
from ray.data import RandomSeedConfig
from ray.data.expressions import col

from hotdog_ray import storage
from hotdog_ray.errors import DataError
from hotdog_ray.images import (
    augment_batch,
    augmentation_seed,
    build_augmentation,
    decode_rows,
    to_model_input,
)
from hotdog_ray.runtime import on_this_node

if TYPE_CHECKING:
    import ray.data
    import torch

    from hotdog_ray.config import DataSettings

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


@dataclass
class DatasetLayout:
    """What is where: the frozen class list and each split's files with their label indices."""

    root: storage.Location
    classes: list[str]
    files: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    # (size, mtime in ns) of every listed file: what tells a decoded cache of them from a stale one.
    stats: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self.files]

    def class_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}


def select_classes(found: list[str], wanted: list[str] | None, max_classes: int | None) -> list[str]:
    """Apply the configured class subset to the sorted list of class folders found."""
    found = sorted(found)
    if wanted is not None:
        missing = sorted(set(wanted) - set(found))
        if missing:
            raise DataError(f"classes {missing} are not in the dataset (found: {found})")
        return sorted(set(wanted))
    if max_classes is not None:
        return found[:max_classes]
    return found


def discover(
    cfg: "DataSettings",
    *,
    required: Iterable[str] = ("train", "validation"),
    root: str | None = None,
) -> DatasetLayout:
    """List the dataset at ``cfg.root`` and check it, raising :class:`DataError` or
    :class:`~hotdog_ray.storage.StorageError` before any Ray work.

    The class list comes from the train split when there is one (else from all splits), sorted,
    then narrowed by ``cfg.classes`` / ``cfg.max_classes``.
    """
    loc = storage.check_exists(root or cfg.root)
    present = [s for s in SPLITS if s in storage.list_dirs(loc)]
    missing = [s for s in required if s not in present]
    if missing:
        raise DataError(
            f"dataset {loc.uri}: missing split folder(s) {missing}; expected "
            f"<root>/{{{','.join(SPLITS)}}}/<class>/<image> (found: {present or 'none'})"
        )
    class_dirs = {s: storage.list_dirs(loc.join(s)) for s in present}
    source = class_dirs["train"] if "train" in class_dirs else sorted(set().union(*class_dirs.values()))
    classes = select_classes(source, cfg.classes, cfg.max_classes)
    if len(classes) < 2:
        raise DataError(f"dataset {loc.uri}: need at least two classes, found {classes}")
    subset = cfg.classes is not None or cfg.max_classes is not None
    index = {name: i for i, name in enumerate(classes)}

    layout = DatasetLayout(root=loc, classes=classes)
    for split in present:
        unknown = sorted(set(class_dirs[split]) - set(classes))
        if unknown and not subset:
            raise DataError(f"dataset {loc.uri}: split {split!r} has classes {unknown} that train does not")
        files: list[tuple[str, int]] = []
        for name in classes:
            if name in class_dirs[split]:
                for path, size, mtime in storage.list_file_stats(loc.join(split, name)):
                    files.append((path, index[name]))
                    layout.stats[path] = (size, mtime)
        if not files:
            raise DataError(f"dataset {loc.uri}: split {split!r} has no files")
        labels = {label for _, label in files}
        if len(labels) < 2:
            raise DataError(
                f"dataset {loc.uri}: split {split!r} has only one class ({classes[labels.pop()]})"
            )
        layout.files[split] = files
        # The line Keras users know from flow_from_directory.
        log.info("%s: found %d files belonging to %d classes", split, len(files), len(labels))
    if "train" in layout.files:
        for extra in cfg.extra_roots:
            _add_extra_train(layout, extra, subset)
    return layout


def _add_extra_train(layout: DatasetLayout, root: str, subset: bool) -> None:
    """``root``'s ``train/<class>/`` images into the layout's training split (``data.extra_roots``)."""
    loc = storage.check_exists(root)
    if type(loc.fs) is not type(layout.root.fs):
        raise DataError(
            f"data.extra_roots: {loc.uri} is on another kind of store than data.root {layout.root.uri}; "
            "copy it beside the dataset"
        )
    folders = storage.list_dirs(loc.join("train")) if "train" in storage.list_dirs(loc) else []
    unknown = sorted(set(folders) - set(layout.classes))
    if unknown and not subset:
        raise DataError(f"data.extra_roots: {loc.uri}/train has classes {unknown} that data.root does not")
    index, added = layout.class_index(), 0
    for name in sorted(set(folders) & set(layout.classes)):
        for path, size, mtime in storage.list_file_stats(loc.join("train", name)):
            layout.files["train"].append((path, index[name]))
            layout.stats[path] = (size, mtime)
            added += 1
    log.info("train: %d more files from %s", added, loc.uri)


# ---------------------------------------------------------------------------------------------
# Pure batch functions: what runs inside Ray Data tasks, testable without Ray.


def label_of(path: str, class_index: dict[str, int]) -> int:
    """The label index of ``.../<class>/<file>``."""
    return class_index[posixpath.basename(posixpath.dirname(path))]


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    class_index: dict[str, int],
    size: int,
    max_pixels: int,
    transform: Callable | None = None,
    seed: int | None = None,
    epoch: int = 0,
    on_skip: Callable[[list[tuple[str, str]]], None] | None = None,
    keep_paths: bool = False,
    keep_errors: bool = False,
) -> dict[str, np.ndarray]:
    """Decode a batch of ``{"bytes", "path"}`` rows into ``image``, ``label`` and an ``ok`` flag.

    Unreadable files keep their row (a zero image, ``ok`` False) and are passed to ``on_skip``
    with the reason; the streaming datasets drop them with an Arrow filter (which keeps the column
    types even when a whole block was bad), and a consumer that asked for ``keep_errors`` drops
    them itself. Paths are strings and cannot go into torch batches, so they are kept only on
    request, as is each row's reason (``error``, "" where it decoded). With ``seed``, each image's
    augmentation is drawn from (seed, epoch, path).
    """
    decoded = decode_rows(batch["bytes"], size=size, max_pixels=max_pixels)
    images, ok = decoded.images, decoded.ok
    labels = np.asarray([label_of(p, class_index) for p in batch["path"]], np.int64)
    skipped = [(str(p), e) for p, e in zip(batch["path"], decoded.errors) if e]
    if skipped:
        for path, reason in skipped:
            log.warning("skipping %s: %s", path, reason)
        if on_skip is not None:
            on_skip(skipped)
    if transform is not None and ok.any():
        seeds = None
        if seed is not None:
            seeds = [augmentation_seed(seed, epoch, str(p)) for p, good in zip(batch["path"], ok) if good]
        images[ok] = augment_batch(images[ok], transform, seeds)
    out = {"image": images, "label": labels, "ok": ok}
    if keep_paths:
        out["path"] = np.asarray([str(p) for p in batch["path"]], dtype=object)
    if keep_errors:
        out["error"] = np.asarray(decoded.errors, dtype=object)
    return out


# ---------------------------------------------------------------------------------------------
# Ray pieces: thin wrappers around the functions above.


class SkipLog:
    """Collects unreadable files across tasks and epochs, once per path (run as a Ray actor)."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}

    def add(self, items: list[tuple[str, str]]) -> None:
        for path, reason in items:
            self.reasons.setdefault(path, reason)

    def get(self) -> dict[str, str]:
        return dict(self.reasons)


def plan_read_tasks(num_files: int, num_cpus: int, files_per_task: int) -> int:
    """How many read tasks (blocks) to split ``num_files`` into.

    Ray Data's default of ~200 read tasks suits large files; for images it makes tasks of a few
    files each whose scheduling costs more than the decoding (measured in
    bench/RESULTS.md). Tasks of ``files_per_task`` files, but at least two per CPU so every core
    stays busy and Train shards balance.
    """
    if num_files <= 0:
        return 1
    return max(1, min(num_files, max(2 * num_cpus, math.ceil(num_files / files_per_task))))


# Reads in flight per task on object stores, where each read is a round trip rather than CPU work.
REMOTE_READ_THREADS = 16


def read_files(batch: dict[str, np.ndarray], *, fs: Any, threads: int = 1) -> dict[str, np.ndarray]:
    """``{"path"}`` rows to ``{"path", "bytes"}``: each file read whole from ``fs``.

    ``threads`` > 1 overlaps the round trips of object stores (reads release the GIL).
    """
    paths = [str(p) for p in batch["path"]]
    if threads > 1 and len(paths) > 1:
        with ThreadPoolExecutor(min(threads, len(paths))) as pool:
            data = list(pool.map(lambda p: storage.read_bytes(fs, p), paths))
    else:
        data = [storage.read_bytes(fs, p) for p in paths]
    out = np.empty(len(data), dtype=object)
    out[:] = data
    return {"path": np.asarray(paths, dtype=object), "bytes": out}


def read_bytes_dataset(
    paths: list[str], fs: Any, files_per_task: int, num_cpus: float | None = None
) -> "ray.data.Dataset":
    """``{"bytes", "path"}`` rows for ``paths``, in right-sized read tasks (``num_cpus`` each, default 1).

    The paths are cut into blocks here and each task reads its block's files itself: Ray Data's
    ``read_binary_files`` spent more CPU per file on bookkeeping than decoding a small image costs
    (measured in bench/RESULTS.md). Object stores' transient errors are retried per request by the
    filesystem (``storage.s3_filesystem``); a file that stays unreadable fails the dataset rather
    than being dropped.
    """

    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    n = plan_read_tasks(len(paths), cpus, files_per_task)
    bounds = [round(i * len(paths) / n) for i in range(n + 1)]
    blocks = [pa.table({"path": pa.array(paths[a:b], pa.string())}) for a, b in zip(bounds, bounds[1:])]
    threads = 1 if isinstance(fs, pafs.LocalFileSystem) else REMOTE_READ_THREADS
    return ray.data.from_arrow(blocks).map_batches(
        read_files,
        fn_kwargs={"fs": fs, "threads": threads},
        batch_size=None,
        batch_format="numpy",
        num_cpus=1 if num_cpus is None else num_cpus,
    )


class _Reporter:
    """Picklable callback that hands skipped files to the SkipLog actor."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def __call__(self, items: list[tuple[str, str]]) -> None:

        # Waiting makes the count exact when the epoch ends; skips are rare, so this is cheap.
        try:
            ray.get(self.actor.add.remote(items), timeout=60)
        except Exception as exc:  # noqa: BLE001 - losing the tally must not fail the epoch
            log.warning("could not record %d skipped file(s) (%s): %s", len(items), type(exc).__name__, items)


class ImagePipeline:
    """Streaming Ray Data datasets for the splits of one :class:`DatasetLayout`: what the decoded
    cache is built from (:mod:`hotdog_ray.cache`), and the per-image CPU path that
    ``bench/feed.py`` measures training's feed against."""

    def __init__(self, cfg: "DataSettings", layout: DatasetLayout) -> None:
        self.cfg = cfg
        self.layout = layout
        self._skip_log: Any = None  # the SkipLog actor, started by the first dataset that drops rows

    @classmethod
    def from_config(
        cls, cfg: "DataSettings", *, required: Iterable[str] = ("train", "validation")
    ) -> "ImagePipeline":
        return cls(cfg, discover(cfg, required=required))

    def dataset(
        self,
        split: str,
        *,
        augment: bool = False,
        keep_paths: bool = False,
        shuffle_seed: int | None = None,
        epoch: int = 0,
        keep_errors: bool = False,
    ) -> "ray.data.Dataset":
        """The split as a lazy Ray dataset of ``{"image": uint8 HWC, "label"[, "path"]}`` rows.

        With ``shuffle_seed`` the files are shuffled before they are cut into read tasks, and the
        order of those tasks changes every epoch: files are listed class by class, and a model fed
        one class at a time collapses to predicting the current one. The seed also fixes every
        augmentation draw (with ``epoch``), so with ``preserve_order`` each epoch's rows are
        reproducible. ``augment`` applies the config's augmentation per image on the CPU (train only).

        Unreadable files are dropped and recorded for :meth:`skipped`; with ``keep_errors`` their
        rows stay, with the reason in an ``error`` column ("" where the file decoded), for a consumer
        that reads every row itself (the cache build) and needs no actor to tally them.
        """

        if split not in self.layout.files:
            raise DataError(f"dataset {self.layout.root.uri}: no {split!r} split")
        transform = build_augmentation(self.cfg.augment) if augment and split == "train" else None
        paths = [p for p, _ in self.layout.files[split]]
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(paths)
        ds = read_bytes_dataset(paths, self.layout.root.fs, self.cfg.files_per_task)
        if shuffle_seed is not None:
            ds = ds.randomize_block_order(
                seed=RandomSeedConfig(seed=shuffle_seed, reseed_after_execution=True)
            )
        decoded = ds.map_batches(
            decode_batch,
            batch_format="numpy",
            fn_kwargs={
                "class_index": self.layout.class_index(),
                "size": self.cfg.image_size,
                "max_pixels": self.cfg.max_image_pixels,
                "transform": transform,
                "seed": shuffle_seed,
                "epoch": epoch,
                "on_skip": None if keep_errors else _Reporter(self._skip_log_actor()),
                "keep_paths": keep_paths,
                "keep_errors": keep_errors,
            },
        )
        if keep_errors:
            return decoded.drop_columns(["ok"])
        return decoded.filter(expr=col("ok") == True).drop_columns(["ok"])  # noqa: E712 (an expression)

    def _skip_log_actor(self) -> Any:
        if self._skip_log is None:
            self._skip_log = ray.remote(SkipLog).options(**on_this_node()).remote()
        return self._skip_log

    def skipped(self) -> dict[str, str]:
        """Every unreadable file the datasets that drop them met so far, with the reason."""
        if self._skip_log is None:
            return {}
        return ray.get(self._skip_log.get.remote())


def iter_torch_batches(
    source: Any,
    *,
    batch_size: int,
    rescale: str,
    device: "str | torch.device" = "cpu",
    drop_last: bool = False,
    local_shuffle_buffer_size: int | None = None,
    local_shuffle_seed: int | None = None,
) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
    """(NCHW float images, int64 labels) batches from a Ray dataset or a Train shard.

    Images travel as uint8 and are rescaled on ``device``.
    """
    for batch in source.iter_torch_batches(
        batch_size=batch_size,
        device=device,
        drop_last=drop_last,
        local_shuffle_buffer_size=local_shuffle_buffer_size,
        local_shuffle_seed=local_shuffle_seed,
    ):
        yield to_model_input(batch["image"], rescale), batch["label"]
