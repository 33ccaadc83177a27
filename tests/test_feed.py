"""The decoded-image cache, the per-worker feed and batched augmentation on the device (the CPU here).

Pixels are checked against a fresh decode of each file, and labels against the gray level each
class was drawn with (tests/imagegen.py), not against the code under test.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hotdog_ray import cache, storage
from hotdog_ray.augment import augment, epoch_generator
from hotdog_ray.cli import main
from hotdog_ray.config import AugmentSettings, CacheSettings, DataSettings
from hotdog_ray.data import ImagePipeline, discover
from hotdog_ray.feed import SplitFeed, shard_indices
from hotdog_ray.images import decode_image
from tests.imagegen import CLASSES, class_of_level, write_image_tree

CPU = torch.device("cpu")


def build(cfg: DataSettings, root: Path, split: str = "train") -> tuple[cache.CachedSplit, bool]:
    layout = discover(cfg, required=())
    return cache.ensure(layout, split, cfg, storage.resolve(root), lambda: ImagePipeline(cfg, layout))


def no_decoding():
    raise AssertionError("the split was decoded again")


# --- the cache --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_cache(ray_session, image_tree, tmp_path_factory):
    cfg = DataSettings(root=str(image_tree.root), image_size=12, cache=CacheSettings(shard_images=5))
    root = tmp_path_factory.mktemp("cache")
    split, built = build(cfg, root)
    return cfg, root, split, built


def test_cached_pixels_equal_a_fresh_decode_and_bad_files_are_counted(train_cache, image_tree):
    cfg, _, split, built = train_cache
    assert built and split.count == image_tree.good_count("train")
    assert sorted(split.skipped) == sorted(
        str(image_tree.root / b) for b in image_tree.bad if b.startswith("train/")
    )
    assert len(split.shards) == -(-split.count // 5)  # files of shard_images images
    seen = 0
    for shard in split.shards:
        images, index = split.read_images(shard), split.read_index(shard).to_pydict()
        for image, path, label in zip(images, index["path"], index["label"]):
            fresh = decode_image(Path(path).read_bytes(), 12)
            assert np.array_equal(image, fresh), path
            assert CLASSES[label] == Path(path).parent.name == class_of_level(float(image.mean()))
            seen += 1
    assert seen == split.count


def test_images_at_picks_rows_across_shards_in_the_order_asked(train_cache):
    _, _, split, _ = train_cache
    every = np.concatenate([split.read_images(shard) for shard in split.shards])
    rows = np.array([split.count - 1, 0, 6, 5])  # shards of 5: the last, the first, two in the second
    assert np.array_equal(split.images_at(rows), every[rows])
    assert len(split.images_at(np.array([], np.int64))) == 0


def test_a_second_fit_over_the_same_data_decodes_nothing(train_cache):
    cfg, root, split, _ = train_cache
    layout = discover(cfg, required=())
    again, built = cache.ensure(layout, "train", cfg, storage.resolve(root), no_decoding)
    assert not built and again == split
    assert again.skipped == split.skipped  # the count of bad files is reported on every run


def test_a_changed_file_or_setting_makes_a_new_cache(ray_session, tmp_path):
    tree = write_image_tree(tmp_path / "data", {"train": 2, "validation": 2})
    cfg = DataSettings(root=str(tree.root), image_size=8)
    root = tmp_path / "cache"
    first, _ = build(cfg, root)
    layout = discover(cfg, required=())
    same = cache.split_key(layout, "train", cfg)
    assert same == first.manifest["key"]

    victim = next((tree.root / "train" / "dog").glob("*.png"))
    victim.write_bytes(victim.read_bytes() + b"\0")  # one more byte: a changed file
    second, built = build(cfg, root)
    assert built and second.manifest["key"] != first.manifest["key"]

    resized = cfg.model_copy(update={"image_size": 10})
    fewer = cfg.model_copy(update={"classes": ["cat", "dog"]})
    layout = discover(cfg, required=())
    keys = {cache.split_key(discover(c, required=()), "train", c) for c in (resized, fewer)}
    assert len(keys | {cache.split_key(layout, "train", cfg)}) == 3
    assert {c["key"] for c in cache.list_caches(storage.resolve(root))} == {
        first.manifest["key"],
        second.manifest["key"],
    }


def test_a_cache_without_its_manifest_is_never_read(train_cache, tmp_path):
    cfg, root, split, _ = train_cache
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (copy / split.manifest["key"] / cache.MANIFEST).unlink()  # a build that stopped half-way
    assert cache.find(storage.resolve(copy), split.manifest["key"]) is None
    (row,) = cache.list_caches(storage.resolve(copy))
    assert not row["finished"]


def test_cache_ls_and_rm_show_and_remove_caches_with_their_size(train_cache, tmp_path, capsys):
    _, root, split, _ = train_cache
    copy = tmp_path / "caches"
    shutil.copytree(root, copy)
    assert main(["cache", "ls", "--set", f"data.cache.root={copy}"]) == 0
    out = capsys.readouterr().out
    key = split.manifest["key"]
    assert key in out and "train" in out and str(split.count) in out and "MB" in out
    assert main(["cache", "rm", key[:8], "--set", f"data.cache.root={copy}"]) == 0
    assert not (copy / key).exists()
    assert main(["cache", "rm", "nothing", "--set", f"data.cache.root={copy}"]) == 2


def test_a_cache_on_s3_reads_back_the_same_pixels(ray_session, s3, train_cache):
    cfg, _, local, _ = train_cache
    bucket = s3.bucket("cache")
    layout = discover(cfg, required=())
    remote, built = cache.ensure(
        layout, "train", cfg, storage.resolve(f"s3://{bucket}/caches"), lambda: ImagePipeline(cfg, layout)
    )
    assert built and remote.manifest["key"] == local.manifest["key"]
    a = SplitFeed(local, rank=0, world=1, device=CPU, settings=cfg.cache)
    b = SplitFeed(remote, rank=0, world=1, device=CPU, settings=CacheSettings(host_share=0))
    assert b.placement == "stream"
    xa = torch.cat([x for x, _ in a.batches(7, rescale="unit")])
    xb = torch.cat([x for x, _ in b.batches(7, rescale="unit")])
    assert torch.equal(xa, xb)


# --- shards and epochs --------------------------------------------------------------------------


@pytest.mark.parametrize("count,world", [(12, 2), (13, 2), (10, 3), (2, 4)])
def test_ranks_get_equal_disjoint_training_shards(count, world):
    shards = [shard_indices(count, r, world, seed=3) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # equal: every rank runs the same steps
    every = np.concatenate(shards)
    assert set(every.tolist()) == set(range(count))  # nothing left out
    padding = len(every) - count
    assert padding < world or count < world  # repeats only to even the shards out
    if count % world == 0:
        assert len(set(every.tolist())) == len(every)  # disjoint
    validation = np.concatenate([shard_indices(count, r, world, seed=None) for r in range(world)])
    assert sorted(validation.tolist()) == list(range(count))  # each once


def test_epochs_are_seeded_shuffles_held_or_streamed_alike(train_cache):
    cfg, _, split, _ = train_cache
    held = SplitFeed(split, rank=0, world=1, device=CPU, settings=cfg.cache, seed=1)
    streamed = SplitFeed(split, rank=0, world=1, device=CPU, settings=CacheSettings(host_share=0), seed=1)
    assert (held.placement, streamed.placement) == ("host", "stream")

    def epoch(feed, e, seed=5):
        xs, ys = zip(*feed.batches(4, rescale="unit", epoch=e, seed=seed))
        return torch.cat(xs), torch.cat(ys)

    a0, a1, again = epoch(held, 0), epoch(held, 1), epoch(held, 0)
    assert torch.equal(a0[0], again[0])  # reproducible from (seed, epoch, rank)
    assert not torch.equal(a0[1], a1[1]) or not torch.equal(a0[0], a1[0])  # a new order each epoch
    s0 = epoch(streamed, 0)
    key = lambda x: sorted(map(tuple, x.flatten(1).tolist()))  # noqa: E731 - the same images, any order
    assert key(s0[0]) == key(a0[0]) and sorted(s0[1].tolist()) == sorted(a0[1].tolist())
    for x, y in zip(s0[0], s0[1]):  # labels travel with their images
        assert class_of_level(float(x.mean()) * 255) == CLASSES[int(y)]


# --- batched augmentation -----------------------------------------------------------------------


def _batch(n=16, size=16):
    # An asymmetric picture (a bright corner) so that every flip and turn shows.
    x = torch.zeros(n, 3, size, size)
    x[:, :, : size // 3, : size // 4] = 250.0
    return x


def test_without_settings_augmentation_changes_nothing():
    x = _batch()
    assert torch.equal(augment(x, AugmentSettings(), epoch_generator(0, 0, 0)), x)


def test_flips_mirror_some_images_and_leave_the_others():
    x = _batch(32)
    out = augment(x, AugmentSettings(horizontal_flip=True), epoch_generator(0, 0, 0))
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    kept = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and 5 < sum(flipped) < 27


def test_each_image_gets_its_own_draw_reproducibly():
    cfg = AugmentSettings(rotation=30, zoom=0.2, width_shift=0.1, shear=10, brightness=(0.5, 1.5))
    x = _batch(8)
    out = augment(x, cfg, epoch_generator(1, 2, 0))
    assert len({tuple(o.flatten().tolist()) for o in out}) == 8  # no two images moved alike
    assert torch.equal(out, augment(x, cfg, epoch_generator(1, 2, 0)))
    assert not torch.equal(out, augment(x, cfg, epoch_generator(1, 3, 0)))  # another epoch
    assert not torch.equal(out, augment(x, cfg, epoch_generator(1, 2, 1)))  # another rank
    assert out.min() >= 0 and out.max() <= 255


def test_a_pure_shift_moves_pixels_by_the_drawn_fraction():
    # width_shift 0.25 on a 16 px image: shifts of up to 4 px; a 4-column block keeps its width.
    x = torch.zeros(64, 3, 16, 16)
    x[:, :, :, 6:10] = 250.0
    out = augment(x, AugmentSettings(width_shift=0.25), epoch_generator(0, 0, 0))
    starts = set()
    for o in out:
        cols = (o[0] > 125).all(dim=0).nonzero().flatten()
        assert 3 <= len(cols) <= 5  # the block's width, give or take interpolation
        assert 6 - 4 <= int(cols.min()) <= 6 + 4
        assert torch.equal(o[:, 0], o[:, 15])  # a horizontal shift moves no row
        starts.add(int(cols.min()))
    assert len(starts) > 4  # each image its own shift
