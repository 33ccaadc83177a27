"""Decoded-image cache: each split decoded and resized once, kept as uint8 shards.

The first run over a split decodes it with the pipeline's own code (:mod:`hotdog_ray.data`, no
augmentation) in one Ray Data execution and writes ``<root>/<key>/<build>-NNNNN.npy`` (N x S x S x 3
uint8) with a Parquet index of paths and labels beside each. ``manifest.json`` is written last: a
cache without one is unfinished and never read, so a cache appears whole or not at all. The key
hashes the listed files (path, size, modification time, label), the image size, the pixel guard, the
class list and :data:`FORMAT_VERSION`: a changed file or class list makes a new cache, never a stale
one. Unreadable files are counted when the cache is built and carried in its manifest, so every run
that uses it reports them. Every later run, every trial of a sweep and every rank read the same files.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import io
import json
import logging
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hotdog_ray import storage
from hotdog_ray.data import DatasetLayout, ImagePipeline
from hotdog_ray.errors import DataError
from hotdog_ray.process import Progress
from hotdog_ray.tables import render

if TYPE_CHECKING:
    from hotdog_ray.config import Config, DataSettings

log = logging.getLogger(__name__)

# Bump when the decoded pixels of the same file would change (resize filter, colour handling...).
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def cache_root(cfg: "Config") -> storage.Location:
    """Where this config's caches live: ``data.cache.root``, else ``<train.storage_path>/cache``."""
    if cfg.data.cache.root:
        return storage.resolve(cfg.data.cache.root)
    return storage.resolve(cfg.train.storage_path).join("cache")


def cache_key(
    entries: list[tuple[str, int, int, int]], *, image_size: int, max_pixels: int, classes: list[str]
) -> str:
    """The key of a split's cache (pure): entries are (path, size, mtime in ns, label)."""
    h = hashlib.blake2b(digest_size=16)
    head = {"version": FORMAT_VERSION, "size": image_size, "max_pixels": max_pixels, "classes": classes}
    h.update(json.dumps(head, sort_keys=True).encode())
    for path, size, mtime, label in sorted(entries):
        h.update(f"\n{path}\t{size}\t{mtime}\t{label}".encode())
    return h.hexdigest()


def split_key(layout: "DatasetLayout", split: str, cfg: "DataSettings") -> str:
    """The cache key of ``split`` of a discovered dataset under ``cfg``."""
    entries = [(p, *layout.stats.get(p, (0, 0)), label) for p, label in layout.files[split]]
    return cache_key(
        entries, image_size=cfg.image_size, max_pixels=cfg.max_image_pixels, classes=layout.classes
    )


@dataclass(frozen=True)
class CachedSplit:
    """A finished cache: its folder and its manifest. It travels to Train workers whole, filesystem
    included, so that they reach an S3-compatible store configured only in the driver's environment."""

    folder: storage.Location
    manifest: dict[str, Any]

    @property
    def uri(self) -> str:
        return self.folder.uri

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def skipped(self) -> dict[str, str]:
        """Files that could not be decoded when the cache was built, with the reason."""
        return dict(self.manifest["skipped"])

    @property
    def shards(self) -> list[dict[str, Any]]:
        return list(self.manifest["shards"])

    def read_images(self, shard: dict[str, Any]) -> np.ndarray:
        """One shard's images: memory-mapped where the cache is on a local disk, else read whole."""
        loc = self.folder.join(shard["images"])
        if loc.is_local:
            return np.load(loc.path, mmap_mode="r")
        return np.load(io.BytesIO(storage.read_bytes(loc.fs, loc.path)))

    def read_index(self, shard: dict[str, Any]) -> pa.Table:
        """One shard's ``path`` and ``label`` columns, in the order of its images."""
        loc = self.folder.join(shard["index"])
        return pq.read_table(pa.BufferReader(storage.read_bytes(loc.fs, loc.path)))

    def images_at(self, rows: np.ndarray) -> np.ndarray:
        """The images at cache positions ``rows`` (sorted or not), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        out: list[np.ndarray | None] = [None] * len(rows)
        start = 0
        for shard in self.shards:
            inside = np.flatnonzero((rows >= start) & (rows < start + shard["rows"]))
            if len(inside):
                images = self.read_images(shard)
                for i in inside:
                    out[i] = np.asarray(images[rows[i] - start])
            start += shard["rows"]
        return np.stack(out) if len(rows) else np.zeros((0,), np.uint8)

    def labels(self) -> np.ndarray:
        """Every image's label, in cache order."""
        parts = [self.read_index(s).column("label").to_numpy() for s in self.shards]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def find(root: storage.Location, key: str) -> CachedSplit | None:
    """The finished cache of ``key`` under ``root``, or None."""
    folder = root.join(key)
    try:
        data = storage.read_bytes(folder.fs, folder.join(MANIFEST).path)
    except (FileNotFoundError, OSError):
        return None
    return CachedSplit(folder, json.loads(data))


def ensure(
    layout: "DatasetLayout",
    split: str,
    cfg: "DataSettings",
    root: storage.Location,
    pipeline: Callable[[], "ImagePipeline"],
) -> tuple[CachedSplit, bool]:
    """The cache of ``split``, built first with ``pipeline()`` if there is none; and whether it was
    built now."""
    key = split_key(layout, split, cfg)
    found = find(root, key)
    if found is not None:
        log.info(
            "%s: %d decoded images from cache %s (%d unreadable files skipped when it was built)",
            split,
            found.count,
            found.uri,
            len(found.skipped),
        )
        return found, False
    return build(pipeline(), split, root, key), True


def ensure_splits(
    cfg: "Config", layout: DatasetLayout, splits: tuple[str, ...]
) -> tuple[dict[str, CachedSplit], list[str]]:
    """Each split's cache under :func:`cache_root`, built where missing (one Ray Data execution per
    split, all from one pipeline made only if needed); and the splits built now. Unreadable files are
    logged with the count their cache recorded."""
    root = cache_root(cfg)
    pipeline = functools.cache(lambda: ImagePipeline(cfg.data, layout))
    caches: dict[str, CachedSplit] = {}
    built: list[str] = []
    for split in splits:
        caches[split], fresh = ensure(layout, split, cfg.data, root, pipeline)
        built += [split] if fresh else []
        if caches[split].skipped:
            log.warning(
                "%s: %d unreadable file(s) skipped (listed in the cache manifest)",
                split,
                len(caches[split].skipped),
            )
    return caches, built


def build(pipeline: "ImagePipeline", split: str, root: storage.Location, key: str) -> CachedSplit:
    """Decode ``split`` once (one Ray Data execution) into the cache folder of ``key``."""
    cfg = pipeline.cfg
    folder = root.join(key)
    build_id = uuid.uuid4().hex[:8]
    total = len(pipeline.layout.files[split])
    log.info("%s: decoding %d files once into cache %s", split, total, folder.uri)
    ds = pipeline.dataset(split, augment=False, keep_paths=True, keep_errors=True)
    ds.context.execution_options.preserve_order = True  # the same files give the same cache
    progress = Progress(total, 30.0, f"{split} cached")
    shards: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    count = 0
    t0 = time.monotonic()
    for batch in ds.iter_batches(batch_size=cfg.cache.shard_images, batch_format="numpy"):
        errors = np.asarray(batch.pop("error")).astype(str)
        bad = errors != ""
        skipped.update(zip(np.asarray(batch["path"])[bad].astype(str).tolist(), errors[bad].tolist()))
        if not bad.all():
            good = {column: values[~bad] for column, values in batch.items()}
            shards.append(write_shard(folder, f"{build_id}-{len(shards):05d}", good))
            count += shards[-1]["rows"]
        progress.update(count + len(skipped))
    if count + len(skipped) != total:
        raise DataError(f"{split}: cache build saw {count} images and {len(skipped)} unreadable of {total}")
    manifest = _manifest(pipeline, split, key, count, shards, skipped)
    winner = find(root, key)  # a sweep's trials or two jobs may build the same cache at once
    if winner is not None:
        for shard in shards:
            for name in (shard["images"], shard["index"]):
                folder.fs.delete_file(folder.join(name).path)
        return winner
    _write_last(folder, json.dumps(manifest, indent=1).encode())
    seconds = time.monotonic() - t0
    log.info(
        "%s: cached %d images (%.1f MB) in %.1f s; %d skipped",
        split,
        count,
        manifest["bytes"] / 1e6,
        seconds,
        len(skipped),
    )
    return CachedSplit(folder, manifest)


def _manifest(
    pipeline: "ImagePipeline",
    split: str,
    key: str,
    count: int,
    shards: list[dict[str, Any]],
    skipped: dict[str, str],
) -> dict[str, Any]:
    """A finished cache's manifest (written last: a cache without one is incomplete)."""
    size = pipeline.cfg.image_size
    return {
        "version": FORMAT_VERSION,
        "key": key,
        "split": split,
        "dataset": pipeline.layout.root.uri,
        "classes": pipeline.layout.classes,
        "image_size": size,
        "count": count,
        "bytes": count * size * size * 3,
        "shards": shards,
        "skipped": skipped,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_shard(folder: storage.Location, name: str, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Write one shard (``image``, ``label`` and ``path`` columns) as ``name``.npy and ``name``.parquet."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(batch["image"], dtype=np.uint8), allow_pickle=False)
    storage.write_bytes(folder.fs, folder.join(f"{name}.npy").path, buf.getvalue())
    index = pa.table(
        {"path": pa.array([str(p) for p in batch["path"]], pa.string()), "label": pa.array(batch["label"])}
    )
    sink = pa.BufferOutputStream()
    pq.write_table(index, sink)
    storage.write_bytes(folder.fs, folder.join(f"{name}.parquet").path, sink.getvalue().to_pybytes())
    return {"images": f"{name}.npy", "index": f"{name}.parquet", "rows": len(batch["label"])}


def from_arrays(
    folder: storage.Location,
    images: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    shard_images: int = 2048,
) -> CachedSplit:
    """A cache of images already decoded (N x S x S x 3 uint8), for benchmarks and tools that make
    their own pixels; paths are ``array:<row>``."""
    shards = [
        write_shard(
            folder,
            f"arrays-{i // shard_images:05d}",
            {
                "image": images[i : i + shard_images],
                "label": np.asarray(labels[i : i + shard_images], np.int64),
                "path": [f"array:{j}" for j in range(i, min(i + shard_images, len(images)))],
            },
        )
        for i in range(0, len(images), shard_images)
    ]
    manifest = {
        "version": FORMAT_VERSION,
        "key": posixpath.basename(folder.path),
        "split": "arrays",
        "dataset": "arrays",
        "classes": list(classes),
        "image_size": int(images.shape[1]),
        "count": len(images),
        "bytes": int(images.nbytes),
        "shards": shards,
        "skipped": {},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    _write_last(folder, json.dumps(manifest, indent=1).encode())
    return CachedSplit(folder, manifest)


def _write_last(folder: storage.Location, data: bytes) -> None:
    """Write the manifest so that it appears whole: a rename on a local disk, one PUT on S3."""
    target = folder.join(MANIFEST).path
    if folder.is_local:
        tmp = f"{target}.{uuid.uuid4().hex[:8]}.tmp"
        storage.write_bytes(folder.fs, tmp, data)
        folder.fs.move(tmp, target)
    else:
        storage.write_bytes(folder.fs, target, data)


def list_caches(root: storage.Location) -> list[dict[str, Any]]:
    """Every cache under ``root``: key, split, dataset, images, unreadable files, bytes on storage and
    whether it is finished (a cache without a manifest is a build that stopped or is still running)."""
    out = []
    for key in storage.list_dirs(root):
        folder = root.join(key)
        size = sum(s for _, s, _ in storage.list_file_stats(folder))
        found = find(root, key)
        m = found.manifest if found else {}
        out.append(
            {
                "key": key,
                "split": m.get("split", "?"),
                "dataset": m.get("dataset", "?"),
                "image_size": m.get("image_size"),
                "images": m.get("count", 0),
                "unreadable": len(m.get("skipped", {})),
                "bytes": size,
                "created": m.get("created", ""),
                "finished": found is not None,
                "uri": folder.uri,
            }
        )
    return out


def format_caches(rows: list[dict[str, Any]], where: str) -> str:
    """``hotdog cache ls``'s table of :func:`list_caches` rows (pure)."""
    head = f"decoded-image caches in {where}: {len(rows)}"
    if not rows:
        return head
    table = render(
        ["key", "split", "size", "images", "unreadable", "MB", "created", "dataset"],
        (
            [
                r["key"],
                r["split"],
                r["image_size"],
                r["images"],
                r["unreadable"],
                f"{r['bytes'] / 1e6:.1f}",
                r["created"] if r["finished"] else "unfinished (no manifest)",
                r["dataset"],
            ]
            for r in rows
        ),
    )
    return f"{head}\n{table}"


def remove(root: storage.Location, key: str) -> int:
    """Delete the cache ``key`` (a unique prefix will do); returns the bytes freed."""
    keys = [k for k in storage.list_dirs(root) if k.startswith(key)]
    if len(keys) != 1:
        raise DataError(
            f"cache {key!r}: {'no' if not keys else 'several'} caches under {root.uri} match"
            + (f" ({', '.join(keys)})" if keys else "")
        )
    folder = root.join(keys[0])
    size = sum(s for _, s, _ in storage.list_file_stats(folder))
    folder.fs.delete_dir(folder.path)
    log.info("removed cache %s (%.1f MB)", posixpath.basename(folder.path), size / 1e6)
    return size
