"""One validated configuration, shared by the CLI, the jobs, Tune and Serve; a module per concern.

:mod:`~hotdog_ray.config.data` (images, augmentation, the decoded cache), :mod:`~hotdog_ray.config.training`
(model, Ray Train, Ray Tune), :mod:`~hotdog_ray.config.serving` (HTTP server and its limits and
autoscaling, the forward pass, scoring, the prediction log, rollouts),
:mod:`~hotdog_ray.config.operations` (MLflow, monitoring) and :mod:`~hotdog_ray.config.loading`
(the whole :class:`Config`, YAML presets and ``--set`` overrides).
"""

from hotdog_ray.config.data import MAX_PIXELS, AugmentSettings, CacheSettings, DataSettings
from hotdog_ray.config.loading import (
    MOVED,
    Config,
    apply_overrides,
    dump_config,
    flatten,
    from_dict,
    load_config,
    migrate,
    parse_override,
)
from hotdog_ray.config.operations import (
    DEFAULT_TRACKING_URI,
    LoopSettings,
    MonitorSettings,
    TrackingSettings,
)
from hotdog_ray.config.serving import (
    AutoscalingSettings,
    LimitsSettings,
    PredictionLogSettings,
    PredictSettings,
    RolloutSettings,
    ScoreSettings,
    ServeSettings,
)
from hotdog_ray.config.training import ModelSettings, TrainSettings, TuneSettings

__all__ = [
    "DEFAULT_TRACKING_URI",
    "MAX_PIXELS",
    "MOVED",
    "AugmentSettings",
    "AutoscalingSettings",
    "CacheSettings",
    "Config",
    "DataSettings",
    "LimitsSettings",
    "ModelSettings",
    "LoopSettings",
    "MonitorSettings",
    "PredictSettings",
    "PredictionLogSettings",
    "RolloutSettings",
    "ScoreSettings",
    "ServeSettings",
    "TrackingSettings",
    "TrainSettings",
    "TuneSettings",
    "apply_overrides",
    "dump_config",
    "flatten",
    "from_dict",
    "load_config",
    "migrate",
    "parse_override",
]
