"""The config: presets, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hotdog_ray.cli import main
from hotdog_ray.config import Config, apply_overrides, dump_config, flatten, load_config
from hotdog_ray.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_are_valid_and_laptop_sized():
    cfg = Config()
    assert cfg.data.root == "data/sample"
    assert cfg.train.num_workers * cfg.train.cpus_per_worker < 2  # a CPU stays free for ingest
    assert cfg.tracking.uri is None  # MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (tests/test_tracking.py)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_preset_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_presets_exist():
    assert "sample.yaml" in {p.name for p in CONFIGS}


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        None,
        [
            "data.image_size=64",
            "data.augment.horizontal_flip=true",
            "data.classes=[cat, dog]",
            "train.learning_rate=3e-4",
            "data.augment.brightness=[0.2, 0.8]",
        ],
    )
    assert cfg.data.image_size == 64
    assert cfg.data.augment.horizontal_flip is True
    assert cfg.data.classes == ["cat", "dog"]
    assert cfg.train.learning_rate == pytest.approx(3e-4)
    assert cfg.data.augment.brightness == (0.2, 0.8)


def test_overrides_apply_on_top_of_preset(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("data:\n  image_size: 48\n  rescale: symmetric\n")
    cfg = load_config(preset, ["data.image_size=96"])
    assert (cfg.data.image_size, cfg.data.rescale) == (96, "symmetric")


@pytest.mark.parametrize(
    "override,key",
    [
        ("data.imag_size=64", "data.imag_size"),
        ("modle.name=x", "modle"),
        ("data.image_size=4", "data.image_size"),
        ("data.rescale=imagenet", "data.rescale"),
        ("data.augment.zoom=1.5", "data.augment.zoom"),
        ("train.learning_rate=-1", "train.learning_rate"),
        ("serve.port=70000", "serve.port"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert key in str(err.value)


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="data.classes or data.max_classes"):
        load_config(None, ["data.classes=[a, b]", "data.max_classes=2"])
    with pytest.raises(ConfigError, match="brightness"):
        load_config(None, ["data.augment.brightness=[0.9, 0.1]"])


def test_worker_count_is_a_number_or_an_elastic_range():
    fixed = load_config(None, ["train.num_workers=3"]).train
    assert (fixed.min_workers, fixed.max_workers, fixed.elastic) == (3, 3, False)
    elastic = load_config(None, ["train.num_workers=[1, 4]"]).train
    assert (elastic.min_workers, elastic.max_workers, elastic.elastic) == (1, 4, True)
    assert load_config(None, ["train.num_workers=[2, 2]"]).train.num_workers == 2  # no range at all
    for bad in ("[3, 1]", "[0, 2]", "[1, 2, 3]", "-1"):
        with pytest.raises(ConfigError, match="train.num_workers"):
            load_config(None, [f"train.num_workers={bad}"])


def test_malformed_override_and_files(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["data.image_size"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"data": {"root": "x"}}, ["data.root.sub=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["data.image_size=40", "model.dropout=0.25"])
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert flatten(cfg)["data.image_size"] == 40


def test_cli_reports_config_errors_without_traceback(capsys):
    assert main(["config", "--set", "data.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "data.bogus: unknown key" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "overrides,backend",
    [
        ([], "gloo"),
        (["train.use_gpu=true"], "nccl"),
        (["train.use_gpu=true", "train.gpus_per_worker=0.5"], "gloo"),  # NCCL refuses two ranks on one GPU
        (["train.use_gpu=true", "train.gpus_per_worker=0.5", "train.backend=nccl"], "nccl"),
        (["train.use_gpu=true", "train.backend=gloo"], "gloo"),
    ],
)
def test_distributed_backend_is_nccl_only_where_every_worker_has_a_whole_gpu(overrides, backend):
    assert load_config(None, overrides).train.dist_backend == backend


def test_nccl_without_gpus_is_refused_by_key():
    with pytest.raises(ConfigError, match="train.backend=nccl needs train.use_gpu"):
        load_config(None, ["train.backend=nccl"])


def test_moved_keys_are_read_at_their_new_place_with_a_warning(tmp_path, caplog):
    """A preset or --set key that moved to its concern's section still works, and the log names the
    new key; setting both the old and the new key is an error that names both."""
    preset = tmp_path / "old.yaml"
    preset.write_text("serve:\n  rollout: shadow\n  max_upload_bytes: 1234\n  log_sample_rate: 0.5\n")
    cfg = load_config(preset, ["serve.prediction_log=s3://b/log", "serve.max_replicas=3"])
    assert cfg.rollout.mode == "shadow" and cfg.serve.limits.max_upload_bytes == 1234
    assert cfg.prediction_log.location == "s3://b/log" and cfg.prediction_log.sample_rate == 0.5
    assert cfg.serve.autoscaling.max_replicas == 3
    assert "serve.rollout moved to rollout.mode" in caplog.text
    assert "serve.max_replicas moved to serve.autoscaling.max_replicas" in caplog.text
    with pytest.raises(ConfigError, match="serve.rollout and rollout.mode are both set"):
        load_config(None, ["serve.rollout=canary", "rollout.mode=shadow"])
    assert "rollout" not in load_config().serve.model_dump()  # one home for each key


def test_each_stage_has_its_own_model_reference():
    cfg = load_config(None, ["serve.model_uri=models:/a/1", "score.model_uri=models:/a/2"])
    assert (cfg.serve.model_uri, cfg.score.model_uri) == ("models:/a/1", "models:/a/2")
