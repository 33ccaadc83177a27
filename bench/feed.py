"""Training's input path against its bound: images/s delivered to a loop that does nothing.

Three feeds of the same JPEG photos, measured in one run from epoch 2 on (epoch 1 of the new path
builds the cache), at each image size, without and with the augmentation of a preset:

- old: what training ran before the decoded cache: a Ray Data execution per epoch that reads,
  decodes, resizes and augments every file on the CPU, one torchvision call per image;
- new: :class:`hotdog_ray.feed.SplitFeed` over the decoded cache, augmenting whole batches on the
  device (the CPU here, the code path a GPU worker runs);
- bound: random batches indexed from the same uint8 tensor already in memory, rescaled to float
  (with augmentation: the same batched augmentation on those batches).

    python bench/feed.py --images 2000 --sizes 128 224 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import make_photos  # noqa: E402 - the bench scripts' shared photo generator

from hotdog_ray import cache, storage  # noqa: E402
from hotdog_ray.config import CacheSettings, DataSettings, load_config  # noqa: E402
from hotdog_ray.data import ImagePipeline, discover, iter_torch_batches  # noqa: E402
from hotdog_ray.feed import SplitFeed, to_model_input  # noqa: E402
from hotdog_ray.runtime import init_ray, quiet_ray_data  # noqa: E402

BATCH = 64
SEED = 42


def timed_epochs(epochs: int, run_epoch) -> list[float]:
    """images/s of each epoch of ``run_epoch(epoch) -> images``."""
    rates = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        n = run_epoch(epoch)
        rates.append(n / (time.perf_counter() - t0))
    return rates


def old_path(cfg: DataSettings, augment: bool):
    pipeline = ImagePipeline.from_config(cfg)

    def epoch(e: int) -> int:
        ds = pipeline.dataset("train", augment=augment, shuffle_seed=SEED, epoch=e)
        n = 0
        for x, _ in iter_torch_batches(
            ds,
            batch_size=BATCH,
            rescale=cfg.rescale,
            local_shuffle_buffer_size=4 * BATCH,
            local_shuffle_seed=e,
        ):
            n += len(x)
        return n

    return epoch


def new_path(cfg: DataSettings, cache_root: Path, augment: bool):
    state: dict = {}

    def epoch(e: int) -> int:
        if "feed" not in state:  # epoch 1 builds (or finds) the cache and loads the shard
            layout = discover(cfg, required=("train",))
            split, _ = cache.ensure(
                layout, "train", cfg, storage.resolve(cache_root), lambda: ImagePipeline(cfg, layout)
            )
            state["feed"] = SplitFeed(
                split, rank=0, world=1, device=torch.device("cpu"), settings=cfg.cache, seed=SEED
            )
        n = 0
        for x, _ in state["feed"].batches(
            BATCH, rescale=cfg.rescale, epoch=e, seed=SEED, augmentation=cfg.augment if augment else None
        ):
            n += len(x)
        return n

    return epoch


def bound(cfg: DataSettings, count: int, augment: bool):
    images = torch.from_numpy(
        np.random.default_rng(0).integers(0, 256, (count, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    )

    def epoch(e: int) -> int:
        gen = torch.Generator().manual_seed(e)
        n = 0
        for _ in range(0, count, BATCH):
            idx = torch.randint(0, count, (BATCH,), generator=gen)
            x = to_model_input(
                images[idx], cfg.rescale, augmentation=cfg.augment if augment else None, generator=gen
            )
            n += len(x)
        return n

    return epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument(
        "--epochs", type=int, default=3, help="epochs per measurement (the first is not counted)"
    )
    parser.add_argument("--source", default="320x240", help="source photo size WxH")
    parser.add_argument("--config", default="configs/catdog.yaml", help="preset whose augmentation is used")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    augmentation = load_config(args.config).data.augment
    init_ray()
    quiet_ray_data()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        w, h = (int(v) for v in args.source.split("x"))
        make_photos(Path(tmp) / "data", args.images, (w, h))
        for size in args.sizes:
            cfg = DataSettings(
                root=str(Path(tmp) / "data"), image_size=size, augment=augmentation, cache=CacheSettings()
            )
            count = len(discover(cfg, required=("train",)).files["train"])
            for augment in (False, True):
                feeds = {
                    "old": old_path(cfg, augment),
                    "new": new_path(cfg, Path(tmp) / "cache", augment),
                    "bound": bound(cfg, count, augment),
                }
                result = {"size": size, "augment": augment, "images": count}
                for name, feed in feeds.items():
                    rates = timed_epochs(args.epochs, feed)
                    result[name] = statistics.mean(rates[1:])
                    result[f"{name}_epochs"] = [round(r, 1) for r in rates]
                result["new/bound"] = result["new"] / result["bound"]
                result["new/old"] = result["new"] / result["old"]
                rows.append(result)
                print(
                    f"{size:>4} px  augment={'yes' if augment else 'no ':<3}  old {result['old']:8.0f}  "
                    f"new {result['new']:8.0f}  bound {result['bound']:8.0f} images/s   "
                    f"new/bound {result['new/bound']:.3f}  new/old {result['new/old']:.2f}",
                    flush=True,
                )
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.python_version()}"
    print(
        f"machine: {machine}; augmentation of {args.config}: {augmentation.model_dump(exclude_defaults=True)}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
