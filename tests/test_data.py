"""The Ray Data pipeline on the same generated dataset, from a local folder and from S3 on loopback."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import torch

from hotdog_ray.config import DataSettings
from hotdog_ray.data import ImagePipeline, discover, iter_torch_batches
from hotdog_ray.errors import DataError
from hotdog_ray.inspection import inspect
from tests.imagegen import CLASSES, class_of_level


@pytest.fixture(params=["local", "s3"])
def dataset_uri(request, image_tree):
    if request.param == "local":
        return str(image_tree.root)
    s3 = request.getfixturevalue("s3")
    bucket = s3.bucket("data")
    return s3.upload_dir(image_tree.root, bucket, "images")


def collect(pipeline: ImagePipeline, split: str, rescale: str, **kw):
    images, labels = [], []
    for x, y in iter_torch_batches(pipeline.dataset(split, **kw), batch_size=8, rescale=rescale):
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


@pytest.mark.parametrize("rescale,lo,hi", [("unit", 0.0, 1.0), ("symmetric", -1.0, 1.0)])
def test_pipeline_yields_exactly_the_good_images(ray_session, image_tree, dataset_uri, rescale, lo, hi):
    cfg = DataSettings(root=dataset_uri, image_size=16, rescale=rescale)
    pipeline = ImagePipeline.from_config(cfg)
    assert pipeline.layout.classes == sorted(CLASSES)

    for split in ("train", "validation"):
        x, y = collect(pipeline, split, rescale)
        assert x.shape == (image_tree.good_count(split), 3, 16, 16) and x.dtype == torch.float32
        assert float(x.min()) >= lo and float(x.max()) <= hi
        # Labels checked against the pixels, not against the code that assigned them.
        level = ((x.mean(dim=(1, 2, 3)) - lo) / (hi - lo) * 255).numpy()
        from_pixels = [pipeline.layout.classes.index(class_of_level(v)) for v in level]
        assert y.tolist() == from_pixels
        counts = np.bincount(y.numpy(), minlength=len(CLASSES))
        assert counts.tolist() == [image_tree.good[split][c] for c in pipeline.layout.classes]

    skipped = pipeline.skipped()
    reported = sorted(p.split("/images/", 1)[-1] if dataset_uri.startswith("s3") else p for p in skipped)
    expected = sorted(
        b if dataset_uri.startswith("s3") else str(image_tree.root / b)
        for b in image_tree.bad
        if b.split("/")[0] in ("train", "validation")
    )
    assert reported == expected
    assert all(reason for reason in skipped.values())


def test_bad_files_are_counted_once_across_epochs(ray_session, image_tree):
    pipeline = ImagePipeline.from_config(DataSettings(root=str(image_tree.root), image_size=8))
    for _ in range(2):
        collect(pipeline, "train", "unit")
    assert len(pipeline.skipped()) == sum(b.startswith("train/") for b in image_tree.bad)


def test_keep_errors_keeps_every_row_with_its_reason_and_starts_no_skip_log(ray_session, image_tree):
    """The cache build's view: one row per file, the bad ones with their reason, nothing tallied
    by an actor (the consumer reads every row itself)."""
    pipeline = ImagePipeline.from_config(DataSettings(root=str(image_tree.root), image_size=8))
    rows = pipeline.dataset("train", keep_paths=True, keep_errors=True).take_all()
    errors = {r["path"].split("/train/", 1)[1]: r["error"] for r in rows}
    bad = {b.removeprefix("train/") for b in image_tree.bad if b.startswith("train/")}
    assert len(rows) == image_tree.good_count("train") + len(bad)
    assert {path for path, error in errors.items() if error} == bad
    assert "ok" not in rows[0] and pipeline.skipped() == {}


def test_only_train_is_augmented(ray_session, image_tree):
    cfg = DataSettings(
        root=str(image_tree.root),
        image_size=16,
        augment={"rotation": 45, "width_shift": 0.3, "brightness": [0.2, 0.5]},
    )
    pipeline = ImagePipeline.from_config(cfg)
    val_a, _ = collect(pipeline, "validation", "unit")
    val_b, _ = collect(pipeline, "validation", "unit", augment=True)
    assert torch.equal(val_a, val_b)  # never augmented: identical every pass

    plain, _ = collect(pipeline, "train", "unit")
    augmented, _ = collect(pipeline, "train", "unit", augment=True)
    assert plain.shape == augmented.shape
    # brightness 0.2..0.5 darkens every image a lot
    assert float(augmented.mean()) < 0.6 * float(plain.mean())


def test_train_split_shards_across_workers(ray_session, image_tree):
    pipeline = ImagePipeline.from_config(DataSettings(root=str(image_tree.root), image_size=8))
    shards = pipeline.dataset("train").streaming_split(2, equal=False)
    seen = [0, 0]

    def consume(i):
        for x, _ in iter_torch_batches(shards[i], batch_size=4, rescale="unit"):
            seen[i] += len(x)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sum(seen) == image_tree.good_count("train")


def test_class_subset_and_max_classes(ray_session, image_tree):
    pipeline = ImagePipeline.from_config(
        DataSettings(root=str(image_tree.root), image_size=8, classes=["hotdog", "cat"])
    )
    assert pipeline.layout.classes == ["cat", "hotdog"]
    _, y = collect(pipeline, "validation", "unit")
    assert sorted(set(y.tolist())) == [0, 1]
    assert len(y) == image_tree.good["validation"]["cat"] + image_tree.good["validation"]["hotdog"]

    layout = discover(DataSettings(root=str(image_tree.root), max_classes=2))
    assert layout.classes == ["cat", "dog"]
    with pytest.raises(DataError, match=r"\['pizza'\] are not in the dataset"):
        discover(DataSettings(root=str(image_tree.root), classes=["cat", "pizza"]))


def _copy(image_tree, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(image_tree.root, root)
    return root


def test_layout_errors_are_clear_and_early(image_tree, tmp_path):
    root = _copy(image_tree, tmp_path)
    shutil.rmtree(root / "validation")
    with pytest.raises(DataError, match=r"missing split folder\(s\) \['validation'\]"):
        discover(DataSettings(root=str(root)))
    discover(DataSettings(root=str(root)), required=("train",))  # fine when not required

    root = _copy(image_tree, tmp_path / "b")
    for cls in CLASSES:
        shutil.rmtree(root / "test" / cls)
        (root / "test" / cls).mkdir()
    with pytest.raises(DataError, match="split 'test' has no files"):
        discover(DataSettings(root=str(root)))

    root = _copy(image_tree, tmp_path / "c")
    for cls in ("dog", "hotdog"):
        shutil.rmtree(root / "validation" / cls)
    with pytest.raises(DataError, match="split 'validation' has only one class"):
        discover(DataSettings(root=str(root)))

    root = _copy(image_tree, tmp_path / "d")
    (root / "validation" / "pizza").mkdir()
    (root / "validation" / "pizza" / "p.png").write_bytes(b"x")
    with pytest.raises(DataError, match=r"classes \['pizza'\] that train does not"):
        discover(DataSettings(root=str(root)))


def test_inspect_reports_counts_bad_files_sizes_and_majority(ray_session, image_tree, tmp_path):
    root = _copy(image_tree, tmp_path)
    # Make validation lopsided, like the hotdog tutorial's 794 of 888 "nohotdog".
    for i in range(6):
        shutil.copy(
            root / "validation" / "dog" / "dog_000.png", root / "validation" / "dog" / f"extra_{i}.png"
        )
    report = inspect(DataSettings(root=str(root)))
    assert report["classes"] == list(CLASSES)
    assert report["unreadable"] == len(image_tree.bad)
    val = report["splits"]["validation"]
    assert val["counts"] == {"cat": 3, "dog": 9, "hotdog": 3}
    assert val["majority_class"] == "dog" and val["majority_share"] == pytest.approx(9 / 15)
    assert report["splits"]["train"]["min_size"] == [16, 16] and report["splits"]["train"]["max_size"] == [
        40,
        40,
    ]
    assert {u["path"].split("/ds/")[1] for s in report["splits"].values() for u in s["unreadable"]} == set(
        image_tree.bad
    )


def test_read_tasks_are_sized_by_files_and_cpus():
    from hotdog_ray.data import plan_read_tasks

    assert plan_read_tasks(3000, 2, 128) == 24  # by files
    assert plan_read_tasks(3000, 2, 256) == 12
    assert plan_read_tasks(100, 8, 128) == 16  # at least two per CPU
    assert plan_read_tasks(5, 8, 128) == 5  # never more tasks than files
    assert plan_read_tasks(0, 2, 128) == 1


@pytest.mark.parametrize("where", ["local", "s3"])
def test_read_files_reads_every_file_whole_and_in_order(request, tmp_path, where):
    from hotdog_ray import storage
    from hotdog_ray.data import read_files

    contents = [bytes([i]) * (1 + 1000 * i) for i in range(12)]
    for i, data in enumerate(contents):
        (tmp_path / f"f{i:02d}.bin").write_bytes(data)
    root = str(tmp_path)
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        root = s3.upload_dir(tmp_path, s3.bucket("read"), "files")
    loc = storage.resolve(root)
    paths = storage.list_files(loc)
    assert len(paths) == len(contents)
    for threads in (1, 4):  # object stores read on threads, in the order given
        out = read_files({"path": np.asarray(paths[::-1], dtype=object)}, fs=loc.fs, threads=threads)
        assert list(out["path"]) == paths[::-1]
        assert list(out["bytes"]) == contents[::-1]
    with pytest.raises(OSError):  # an I/O error fails the task, which Ray retries
        read_files({"path": np.asarray([loc.join("missing.bin").path], dtype=object)}, fs=loc.fs)


def test_training_order_mixes_classes(ray_session, image_tree):
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        pipeline = ImagePipeline.from_config(
            DataSettings(root=str(image_tree.root), image_size=8, files_per_task=4)
        )
        plain = [
            int(y)
            for _, ys in iter_torch_batches(pipeline.dataset("train"), batch_size=64, rescale="unit")
            for y in ys
        ]
        mixed = [
            int(y)
            for _, ys in iter_torch_batches(
                pipeline.dataset("train", shuffle_seed=1), batch_size=64, rescale="unit"
            )
            for y in ys
        ]
    finally:
        ctx.execution_options.preserve_order = saved
    changes = lambda seq: sum(a != b for a, b in zip(seq, seq[1:]))  # noqa: E731
    assert sorted(plain) == sorted(mixed)
    assert changes(plain) == len(CLASSES) - 1  # listed class by class
    assert changes(mixed) > len(mixed) // 3


def test_seeded_training_epochs_are_reproducible_and_differ_from_each_other(ray_session, image_tree):
    from ray.data import DataContext

    from hotdog_ray.config import AugmentSettings

    cfg = DataSettings(
        root=str(image_tree.root),
        image_size=8,
        files_per_task=4,
        augment=AugmentSettings(horizontal_flip=True, rotation=30),
    )

    def two_epochs(seed: int) -> list[torch.Tensor]:
        # Train iterates one dataset once per epoch; a fresh pipeline stands for a fresh run.
        ds = ImagePipeline.from_config(cfg).dataset("train", shuffle_seed=seed)
        ds.context.execution_options.preserve_order = True
        return [
            torch.cat([x for x, _ in iter_torch_batches(ds, batch_size=16, rescale="unit")]) for _ in range(2)
        ]

    run_a, run_b, other = two_epochs(7), two_epochs(7), two_epochs(8)
    assert DataContext.get_current().execution_options.preserve_order is False  # set per dataset only
    assert torch.equal(run_a[0], run_b[0]) and torch.equal(run_a[1], run_b[1])
    assert not torch.equal(run_a[0], run_a[1])  # a new order and new draws every epoch
    assert not torch.equal(run_a[0], other[0])
