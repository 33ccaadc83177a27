"""Nightly batch scoring with Ray Data: every input file gets exactly one row, published atomically.

Ray Data reads the files as bytes (one bad file cannot fail the job), decodes them in parallel
tasks with the shared predictor's preprocessing, and scores them in an actor pool. Rows are
written as Parquet to a staging folder; only when the row count equals the input count is the
``date=YYYY-MM-DD`` partition replaced by it, so a rerun replaces and a crashed run leaves the
published partition as it was.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.fs as pafs
import ray.data

from hotdog_ray import drift, registry, storage, telemetry, tracking
from hotdog_ray.config import Config
from hotdog_ray.data import read_bytes_dataset
from hotdog_ray.errors import HotdogError, ScoreError
from hotdog_ray.predict import Predictor, cpu_threads
from hotdog_ray.process import Progress
from hotdog_ray.publish import (
    PartitionWriter,
    clean_stale_staging,
    count_rows,
    partition_name,
    publish,
    restore_interrupted_publish,
)
from hotdog_ray.runtime import alive_nodes, check_capacity, check_shared_store, init_ray, placement_problem
from hotdog_ray.scorer import Scorer, decode_for_scoring

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

SUMMARY_FILE = "_summary.json"  # leading underscore: Parquet readers skip it
DECODE_CPUS = 0.5  # each fused read-and-decode task
ROW_GROUP_ROWS = 65_536  # rows the driver gathers before writing a Parquet row group
ROWS_PER_FILE = 1_048_576  # rows in each Parquet file of a run


def run_date(value: str | dt.date | None) -> dt.date:
    """The date a run scores: YYYY-MM-DD to backfill, ``today`` (the default) or ``yesterday``, in UTC.

    A nightly job that runs after midnight scores ``yesterday``: that day's images are complete.
    """
    if isinstance(value, dt.date):
        return value
    today = dt.datetime.now(dt.timezone.utc).date()
    relative = {None: today, "today": today, "yesterday": today - dt.timedelta(days=1)}
    if value in relative:
        return relative[value]
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise ScoreError(f"--date {value!r} is not YYYY-MM-DD, today or yesterday") from None


def expand(template: str, date: dt.date) -> str:
    """``{date}`` in a path becomes the run date (``s3://b/incoming/{date}/``)."""
    return template.replace("{date}", date.isoformat())


@dataclass(kw_only=True)
class ScoreSummary:
    date: str
    input: str
    output: str
    files: int
    scored: int
    failed: int
    seconds: float
    images_per_s: float
    model: str
    model_version: str | None
    score_id: str  # this scoring run's label: its rows' score_id and its files' prefix
    run_id: str | None = None  # the MLflow run
    actors: int | None = None  # model actors the run used (score.num_actors, or as many as fitted)
    drift: dict[str, Any] | None = None  # the day against the model's reference (hotdog_ray.drift)


def weights_of(model: Any) -> dict[str, np.ndarray]:
    """A model's state as plain arrays (shared through Ray's object store without pickling tensors)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def list_inputs(uri: str) -> tuple[Any, list[str]]:
    """(filesystem, paths) of every file under a prefix, or of every line of a list file."""

    loc = storage.resolve(uri)
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.File:
        lines = [line.strip() for line in storage.read_bytes(loc.fs, loc.path).decode().splitlines()]
        uris = [line for line in lines if line and not line.startswith("#")]
        return (storage.resolve(uris[0]).fs if uris else loc.fs), [storage.resolve(u).path for u in uris]
    if info.type == pafs.FileType.NotFound:
        raise ScoreError(f"input {uri} does not exist")
    return loc.fs, storage.list_files(loc)


@dataclass(kw_only=True)
class ScorePlan:
    """What one scoring run reads and where it writes, fixed before any work starts."""

    day: dt.date
    input: str
    fs: Any  # the input files' filesystem
    paths: list[str]
    out: Any  # storage.Location of the Parquet root
    score_id: str

    @property
    def staging(self):
        return self.out.join("_staging", f"{partition_name(self.day)}-{self.score_id}")

    @property
    def final(self):
        return self.out.join(partition_name(self.day))


def plan(cfg: Config, input: str | None, output: str | None, date: str | dt.date | None) -> ScorePlan:
    """Resolve the run's date, input files and output location; raises :class:`ScoreError` when unusable."""

    day = run_date(date)
    input, output = input or cfg.score.input, output or cfg.score.output
    if not input or not output:
        raise ScoreError("give the input and output (--input/--output or score.input/score.output)")
    in_uri = expand(input, day)
    fs, paths = list_inputs(in_uri)
    out = storage.resolve(expand(output, day).rstrip("/"))
    score_id = f"{day.isoformat()}-{uuid.uuid4().hex[:8]}"
    return ScorePlan(day=day, input=in_uri, fs=fs, paths=paths, out=out, score_id=score_id)


def score(
    cfg: Config,
    *,
    input: str | None = None,
    output: str | None = None,
    date: str | dt.date | None = None,
    model: str | None = None,
) -> ScoreSummary:
    """Score a night's images and publish ``<output>/date=YYYY-MM-DD/`` (replacing an earlier run's).

    Args:
        cfg: the validated config (``score``, ``data``, ``predict`` and ``tracking`` sections).
        input: a prefix or list file of images; ``{date}`` becomes the run date (default ``score.input``).
        output: the Parquet root (default ``score.output``).
        date: ``YYYY-MM-DD``, ``today`` (default) or ``yesterday``, in UTC.
        model: the model reference (default ``score.model_uri``, else the registry's alias or newest version).
    """
    job = plan(cfg, input, output, date)
    ref = model or cfg.score.model_uri or registry.default_model_ref(cfg.tracking)
    # Resolved once: every actor scores the same version, even if the alias moves meanwhile.
    key = registry.resolve_model_ref(cfg.tracking, ref)
    restore_interrupted_publish(job.out, job.day)
    init_ray()
    actors = actor_count(cfg)
    check_cluster(cfg, job.out.uri, actors)
    log.info("scoring %d files from %s with %s (%d actors)", len(job.paths), job.input, key, actors)
    t0 = time.perf_counter()
    # Fails here, before any work, if the model is missing (or lacks the ONNX graph asked for).
    predictor = Predictor.from_config(cfg, key, device="cpu", threads=1)
    if job.paths:
        progress = Progress(len(job.paths), cfg.monitor.progress_interval_s, "scored")
        write_rows(scoring_dataset(cfg, job, predictor, actors), job, progress)
    summary = _summary(job, predictor, time.perf_counter() - t0)
    summary.actors = actors
    publish_recorded(cfg, job, summary)
    log.info("published %s: %d scored, %d failed", job.final.uri, summary.scored, summary.failed)
    _export_metrics(summary)
    return summary


def publish_recorded(cfg: Config, job: ScorePlan, summary: ScoreSummary) -> None:
    """Opens the run's MLflow record, checks drift, and publishes the staged partition with its
    summary; the MLflow run comes first, so that the summary beside the Parquet names it."""
    with tracking.run(
        cfg.tracking,
        name=f"score-{job.score_id}",
        tags={
            "kind": "scoring",
            "date": summary.date,
            "input": job.input,
            "output": job.final.uri,
            "model_version": summary.model_version or "",
        },
    ) as mlflow_run:
        summary.run_id = mlflow_run.id
        summary.drift = _drift(cfg, job, summary, mlflow_run)
        storage.write_bytes(
            job.out.fs, f"{job.staging.path}/{SUMMARY_FILE}", json.dumps(asdict(summary), indent=2).encode()
        )
        publish(job.out.fs, job.staging.path, job.final.path)
        clean_stale_staging(job.out, job.day)
        mlflow_run.log_metrics(
            {
                "files": summary.files,
                "scored": summary.scored,
                "failed": summary.failed,
                "seconds": summary.seconds,
                "images_per_s": summary.images_per_s,
            }
        )
        mlflow_run.log_dict(asdict(summary), "summary.json")


def _drift(cfg: Config, job: ScorePlan, summary: ScoreSummary, run: Any) -> dict[str, Any]:
    """The night's answers against the model's reference profile; a model without one (trained
    before drift checks) is said in the summary, and the scores are published all the same."""

    table = drift.read_parquet_folder(job.staging)
    try:
        report = drift.assess(
            cfg,
            drift.answers_of(table, "model_version"),
            date=summary.date,
            source="scores",
            run=run,
            version=summary.model_version,
        )
    except HotdogError as exc:
        log.warning("no drift check for this run: %s", exc)
        return {"error": str(exc)}
    return report.to_dict()


def _export_metrics(summary: ScoreSummary) -> None:
    """The run's figures as hotdog_score_* series (scraped while the job's Ray runs; the alert on a
    missing nightly run reads the last success time)."""

    series = telemetry.job_gauges(
        "hotdog_score_images", "hotdog_score_images_per_second", "hotdog_score_last_success_timestamp_seconds"
    )
    if series:
        for outcome, n in (("scored", summary.scored), ("failed", summary.failed)):
            if n:
                series["hotdog_score_images"].inc(n, tags={"outcome": outcome})
        series["hotdog_score_images_per_second"].set(summary.images_per_s)
        series["hotdog_score_last_success_timestamp_seconds"].set(time.time())


def scoring_dataset(cfg: Config, job: ScorePlan, predictor: Any, actors: int) -> "ray.data.Dataset":
    """Read, decode and score ``job.paths`` with ``actors`` model actors: one output row per input
    file, as Arrow blocks."""

    device = "cuda" if cfg.score.gpus_per_actor else "cpu"
    guards = {
        "size": predictor.image_size,
        "max_pixels": cfg.data.max_image_pixels,
        "min_side": cfg.data.min_image_side,
    }
    # Reading and decoding share their resources so that Ray Data fuses them into one task (bytes
    # never cross the object store), and that half a CPU each leaves room beside the model actors.
    # CPU actors of the same half CPU (the default) take both in too: each actor then reads, decodes
    # and scores its own blocks, and every core stays busy to the end of the run (with decoding in
    # separate tasks, it finished first and left the model actor alone on one core; bench/RESULTS.md).
    # Actors that decode on their device (score.decode) get the bytes instead.
    ds = read_bytes_dataset(job.paths, job.fs, cfg.data.files_per_task, num_cpus=DECODE_CPUS)
    if not cfg.score.decode_on_actors:
        ds = ds.map_batches(decode_for_scoring, fn_kwargs=guards, batch_size=None, num_cpus=DECODE_CPUS)
    ds = ds.map_batches(
        Scorer,
        fn_constructor_kwargs={
            "meta": predictor.bundle.meta,
            "weights": weights_of(predictor.model),
            "onnx": predictor.bundle.onnx,
            "ood_bank": predictor.bundle.ood_bank,
            "model": (predictor.info["name"], predictor.info["version"]),
            "score_id": job.score_id,
            "device": device,
            # On the CPU, what the driver's predictor chose; a GPU actor chooses for itself.
            "runtime": predictor.runtime if device == "cpu" else cfg.predict.runtime,
            "threads": cpu_threads(cfg.score.cpus_per_actor),
            "decode": guards if cfg.score.decode_on_actors else None,
        },
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=cfg.score.batch_size,
        num_cpus=cfg.score.cpus_per_actor,
        num_gpus=cfg.score.gpus_per_actor or None,
    )
    # Ray Data's per-operator reservations hold back CPUs for the model actors that they do not
    # use while decoding is the bottleneck: on 2 CPUs decoding ran one task at a time, and the
    # job was markedly slower on photos (bench/RESULTS.md). Memory stays bounded by backpressure.
    ds.context.op_resource_reservation_enabled = False
    return ds


def write_rows(ds: "ray.data.Dataset", job: ScorePlan, progress: Progress) -> int:
    """Write the scored rows into the run's staging folder from the driver, as they arrive; returns
    the row count and logs progress as it goes.

    A row is a path and a few numbers, so one writer keeps up with any number of model actors, where
    Ray Data's write tasks cost more than the writing (they start worker processes; bench/RESULTS.md,
    "Scoring: the driver writes the Parquet").
    """
    writer = PartitionWriter(
        job.out.fs, job.staging.path, job.score_id, group_rows=ROW_GROUP_ROWS, file_rows=ROWS_PER_FILE
    )
    with writer:
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.write(block)
            progress.update(writer.rows)
    return writer.rows


def _summary(job: ScorePlan, predictor: Any, seconds: float) -> ScoreSummary:
    """The run's counts; raises :class:`ScoreError` (nothing published) unless every file has a row."""
    rows, failed = count_rows(job.out.fs, job.staging.path)
    if rows != len(job.paths):
        raise ScoreError(
            f"wrote {rows} rows for {len(job.paths)} files; nothing published (staging: {job.staging.uri})"
        )
    return ScoreSummary(
        date=job.day.isoformat(),
        input=job.input,
        output=job.final.uri,
        files=len(job.paths),
        scored=rows - failed,
        failed=failed,
        seconds=round(seconds, 3),
        images_per_s=round(len(job.paths) / max(seconds, 1e-9), 1),
        model=predictor.info["name"],
        model_version=predictor.info["version"],
        score_id=job.score_id,
    )


def auto_actors(nodes: list[dict[str, float]], actor: dict[str, float]) -> int:
    """How many model actors of ``actor`` to run on ``nodes`` when ``score.num_actors`` is unset
    (pure): as many as fit beside a decoding task, at most one per CPU (one per GPU share for GPU
    actors), and at least one (an autoscaling cluster may have no worker node yet)."""

    if actor.get("GPU"):
        count = sum(int(n.get("GPU", 0.0) / actor["GPU"] + 1e-9) for n in nodes)
    else:
        count = sum(int(n.get("CPU", 0.0) + 1e-9) for n in nodes)
    while count > 1 and placement_problem(nodes, count, actor, DECODE_CPUS):
        count -= 1
    return max(count, 1)


def actor_count(cfg: Config) -> int:
    """The number of model actors to run: ``score.num_actors``, else :func:`auto_actors`."""
    return cfg.score.num_actors or auto_actors(alive_nodes(), _actor(cfg))


def check_cluster(cfg: Config, output: str, actors: int | None = None) -> None:
    """Fail in seconds when ``actors`` model actors (default :func:`actor_count`) would leave no CPU
    for the decoding tasks (the job would stall for good), or when actors on several nodes would
    write the output to local disks."""
    check_capacity(
        actors or actor_count(cfg),
        _actor(cfg),
        data_cpus=DECODE_CPUS,
        keys="score.num_actors or score.cpus_per_actor (score.gpus_per_actor)",
    )
    check_shared_store(output, "score.output", cfg.score.shared_output, "score.shared_output")


def _actor(cfg: Config) -> dict[str, float]:
    gpus = cfg.score.gpus_per_actor
    return {"CPU": cfg.score.cpus_per_actor, **({"GPU": gpus} if gpus else {})}
