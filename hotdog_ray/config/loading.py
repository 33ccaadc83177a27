"""The whole config: built from the embedded defaults, then a YAML preset (``configs/*.yaml``),
then ``--set section.key=value`` overrides, and validated once. Unknown keys and out-of-range
values are rejected with the offending key named."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from hotdog_ray.config.base import Section
from hotdog_ray.config.data import DataSettings
from hotdog_ray.config.operations import LoopSettings, MonitorSettings, TrackingSettings
from hotdog_ray.config.serving import (
    PredictionLogSettings,
    PredictSettings,
    RolloutSettings,
    ScoreSettings,
    ServeSettings,
)
from hotdog_ray.config.training import ModelSettings, TrainSettings, TuneSettings
from hotdog_ray.errors import ConfigError

log = logging.getLogger(__name__)


class Config(Section):
    """The whole configuration; every stage reads its own section."""

    data: DataSettings = Field(default_factory=DataSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    tune: TuneSettings = Field(default_factory=TuneSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    prediction_log: PredictionLogSettings = Field(default_factory=PredictionLogSettings)
    predict: PredictSettings = Field(default_factory=PredictSettings)
    score: ScoreSettings = Field(default_factory=ScoreSettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)
    loop: LoopSettings = Field(default_factory=LoopSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{key}: {msg}")
    return "invalid config: " + "; ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (["a", "b"], value); the value is read as YAML (``3``, ``[1, 2]``, ``null``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {exc}") from exc
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``key.sub=value`` override applied."""
    out: dict[str, Any] = _deep_copy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return out


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


# Keys that moved to the section of their concern: old presets and --set keys still work, with a
# warning that names the new key.
MOVED: dict[str, str] = {
    "serve.max_upload_bytes": "serve.limits.max_upload_bytes",
    "serve.max_images_per_request": "serve.limits.max_images_per_request",
    "serve.min_image_side": "data.min_image_side",
    "serve.min_replicas": "serve.autoscaling.min_replicas",
    "serve.max_replicas": "serve.autoscaling.max_replicas",
    "serve.target_ongoing_requests": "serve.autoscaling.target_ongoing_requests",
    "serve.max_ongoing_requests": "serve.autoscaling.max_ongoing_requests",
    "serve.prediction_log": "prediction_log.location",
    "serve.log_sample_rate": "prediction_log.sample_rate",
    "serve.log_images": "prediction_log.images",
    "serve.log_flush_interval_s": "prediction_log.flush_interval_s",
    "serve.log_queue_rows": "prediction_log.queue_rows",
    "serve.rollout": "rollout.mode",
    "serve.canary_fraction": "rollout.canary_fraction",
}


def migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` with every moved key at its new place; both set is an error (pure)."""
    out = _deep_copy(raw)
    for old, new in MOVED.items():
        section, key = old.split(".")
        node = out.get(section)
        if not isinstance(node, dict) or key not in node:
            continue
        value = node.pop(key)
        *parents, leaf = new.split(".")
        target = out
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{old} moved to {new}, but {part} is not a section")
        if leaf in target:
            raise ConfigError(f"{old} and {new} are both set: {old} moved to {new}; keep only {new}")
        target[leaf] = value
        log.warning("config key %s moved to %s: read as %s=%r", old, new, new, value)
    return out


def from_dict(raw: dict[str, Any]) -> Config:
    """Validate a plain dict (from YAML, Tune or Serve's user_config) into a Config; keys that moved
    are read at their new place (:data:`MOVED`)."""
    try:
        return Config.model_validate(migrate(raw))
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load defaults, then the YAML preset at ``path`` (if any), then ``overrides``."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections")
    return from_dict(apply_overrides(raw, overrides or []))


def dump_config(cfg: Config) -> str:
    """The config as YAML, loadable again by :func:`load_config`."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"data.image_size": 32, ...}``: the config as flat params (for MLflow)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node

    walk("", cfg.model_dump(mode="json"))
    return out
