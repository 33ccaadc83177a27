"""Turning the seeds' raw layouts and the bundled sample into the folder layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hotdog_ray.config import DataSettings
from hotdog_ray.data import discover
from hotdog_ray.errors import PrepareError
from hotdog_ray.prepare import parse_ratios, prepare, sample_plan, split_items, write_sample
from tests.imagegen import encode


def tree(root: Path) -> dict[str, set[str]]:
    """split/class -> file names under root."""
    out: dict[str, set[str]] = {}
    for p in root.rglob("*"):
        if p.is_file():
            rel = p.relative_to(root).parts
            out.setdefault(f"{rel[0]}/{rel[1]}", set()).add(rel[-1])
    return out


def write_files(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(encode(100, "RGB", "JPEG", (8, 8)))


def test_ratios_are_validated():
    assert parse_ratios("0.8,0.2") == (0.8, 0.2, 0.0)
    assert parse_ratios("0.7,0.15,0.15") == pytest.approx((0.7, 0.15, 0.15))
    for bad in ("0.8,0.3", "0.5,0.5,0.5", "1", "-0.2,0.6,0.6", "0,0.5,0.5"):
        with pytest.raises(PrepareError):
            parse_ratios(bad)


def test_split_is_deterministic_and_complete():
    items = [f"f{i}" for i in range(100)]
    a = split_items(items, (0.8, 0.1, 0.1), seed=7)
    assert a == split_items(list(reversed(items)), (0.8, 0.1, 0.1), seed=7)  # input order is irrelevant
    assert a != split_items(items, (0.8, 0.1, 0.1), seed=8)
    assert {k: len(v) for k, v in a.items()} == {"train": 80, "validation": 10, "test": 10}
    assert sorted(sum(a.values(), [])) == sorted(items)


def test_split_folders(tmp_path):
    src = tmp_path / "raw"
    write_files(src / "cats", [f"{i}.jpg" for i in range(10)])
    write_files(src / "dogs", [f"{i}.jpg" for i in range(20)])
    counts = prepare(str(src), str(tmp_path / "out"), layout="split-folders", ratios="0.6,0.2,0.2", seed=1)
    assert counts == {"train": 18, "validation": 6, "test": 6}
    got = tree(tmp_path / "out")
    assert len(got["train/cats"]) == 6 and len(got["validation/dogs"]) == 4
    assert got["train/dogs"] | got["validation/dogs"] | got["test/dogs"] == {f"{i}.jpg" for i in range(20)}
    # Same seed, same split; and the result is a valid dataset.
    prepare(str(src), str(tmp_path / "again"), layout="split-folders", ratios="0.6,0.2,0.2", seed=1)
    assert tree(tmp_path / "again") == got
    assert discover(DataSettings(root=str(tmp_path / "out"))).classes == ["cats", "dogs"]


def test_split_folders_errors(tmp_path):
    src = tmp_path / "raw"
    write_files(src / "only", ["a.jpg"])
    with pytest.raises(PrepareError, match="one folder per class"):
        prepare(str(src), str(tmp_path / "out"), layout="split-folders")
    write_files(src / "other", ["b.jpg"])
    with pytest.raises(PrepareError, match="sum to 1.1"):
        prepare(str(src), str(tmp_path / "out"), layout="split-folders", ratios="0.8,0.2,0.1")
    write_files(tmp_path / "full", ["x.jpg"])
    with pytest.raises(PrepareError, match="not empty"):
        prepare(str(src), str(tmp_path / "full"), layout="split-folders")
    with pytest.raises(PrepareError, match="unknown layout"):
        prepare(str(src), str(tmp_path / "o2"), layout="coco")


def make_food101(root: Path) -> dict:
    meta = {"train": {}, "test": {}}
    for cls in ("apple_pie", "waffles"):
        ids = [f"{cls}/{n}" for n in range(100, 120)]
        write_files(root / "images" / cls, [f"{n}.jpg" for n in range(100, 120)])
        meta["train"][cls] = ids[:16]
        meta["test"][cls] = ids[16:]
    (root / "meta").mkdir()
    for part in ("train", "test"):
        (root / "meta" / f"{part}.json").write_text(json.dumps(meta[part]))
    return meta


def test_food101(tmp_path):
    make_food101(tmp_path / "food-101")
    counts = prepare(
        str(tmp_path / "food-101"), str(tmp_path / "out"), layout="food101", val_ratio=0.25, seed=3
    )
    assert counts == {"train": 24, "validation": 8, "test": 8}
    got = tree(tmp_path / "out")
    assert got["test/waffles"] == {f"{n}.jpg" for n in range(116, 120)}
    assert got["train/apple_pie"].isdisjoint(got["validation/apple_pie"])
    assert got["train/apple_pie"] | got["validation/apple_pie"] == {f"{n}.jpg" for n in range(100, 116)}


def test_food101_missing_meta(tmp_path):
    make_food101(tmp_path / "food-101")
    (tmp_path / "food-101" / "meta" / "test.json").unlink()
    with pytest.raises(PrepareError, match=r"meta/test.json is missing"):
        prepare(str(tmp_path / "food-101"), str(tmp_path / "out"), layout="food101")
    (tmp_path / "food-101" / "meta" / "test.json").write_text("{not json")
    with pytest.raises(PrepareError, match="not valid JSON"):
        prepare(str(tmp_path / "food-101"), str(tmp_path / "out"), layout="food101")


def test_filename_labels(tmp_path):
    names = [f"cat.{i}.jpg" for i in range(10)] + [f"dog.{i}.jpg" for i in range(10)]
    write_files(tmp_path / "train", names)
    counts = prepare(
        str(tmp_path / "train"),
        str(tmp_path / "out"),
        layout="filename-labels",
        ratios="0.8,0.2",
        classes=["cat", "dog"],
    )
    assert counts == {"train": 16, "validation": 4}
    got = tree(tmp_path / "out")
    assert all(n.startswith("cat.") for n in got["train/cat"] | got["validation/cat"])
    assert len(got["validation/dog"]) == 2


def test_filename_labels_errors(tmp_path):
    write_files(tmp_path / "flat", ["cat.1.jpg", "dog.1.jpg", "bird.1.jpg"])
    with pytest.raises(PrepareError, match="class 'bird' is not one of"):
        prepare(
            str(tmp_path / "flat"), str(tmp_path / "out"), layout="filename-labels", classes=["cat", "dog"]
        )
    write_files(tmp_path / "flat2", ["cat.1.jpg", "noclass"])
    with pytest.raises(PrepareError, match="no class in the file name"):
        prepare(str(tmp_path / "flat2"), str(tmp_path / "out"), layout="filename-labels")


def test_prepare_from_and_to_s3(s3, tmp_path):
    src = tmp_path / "raw"
    write_files(src / "hotdog", [f"{i}.jpg" for i in range(5)])
    write_files(src / "nohotdog", [f"{i}.jpg" for i in range(5)])
    bucket = s3.bucket()
    src_uri = s3.upload_dir(src, bucket, "raw")
    counts = prepare(src_uri, f"s3://{bucket}/ready", layout="split-folders", ratios="0.6,0.4")
    assert counts == {"train": 6, "validation": 4}
    keys = {o["Key"] for o in s3.client.list_objects_v2(Bucket=bucket, Prefix="ready/")["Contents"]}
    assert len(keys) == 10 and all(k.split("/")[1] in ("train", "validation") for k in keys)


def test_sample_is_the_full_digits_set_stratified():
    plan = sample_plan()
    assert len(plan) == 1797
    per_split: dict[str, dict[str, int]] = {}
    for split, cls, _, _ in plan:
        per_split.setdefault(split, {}).setdefault(cls, 0)
        per_split[split][cls] += 1
    assert set(per_split) == {"train", "validation", "test"}
    assert all(len(c) == 10 for c in per_split.values())
    # Stratified: every class is about 10% of every split.
    assert all(0.08 < n / sum(c.values()) < 0.12 for c in per_split.values() for n in c.values())
    assert [p[:3] for p in plan] == [p[:3] for p in sample_plan()]  # fixed split


def test_sample_to_s3_reads_back(s3, ray_session):
    bucket = s3.bucket()
    counts = write_sample(f"s3://{bucket}/digits")
    assert sum(counts.values()) == 1797
    layout = discover(DataSettings(root=f"s3://{bucket}/digits"), required=("train", "validation", "test"))
    assert layout.classes == [str(d) for d in range(10)]
    assert sum(len(f) for f in layout.files.values()) == 1797


def test_sample_can_be_rewritten_but_not_over_other_data(tmp_path):
    assert sum(write_sample(str(tmp_path / "s")).values()) == 1797
    assert sum(write_sample(str(tmp_path / "s")).values()) == 1797  # rerun of the Quickstart
    (tmp_path / "s" / "train" / "0" / "mine.png").write_bytes(b"x")
    with pytest.raises(PrepareError, match="holds other files"):
        write_sample(str(tmp_path / "s"))
