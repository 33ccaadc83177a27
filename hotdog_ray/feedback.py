"""Training data from the field: the prediction log's answers that got a true label (``POST
/feedback``) exported into the dataset layout (``hotdog feedback export``).

An export writes ``<loop.data_root>/<YYYY-MM-DD>/train/<true label>/<sha256>.<ext>``: a dataset
root that training adds to ``data.root`` through ``data.extra_roots``. Files are named by the
image's hash, so an image is exported once however often the export runs or the image was
labelled (the latest label wins); a labelled answer whose image the log did not keep
(``prediction_log.images`` off) or whose label the model does not know is counted, never dropped
silently. Answers the true label contradicts although the model was sure (``loop.high_confidence``)
are the most useful ones: they are kept like the others and counted.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import posixpath
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from PIL import Image

from hotdog_ray import predlog, storage
from hotdog_ray.errors import ConfigError

if TYPE_CHECKING:
    from hotdog_ray.config import Config

log = logging.getLogger(__name__)

TRAINING_DATA = "training-data"  # under prediction_log.location when loop.data_root is not set


@dataclass(frozen=True)
class Labelled:
    """One answered image and its true label."""

    sha256: str
    label: str  # the true one
    answered: str  # what the model said
    probability: float
    time: float  # when the label came in (seconds since the epoch)


def labelled(rows: Sequence[dict[str, Any]], feedback: Sequence[dict[str, Any]]) -> list[Labelled]:
    """The answered images that got a true label (pure): the answer the client got (not a shadow's),
    the latest label of a request, and per image (by hash) its latest label."""
    answers = {r["request_id"]: r for r in rows if r["served_by"] != "shadow" and r.get("sha256")}
    latest: dict[str, Labelled] = {}
    for f in sorted(feedback, key=lambda f: _seconds(f["time"])):
        row = answers.get(f["request_id"])
        if row is None:
            continue
        latest[row["sha256"]] = Labelled(
            sha256=row["sha256"],
            label=f["label"],
            answered=row["label"],
            probability=float(row["probability"]),
            time=_seconds(f["time"]),
        )
    return sorted(latest.values(), key=lambda x: (x.time, x.sha256))


def _seconds(value: Any) -> float:
    return value.timestamp() if isinstance(value, dt.datetime) else float(value)


@dataclass
class ExportSummary:
    """What one export did, file by file accounted for."""

    folder: str
    labelled: int = 0
    exported: int = 0
    already: int = 0  # exported by an earlier run
    missing_image: int = 0  # the log kept no image (prediction_log.images off)
    unknown_label: int = 0  # a true label the model has no class for
    surprising: int = 0  # exported ones that contradicted a sure answer
    per_class: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return (
            f"feedback export: {self.labelled} labelled images: {self.exported} exported to {self.folder} "
            f"({self.surprising} contradicting a sure answer), {self.already} exported before, "
            f"{self.missing_image} without a stored image, {self.unknown_label} with an unknown label"
        )


def data_root(cfg: "Config") -> storage.Location:
    """Where exports go: ``loop.data_root``, else ``<prediction_log.location>/training-data``."""
    if cfg.loop.data_root:
        return storage.resolve(cfg.loop.data_root)
    if not cfg.prediction_log.location:
        raise ConfigError("prediction_log.location is not set: there is no labelled feedback to export")
    return storage.resolve(cfg.prediction_log.location).join(TRAINING_DATA)


def exported_folders(cfg: "Config") -> list[str]:
    """Every dated export folder so far (``data.extra_roots`` for a retrain), oldest first."""
    root = data_root(cfg)
    return [root.join(day).uri for day in storage.list_dirs(root)]


def read_labelled(cfg: "Config", since: str | None = None) -> list[Labelled]:
    """The labelled images of the prediction log (of the days from ``since``, YYYY-MM-DD, or all)."""
    location = cfg.prediction_log.location
    if not location:
        raise ConfigError("prediction_log.location is not set: there is no labelled feedback to export")
    rows = predlog.read(location, since=since).to_pylist()
    at = storage.resolve(location).join(predlog.FEEDBACK).uri
    return labelled(rows, predlog.read(at, since=since, schema=predlog.FEEDBACK_SCHEMA).to_pylist())


def export(cfg: "Config", classes: Sequence[str], *, day: dt.date | None = None) -> ExportSummary:
    """Write every labelled image not exported yet into today's (or ``day``'s) folder."""
    root = data_root(cfg)
    day = day or dt.datetime.now(dt.timezone.utc).date()
    folder = root.join(day.isoformat())
    done = {posixpath.basename(p).split(".")[0] for p in storage.list_files(root)}
    images = storage.resolve(cfg.prediction_log.location).join("images")
    summary = ExportSummary(folder=folder.uri)
    for item in read_labelled(cfg):
        summary.labelled += 1
        if item.label not in classes:
            summary.unknown_label += 1
            continue
        if item.sha256 in done:
            summary.already += 1
            continue
        try:
            data = storage.read_bytes(images.fs, images.join(item.sha256).path)
        except (FileNotFoundError, OSError):
            summary.missing_image += 1
            continue
        path = folder.join("train", item.label, f"{item.sha256}.{_extension(data)}")
        storage.write_bytes(path.fs, path.path, data)
        done.add(item.sha256)
        summary.exported += 1
        summary.per_class[item.label] = summary.per_class.get(item.label, 0) + 1
        if item.answered != item.label and item.probability >= cfg.loop.high_confidence:
            summary.surprising += 1
    log.info("%s", summary.line())
    return summary


def _extension(data: bytes) -> str:
    try:
        return (Image.open(io.BytesIO(data)).format or "img").lower()
    except Exception:  # noqa: BLE001 - an image the server accepted but PIL cannot name: keep it
        return "img"
