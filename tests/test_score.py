"""Batch scoring for real: one Parquet row per input file (bad ones with their reason), answers
equal to the shared predictor's, a rerun replaces the partition, and S3 on loopback works too."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from hotdog_ray.bundle import ModelBundle, model_meta
from hotdog_ray.errors import ConfigError, ScoreError
from hotdog_ray.predict import Predictor
from hotdog_ray.registry import set_alias
from hotdog_ray.score import expand, run_date, score
from tests.helpers import register_model, set_args, tiny_model, tiny_model_config, wait_until
from tests.imagegen import CLASSES, LEVELS, VARIANTS, encode, truncated_jpeg

BAD = {
    "empty.jpg": b"",
    "notes.jpg": b"plain text\n" * 5,
    "report.pdf": b"%PDF-1.4\n%%EOF\n",
    "cut.jpg": truncated_jpeg(),
}


def test_date_expansion_and_parsing():
    day = dt.date(2026, 11, 23)
    assert expand("s3://b/incoming/{date}/", day) == "s3://b/incoming/2026-11-23/"
    assert run_date("2026-01-02") == dt.date(2026, 1, 2)
    today = dt.datetime.now(dt.timezone.utc).date()
    assert run_date(None) == run_date("today") == today
    assert run_date("yesterday") == today - dt.timedelta(days=1)  # the nightly job's date (k8s/)
    with pytest.raises(ScoreError, match="YYYY-MM-DD"):
        run_date("last week")


class Killed(BaseException):
    """Stands for the process dying at that call (nothing after it runs)."""


class DiesOnSecondMove(pafs.LocalFileSystem):
    """A local disk whose process dies at the second rename."""

    moves = 0

    def move(self, src, dest):
        DiesOnSecondMove.moves += 1
        if DiesOnSecondMove.moves == 2:
            raise Killed
        return super().move(src, dest)


class DiesOnDelete(pafs.S3FileSystem):
    """An object store whose process dies at the first delete."""

    def delete_file(self, path):
        raise Killed


class ScoredBlocks:
    """Stands for the scoring dataset: its blocks, as the driver iterates them."""

    def __init__(self, blocks: list[pa.Table]) -> None:
        self.blocks = blocks

    def iter_batches(self, **kwargs):
        assert kwargs == {"batch_size": None, "batch_format": "pyarrow"}
        return iter(self.blocks)


def _staged(fs, path: str, score_id: str, n: int) -> None:
    """A run's staged output: one Parquet file (named after its run, as the scoring driver names them)."""
    import pyarrow.parquet as pq

    fs.create_dir(path)
    with fs.open_output_stream(f"{path}/{score_id}_000000.parquet") as f:
        pq.write_table(pa.table({"score_id": [score_id] * n}), f)


def _runs(fs, path: str) -> list[str]:
    return sorted(read_partition(path, fs)["score_id"].to_pylist())


def test_a_run_killed_while_publishing_locally_loses_nothing(tmp_path):
    """Two renames swap the partition; killed between them, the next run puts the old one back first."""
    from hotdog_ray import storage
    from hotdog_ray.publish import publish, restore_interrupted_publish

    day = dt.date(2026, 11, 23)
    out = storage.resolve(str(tmp_path / "predictions"))
    final = out.join("date=2026-11-23").path
    _staged(out.fs, out.join("_staging", "date=2026-11-23-a").path, "a", 3)
    publish(out.fs, out.join("_staging", "date=2026-11-23-a").path, final)
    assert _runs(out.fs, final) == ["a"] * 3

    _staged(out.fs, out.join("_staging", "date=2026-11-23-b").path, "b", 2)
    with pytest.raises(Killed):
        publish(DiesOnSecondMove(), out.join("_staging", "date=2026-11-23-b").path, final)
    assert not Path(final).exists()  # the instant between the renames: the old partition is aside
    assert restore_interrupted_publish(out, day)  # what the next run does before anything else
    assert _runs(out.fs, final) == ["a"] * 3
    assert not restore_interrupted_publish(out, day)  # nothing left to restore


def test_the_driver_writes_every_scored_block_into_files_named_after_the_run(tmp_path, monkeypatch):
    """Blocks are gathered into row groups and rolled into a new file at the size limit; every row
    lands once, in order, and the progress line counts them as they arrive."""
    import pyarrow.parquet as pq

    from hotdog_ray import score as scoring
    from hotdog_ray import storage
    from hotdog_ray.process import Progress

    monkeypatch.setattr(scoring, "ROW_GROUP_ROWS", 10)
    monkeypatch.setattr(scoring, "ROWS_PER_FILE", 25)
    blocks = [pa.table({"path": [f"f{i}-{j}" for j in range(7)]}) for i in range(9)]  # 63 rows

    out = storage.resolve(str(tmp_path / "out"))
    job = scoring.ScorePlan(
        day=dt.date(2026, 11, 23), input="in", fs=None, paths=[], out=out, score_id="2026-11-23-abc"
    )
    progress = Progress(63, 0.0, "scored")
    assert scoring.write_rows(ScoredBlocks(blocks), job, progress) == 63

    files = sorted(Path(job.staging.path).iterdir())
    assert [f.name for f in files] == [f"2026-11-23-abc_{i:06d}.parquet" for i in range(3)]
    rows = [pq.read_table(f).num_rows for f in files]
    assert rows == [28, 28, 7]  # 14-row groups (two blocks reach 10), a new file once 25 are in one
    assert pa.concat_tables(pq.read_table(f) for f in files)["path"].to_pylist() == [
        p for b in blocks for p in b["path"].to_pylist()
    ]
    assert progress.lines[-1].startswith("scored 63 of 63 files")


def test_a_run_killed_while_publishing_to_s3_loses_nothing(s3):
    """S3 has no rename: new files go in before the old ones go, so a crash never leaves rows missing."""
    from hotdog_ray import storage
    from hotdog_ray.publish import publish

    bucket = s3.bucket("publish")
    out = storage.resolve(f"s3://{bucket}/predictions")
    final = out.join("date=2026-11-23").path
    for run, n in (("a", 3), ("b", 2)):
        _staged(out.fs, out.join("_staging", f"date=2026-11-23-{run}").path, run, n)
    publish(out.fs, out.join("_staging", "date=2026-11-23-a").path, final)
    dying = DiesOnDelete(
        endpoint_override=s3.endpoint.removeprefix("http://"),
        scheme="http",
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
    )
    with pytest.raises(Killed):
        publish(dying, out.join("_staging", "date=2026-11-23-b").path, final)
    assert _runs(out.fs, final) == ["a"] * 3 + ["b"] * 2  # both runs' rows, told apart by score_id; none lost
    _staged(out.fs, out.join("_staging", "date=2026-11-23-c").path, "c", 4)
    publish(out.fs, out.join("_staging", "date=2026-11-23-c").path, final)  # the next run replaces both
    assert _runs(out.fs, final) == ["c"] * 4


@pytest.fixture(scope="module")
def scoring(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("score")
    cfg = tiny_model_config(tmp, "score.batch_size=4")
    model = tiny_model(CLASSES)
    set_alias(cfg.tracking, register_model(cfg, model, CLASSES, name="for-scoring")[1])
    return cfg, Predictor(ModelBundle(model, model_meta(cfg, list(CLASSES))), device="cpu")


def write_inputs(folder: Path) -> dict[str, bytes]:
    files = {}
    for i, (mode, fmt, size) in enumerate(VARIANTS * 2):
        cls = CLASSES[i % len(CLASSES)]
        files[f"sub/{cls}_{i}.{'jpg' if fmt == 'JPEG' else 'png'}"] = encode(
            LEVELS[cls], mode, fmt, size, seed=i
        )
    files.update(BAD)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


def read_partition(uri_path: str, fs=None):
    return pads.dataset(uri_path, filesystem=fs, format="parquet").to_table()


def check(table, files: dict[str, bytes], predictor: Predictor) -> None:
    rows = {
        Path(p).name if Path(p).name in BAD else "/".join(Path(p).parts[-2:]): i
        for i, p in enumerate(table["path"].to_pylist())
    }
    assert table.num_rows == len(files) == len(rows)  # one row per input, no duplicates
    for name, data in files.items():
        row = {k: table[k][rows[name]].as_py() for k in table.column_names}
        if name in BAD:
            assert row["error"] and row["label"] is None and row["probabilities"] is None
        else:
            assert row["error"] is None
            expected = predictor.predict(data).probabilities
            got = dict(row["probabilities"])
            assert got == pytest.approx(expected, abs=1e-5) and row["label"] == max(
                expected, key=expected.get
            )
            assert row["model_version"] == "1" and row["model_name"] == "hotdog-classifier"


# Runs in a fresh interpreter: does the scoring actor's code import PyTorch?
ACTOR = """
import json, sys
from pathlib import Path
import numpy as np
from hotdog_ray.scorer import Scorer

folder = Path(sys.argv[1])
meta = json.loads((folder / "meta.json").read_text())
actor = Scorer(meta=meta, weights={}, onnx=(folder / "model.onnx").read_bytes(), ood_bank=None,
               model=("hotdog-classifier", "1"), score_id="run", device="cpu", runtime="onnxruntime", threads=1)
images = np.load(folder / "images.npy")
n = len(images)  # the last one marked undecodable
errors, paths = np.array([""] * (n - 1) + ["bad"], object), np.array([str(i) for i in range(n)], object)
table = actor({"image": images, "error": errors, "path": paths})
probs = [None if p is None else dict(p) for p in table["probabilities"].to_pylist()]
print(json.dumps({"torch": "torch" in sys.modules, "probabilities": probs, "error": table["error"].to_pylist()}))
"""


def test_a_cpu_scoring_actor_runs_the_onnx_graph_without_importing_pytorch(scoring, tmp_path):
    """On the CPU with ONNX Runtime the actor needs neither PyTorch nor the weights, and answers as
    the predictor does (the failed row keeps its error)."""
    import subprocess
    import sys

    import numpy as np

    cfg, _ = scoring
    predictor = Predictor.from_config(cfg, device="cpu")  # the registered version, with its ONNX graph
    assert predictor.runtime == "onnxruntime"
    images = np.stack(
        [predictor.preprocess(encode(LEVELS[c], "RGB", "JPEG", (20, 20), seed=3)) for c in CLASSES]
    )
    images = np.concatenate([images, np.zeros_like(images[:1])])  # a third row, marked undecodable
    (tmp_path / "meta.json").write_text(json.dumps(predictor.bundle.meta))
    (tmp_path / "model.onnx").write_bytes(predictor.bundle.onnx)
    np.save(tmp_path / "images.npy", images)
    out = subprocess.run(
        [sys.executable, "-c", ACTOR, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["torch"] is False
    n = len(CLASSES)
    assert got["error"] == [None] * n + ["bad"] and got["probabilities"][n] is None
    expected = predictor.predict_arrays(images[:n]).probabilities
    for row, want in zip(got["probabilities"][:n], expected, strict=True):
        assert [row[c] for c in predictor.classes] == pytest.approx(want.tolist(), abs=1e-6)


def test_every_file_gets_one_row_and_a_rerun_replaces_the_partition(ray_session, scoring, tmp_path):
    cfg, predictor = scoring
    files = write_inputs(tmp_path / "incoming" / "2026-11-23")
    args = {
        "input": str(tmp_path / "incoming" / "{date}"),
        "output": str(tmp_path / "predictions"),
        "date": "2026-11-23",
    }
    first = score(cfg, **args)
    part = tmp_path / "predictions" / "date=2026-11-23"
    assert (first.files, first.scored, first.failed) == (len(files), len(files) - len(BAD), len(BAD))
    table = read_partition(str(part))
    check(table, files, predictor)
    written = json.loads((part / "_summary.json").read_text())
    assert written["files"] == len(files) and written["run_id"] == first.run_id
    from mlflow.tracking import MlflowClient

    run = MlflowClient(cfg.tracking.uri).get_run(first.run_id)  # the summary names the scoring run
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "scoring"
    assert run.data.metrics["files"] == len(files) and run.data.tags["output"] == first.output

    second = score(cfg, **args)
    again = read_partition(str(part))
    check(again, files, predictor)
    assert set(again["score_id"].to_pylist()) == {second.score_id} != {first.score_id}
    assert not (tmp_path / "predictions" / "_staging").exists()  # nothing left behind
    import pandas as pd

    df = pd.read_parquet(part)
    assert len(df) == len(files) and df["error"].notna().sum() == len(BAD)


def test_scoring_from_and_to_s3(ray_session, scoring, s3, tmp_path):
    cfg, predictor = scoring
    # Two model actors sharing the cores with the decoding tasks (2 x 0.75 + 0.5 CPUs).
    cfg = cfg.model_copy(
        update={"score": cfg.score.model_copy(update={"num_actors": 2, "cpus_per_actor": 0.75})}
    )
    files = write_inputs(tmp_path / "in")
    bucket = s3.bucket("score")
    src = s3.upload_dir(tmp_path / "in", bucket, "incoming/2026-11-23")
    summary = score(
        cfg, input=src.replace("2026-11-23", "{date}"), output=f"s3://{bucket}/predictions", date="2026-11-23"
    )
    assert summary.files == len(files) and summary.output == f"s3://{bucket}/predictions/date=2026-11-23"
    from hotdog_ray import storage

    loc = storage.resolve(summary.output)
    check(read_partition(loc.path, loc.fs), files, predictor)


def test_actors_that_would_hold_every_cpu_are_refused_naming_the_keys(ray_session, scoring, tmp_path):
    from hotdog_ray.score import check_cluster

    cfg, _ = scoring
    fits = cfg.model_copy(
        update={"score": cfg.score.model_copy(update={"num_actors": 2, "cpus_per_actor": 0.75})}
    )
    starves = cfg.model_copy(
        update={"score": cfg.score.model_copy(update={"num_actors": 2, "cpus_per_actor": 1.0})}
    )
    check_cluster(fits, str(tmp_path / "out"))  # one node: a local output is fine
    with pytest.raises(ConfigError, match=r"score\.num_actors or score\.cpus_per_actor") as err:
        check_cluster(starves, str(tmp_path / "out"))
    assert "asked 2 x {CPU: 1}" in str(err.value) and "{CPU: 2}" in str(err.value)


def test_a_missing_input_fails_before_any_work(scoring, tmp_path):
    cfg, _ = scoring
    with pytest.raises(ScoreError, match="does not exist"):
        score(cfg, input=str(tmp_path / "nope"), output=str(tmp_path / "out"), date="2026-11-23")
    assert not (tmp_path / "out").exists()


def small_photos(folder: Path, n: int) -> list[str]:
    """``n`` 12-pixel grayscale PNGs of the three classes in ``folder``; their names, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"img_{i:04d}.png" for i in range(n)]
    for i, name in enumerate(names):
        (folder / name).write_bytes(encode(LEVELS[CLASSES[i % 3]], "L", "PNG", (12, 12), seed=i))
    return names


def test_a_killed_run_leaves_the_partition_as_it_was_and_a_rerun_completes_it(
    ray_session, scoring, tmp_path, joining_env
):
    """A first run publishes; jobs/batch_score.py as a subprocess (joining this session's Ray) is
    SIGKILLed while writing; the partition is still the first run's; a third run replaces it whole.
    The first and third runs are in this process: two job processes fewer to start."""
    import os
    import signal
    import subprocess
    import sys

    cfg, predictor = scoring
    incoming, out = tmp_path / "incoming", tmp_path / "predictions"
    names = small_photos(incoming, 1500)
    part = out / "date=2026-11-23"
    job = Path(__file__).resolve().parents[1] / "jobs" / "batch_score.py"
    settings = [f"tracking.uri={cfg.tracking.uri}", "score.batch_size=8", "data.files_per_task=16"]
    cmd = [sys.executable, str(job), "--input", str(incoming), "--output", str(out), "--date", "2026-11-23"]
    cmd += ["--json", *set_args(settings)]
    # Large batches where nothing is to be killed; small ones keep the victim writing for a while.
    fast = cfg.model_copy(update={"score": cfg.score.model_copy(update={"batch_size": 64})})
    first_run = score(fast, input=str(incoming), output=str(out), date="2026-11-23").score_id

    victim = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=joining_env, start_new_session=True
    )
    try:
        wait_until(
            lambda: victim.poll() is not None or list(out.glob("_staging/date=2026-11-23-*/*.parquet")),
            timeout=300,
            interval=0.05,
        )
        assert victim.poll() is None, "the run finished before it could be killed"
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
    kept = read_partition(str(part))
    assert kept.num_rows == len(names) and set(kept["score_id"].to_pylist()) == {first_run}

    third_run = score(fast, input=str(incoming), output=str(out), date="2026-11-23").score_id
    table = read_partition(str(part))
    assert table.num_rows == len(names) and set(table["score_id"].to_pylist()) == {third_run}
    assert sorted(Path(p).name for p in table["path"].to_pylist()) == names
    assert not (out / "_staging").exists()


def test_unset_num_actors_runs_as_many_actors_as_fit_beside_decoding_at_most_one_per_cpu():
    from hotdog_ray.score import auto_actors

    half, whole = {"CPU": 0.5}, {"CPU": 1.0}
    assert auto_actors([{"CPU": 2.0}], half) == 2  # one per core, half a CPU each left over
    assert auto_actors([{"CPU": 2.0}], whole) == 1  # a second would leave decoding no CPU
    assert auto_actors([{"CPU": 16.0}, {"CPU": 8.0}], half) == 24
    assert auto_actors([{"CPU": 4.0}, {"CPU": 4.0}], {"CPU": 2.0}) == 3  # room for decoding on one node
    gpu = {"CPU": 0.5, "GPU": 1.0}
    assert auto_actors([{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0}], gpu) == 2
    assert auto_actors([{"CPU": 8.0, "GPU": 4.0}], {"CPU": 0.5, "GPU": 0.5}) == 8
    assert auto_actors([{"CPU": 4.0}], gpu) == 1  # no GPU node yet: one actor, as the autoscaler is asked
    assert auto_actors([], half) == 1


PALETTE = ((200, 60, 50), (60, 170, 60), (50, 80, 200), (210, 190, 60), (150, 60, 170), (90, 90, 90))


def photo(rng, side: tuple[int, int], orientation: int = 1, cls: int | None = None) -> bytes:
    """A photo-like JPEG: a gradient over a base colour (``PALETTE[cls]``, else random), a blob and
    texture; EXIF orientation if not 1."""
    import io

    import numpy as np
    from PIL import Image

    w, h = side
    yy, xx = np.mgrid[0:h, 0:w]
    colour = rng.uniform(0, 255, 3) if cls is None else np.asarray(PALETTE[cls]) + rng.normal(0, 12, 3)
    base = colour + xx[..., None] * rng.uniform(-1, 1, 3) * 60 / w
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    blob = 120 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.05 * w * h))[..., None]
    img = np.clip(base + blob * rng.uniform(-1, 1, 3) + rng.normal(0, 10, (h, w, 3)), 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, "JPEG", quality=88, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_device_decoding_turns_photos_upright_as_the_cpu_path_does(orientation):
    import numpy as np
    import torch

    from hotdog_ray.device_decode import decode_on_device
    from hotdog_ray.images import decode_image

    data = photo(np.random.default_rng(orientation), (48, 32), orientation)
    (on_device,), errors = decode_on_device([data], 24, torch.device("cpu"), max_pixels=10**7, min_side=8)
    assert errors == [""]
    cpu = decode_image(data, 24).astype(float)
    assert np.abs(on_device.numpy().astype(float) - cpu).mean() < 4  # same picture, same way up
    wrong = [np.abs(np.rot90(cpu, k).astype(float) - cpu).mean() for k in (1, 2)]
    assert min(wrong) > 10  # and the picture is not symmetric enough for a wrong turn to pass


def test_device_and_cpu_decoding_agree_on_top1_for_a_photo_set():
    """The device path (its code, the device set to the CPU) against the CPU path, through a small
    CNN trained on the CPU path's pixels (a random network's near-ties would measure nothing)."""
    import numpy as np
    import torch

    from hotdog_ray.device_decode import decode_on_device
    from hotdog_ray.images import decode_image, to_model_input

    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(PALETTE), 600)
    photos = [
        photo(rng, (int(rng.integers(40, 400)), int(rng.integers(40, 400))), int(rng.integers(1, 9)), c)
        for c in labels
    ]
    size, y = 32, torch.from_numpy(labels)
    cpu = torch.from_numpy(np.stack([decode_image(p, size) for p in photos]))
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(128, len(PALETTE)),
    )
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    x_train = to_model_input(cpu[:200], "unit")
    for _ in range(150):  # trained on the first 200 photos' CPU pixels; checked on the other 400
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x_train), y[:200]).backward()
        opt.step()
    device, errors = decode_on_device(photos[200:], size, torch.device("cpu"), max_pixels=10**7, min_side=8)
    assert errors == [""] * 400
    with torch.no_grad():
        top_cpu, top_device = (net(to_model_input(x, "unit")).argmax(1) for x in (cpu[200:], device))
    assert float((top_cpu == y[200:]).float().mean()) > 0.8  # a model that tells the photos apart
    agreement = float((top_cpu == top_device).float().mean())
    assert agreement >= 0.995, agreement


def test_actors_that_decode_on_their_device_answer_every_file_with_the_same_reasons(
    ray_session, scoring, tmp_path
):
    cfg, predictor = scoring
    files = write_inputs(tmp_path / "in")
    on_actors = cfg.model_copy(update={"score": cfg.score.model_copy(update={"decode": "actors"})})
    assert on_actors.score.decode_on_actors and not cfg.score.decode_on_actors  # auto on the CPU: tasks
    runs = {}
    for name, c in (("tasks", cfg), ("actors", on_actors)):
        summary = score(c, input=str(tmp_path / "in"), output=str(tmp_path / name), date="2026-11-23")
        assert (summary.files, summary.failed) == (len(files), len(BAD))
        table = read_partition(str(tmp_path / name / "date=2026-11-23"))
        runs[name] = {
            p: (label, error)
            for p, label, error in zip(*(table[k].to_pylist() for k in ("path", "label", "error")))
        }
    assert runs["actors"].keys() == runs["tasks"].keys()
    for path, (label, error) in runs["tasks"].items():
        assert runs["actors"][path][1] == error  # a bad file's reason, word for word
    agree = sum(runs["actors"][p][0] == label for p, (label, _) in runs["tasks"].items())
    assert agree >= len(files) - 1  # tiny odd-mode images: the resize filters may differ on one
