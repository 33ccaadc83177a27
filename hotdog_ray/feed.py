"""Feeding a worker from the decoded cache: its shard held once, batches drawn every epoch.

A worker loads its shard of a cached split (:mod:`hotdog_ray.cache`) once per fit: into GPU memory
when it fits ``data.cache.device_share`` of the GPU, into (pinned) host memory when it fits
``data.cache.host_share`` of the node's RAM, and otherwise it streams the cache files every epoch
(never decoding). Epochs then need no Ray Data execution: each is a seeded permutation of the shard
(a true shuffle), cut into batches that are augmented on the device (:mod:`hotdog_ray.augment`),
rescaled, and put in the model's memory format and precision.

Training shards are equal across ranks (a shard is padded with the first images of a seeded
permutation, as ``DistributedSampler`` pads), so every rank runs the same number of steps;
validation shards are disjoint and cover the split exactly once.
"""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING, Iterator, Literal

import numpy as np
import torch

from hotdog_ray.augment import augment, epoch_generator
from hotdog_ray.cache import CachedSplit
from hotdog_ray.images import rescale_

if TYPE_CHECKING:
    from hotdog_ray.config import AugmentSettings, CacheSettings

log = logging.getLogger(__name__)

Placement = Literal["device", "host", "stream"]


def shard_indices(count: int, rank: int, world: int, seed: int | None) -> np.ndarray:
    """Which cache rows rank ``rank`` of ``world`` holds (pure).

    With ``seed`` (training): a seeded permutation padded cyclically to a multiple of ``world``, so
    every rank gets ``ceil(count / world)`` rows and no row is in two shards unless it was padding.
    Without (validation, evaluation): rows ``rank, rank + world, ...``, each row exactly once.
    """
    if seed is None:
        return np.arange(rank, count, world, dtype=np.int64)
    per_rank = math.ceil(count / world) if count else 0
    order = np.resize(np.random.default_rng(seed).permutation(count), per_rank * world)
    return np.sort(order[rank::world]).astype(np.int64)


def host_memory_bytes() -> int:
    """Physical memory of this node (0 where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def choose_placement(nbytes: int, device: torch.device, cfg: "CacheSettings") -> Placement:
    """Where a shard of ``nbytes`` lives: on the GPU, in host memory, or streamed from the cache."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if nbytes <= cfg.device_share * total:
            return "device"
    if nbytes <= cfg.host_share * host_memory_bytes():
        return "host"
    return "stream"


def to_model_input(
    images: torch.Tensor,
    rescale: str,
    *,
    augmentation: "AugmentSettings | None" = None,
    generator: torch.Generator | None = None,
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A uint8 NHWC batch on its device to the model's input: augmented (each image its own draw
    from ``generator``), rescaled, in channels-last memory and ``dtype`` where asked."""
    x = images.permute(0, 3, 1, 2).float()
    if augmentation is not None and augmentation.enabled:
        x = augment(x, augmentation, generator if generator is not None else torch.Generator())
    x = rescale_(x, rescale)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(dtype) if dtype != torch.float32 else x


def in_order(
    split: CachedSplit, settings: "CacheSettings", rescale: str, batch_size: int = 256
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The whole cached split in its own order, unaugmented, on the CPU (evaluation, the drift
    profile)."""
    feed = SplitFeed(split, rank=0, world=1, device=torch.device("cpu"), settings=settings)
    return feed.batches(batch_size, rescale=rescale)


def sample_of(
    split: CachedSplit, settings: "CacheSettings", rescale: str, most: int, batch_size: int = 256
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """At most ``most`` images of the cached split, evenly spread over it (every class in its share),
    unaugmented, on the CPU (the OOD score's bank of training features)."""
    world = max(1, math.ceil(split.count / most))
    feed = SplitFeed(split, rank=0, world=world, device=torch.device("cpu"), settings=settings)
    return feed.batches(batch_size, rescale=rescale)


class SplitFeed:
    """One worker's shard of a cached split and the batches of each epoch."""

    def __init__(
        self,
        split: CachedSplit,
        *,
        rank: int,
        world: int,
        device: torch.device,
        settings: "CacheSettings",
        seed: int | None = None,
    ) -> None:
        self.split, self.device, self.rank = split, device, rank
        self.indices = shard_indices(split.count, rank, world, seed)
        size = split.image_size
        self.placement = choose_placement(len(self.indices) * size * size * 3, device, settings)
        self.labels_all = torch.from_numpy(split.labels())
        self.images: torch.Tensor | None = None
        self.labels = self.labels_all[torch.from_numpy(self.indices)]
        if self.placement != "stream":
            images = torch.from_numpy(self._gather(self.indices))
            if self.placement == "device":
                images, self.labels = images.to(device), self.labels.to(device)
            elif device.type == "cuda":
                images = images.pin_memory()  # host-to-device copies without a staging copy
            self.images = images
        log.info(
            "rank %d: %d images of %s held in %s",
            rank,
            len(self.indices),
            split.manifest.get("split", "a split"),
            {"device": f"{device} memory", "host": "host memory", "stream": "the cache files"}[
                self.placement
            ],
        )

    def __len__(self) -> int:
        return len(self.indices)

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """The images of cache ``rows`` (sorted, repeats allowed), read shard file by shard file."""
        size = self.split.image_size
        out = np.empty((len(rows), size, size, 3), np.uint8)
        start = filled = 0
        for shard in self.split.shards:
            end = start + shard["rows"]
            lo, hi = np.searchsorted(rows, [start, end])
            if hi > lo:
                out[filled : filled + hi - lo] = self.split.read_images(shard)[rows[lo:hi] - start]
                filled += hi - lo
            start = end
        return out

    def batches(
        self,
        batch_size: int,
        *,
        rescale: str,
        epoch: int = 0,
        seed: int | None = None,
        augmentation: "AugmentSettings | None" = None,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of (model input, labels) batches on the device.

        With ``seed`` the order is a permutation drawn from (seed, epoch, rank), and so are the
        augmentation draws; without, the shard's own order (validation).
        """
        gen = epoch_generator(seed, epoch, self.rank) if seed is not None else None
        for images, labels in self._uint8_batches(batch_size, gen):
            x = to_model_input(
                images.to(self.device, non_blocking=True),
                rescale,
                augmentation=augmentation,
                generator=gen,
                channels_last=channels_last,
                dtype=dtype,
            )
            yield x, labels.to(self.device, non_blocking=True)

    def _uint8_batches(
        self, batch_size: int, gen: torch.Generator | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.indices)
        if self.images is not None:
            order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
            order = order.to(self.images.device)
            for i in range(0, n, batch_size):
                idx = order[i : i + batch_size]
                yield self.images[idx], self.labels[idx]
            return
        yield from self._streamed(batch_size, gen)

    def _streamed(
        self, batch_size: int, gen: torch.Generator | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Beyond memory: shard files in a seeded order, each file's rows of this shard shuffled,
        batches carried across file boundaries (so every rank still runs the same steps)."""
        shards, starts = self.split.shards, np.cumsum([0] + [s["rows"] for s in self.split.shards])
        file_order = (
            torch.randperm(len(shards), generator=gen).tolist() if gen is not None else range(len(shards))
        )
        pending_x: list[torch.Tensor] = []
        pending_y: list[torch.Tensor] = []
        held = 0
        for f in file_order:
            lo, hi = np.searchsorted(self.indices, [starts[f], starts[f + 1]])
            if hi == lo:
                continue
            rows = self.indices[lo:hi]
            if gen is not None:
                rows = rows[torch.randperm(len(rows), generator=gen).numpy()]
            images = torch.from_numpy(
                np.ascontiguousarray(self.split.read_images(shards[f])[rows - starts[f]])
            )
            pending_x.append(images)
            pending_y.append(self.labels_all[torch.from_numpy(rows)])
            held += len(rows)
            while held >= batch_size:
                x, y = torch.cat(pending_x), torch.cat(pending_y)
                yield x[:batch_size], y[:batch_size]
                pending_x, pending_y, held = [x[batch_size:]], [y[batch_size:]], held - batch_size
        if held:
            yield torch.cat(pending_x), torch.cat(pending_y)
